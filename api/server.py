"""The server: one FastAPI app for the HTTP API, MCP at /mcp and the node endpoints.

    create_app(data)   the ASGI app for an initialised data dir
    serve(data, ...)   `mailstate serve`: initialise an empty dir (printing the admin token
                       once), then run uvicorn

Routes:
    /v1/email-account/<operation>   the API (api.http), one route per state.ops operation
    /v1/nodes/report, /v1/nodes/wait, /v1/nodes/state.git/...   node sync (api.nodes_http)
    /v1/health                      liveness and HEAD
    /mail/config-v1.1.xml, /autodiscover/autodiscover.xml, /.well-known/mta-sts.txt
                                    mail clients and MTA-STS, no token (api.onboarding_http)
    /mcp                            MCP over streamable HTTP (api.mcp_server)
    /openapi.json, /docs            documentation
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import ValidationError
from starlette.routing import Route

from mailstate.api import http, http_errors, nodes_http, onboarding_http
from mailstate.api.logs import logging_config
from mailstate.api.mcp_server import mcp_http_app, security_settings
from mailstate.api.metrics import Metrics
from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.delivery import Dispatcher
from mailstate.state.dnscheck import BackgroundDnsCheck, check_interval
from mailstate.state.errors import InvalidInput, StoreError
from mailstate.state.events import SUSPENDED_PREFIX, CommitEvents, NodeEvents, ReportEvents
from mailstate.state.localdb import LocalDB
from mailstate.state.models import Settings, invalid_input_from
from mailstate.state.nodes import NodeReport
from mailstate.state.store import Store, limit_heap_arenas
from mailstate.state.webhooks import Webhooks

log = logging.getLogger("mailstate.server")

DEFAULT_SYNC_INTERVAL = 30.0


def sync_interval() -> float:
    """Seconds between upstream fetches (upstream mode): $MAILSTATE_SYNC_INTERVAL, default 30."""
    try:
        value = float(os.environ.get("MAILSTATE_SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL))
    except ValueError:
        return DEFAULT_SYNC_INTERVAL
    return value if 0.05 <= value <= 86400 else DEFAULT_SYNC_INTERVAL


DEFAULT_STATEMENT_INTERVAL = 60.0


def statement_interval() -> float:
    """Seconds between re-signings of the accepted-head statement: $MAILSTATE_STATEMENT_INTERVAL, default 60."""
    try:
        value = float(os.environ.get("MAILSTATE_STATEMENT_INTERVAL", DEFAULT_STATEMENT_INTERVAL))
    except ValueError:
        return DEFAULT_STATEMENT_INTERVAL
    return value if 0.05 <= value <= 86400 else DEFAULT_STATEMENT_INTERVAL


DESCRIPTION = """\
GitOps for mailboxes. Every write is one validated, signed git commit of the YAML state plus the
Postfix/Dovecot files compiled from it; mail nodes pull it within about a minute.

Authenticate with `Authorization: Bearer <token>` (`mailstate token create`). Errors always have the
shape `{"error": {"code": "<snake_case>", "message": "<human sentence>"}}`.

MCP (streamable HTTP) is served at `/mcp` with the same bearer tokens.
"""


def create_app(
    data: Path,
    *,
    db: LocalDB | None = None,
    store: Store | None = None,
    host: str | None = None,
    port: int | None = None,
) -> FastAPI:
    """The ASGI app for the initialised data dir `data` (pass `db`/`store` to share them). `host`
    and `port` are where it listens: /mcp accepts only those in Host and Origin (plus
    $MAILSTATE_ALLOWED_HOSTS); without them, loopback names on any port."""
    dd = DataDir(Path(data))
    own_db = db is None
    if db is None:
        if not dd.is_initialised():
            store = store or open_store(dd.root)  # raises not_initialised, creating nothing
        db = LocalDB(dd.db)
    if store is None:
        store = open_store(dd.root, db=db)
    services = http.Services(data=dd, store=store, db=db, metrics=Metrics(store))
    controls = _controls(store, db, services)
    wait_hub = nodes_http.WaitHub(store)  # the long-poll waiters of /v1/nodes/wait
    if services.metrics is not None:
        services.metrics.count_waiting(lambda: wait_hub.total)
    allowed_hosts = [h for h in os.environ.get("MAILSTATE_ALLOWED_HOSTS", "").split(",") if h.strip()]
    mcp_app, mcp_manager = mcp_http_app(
        store, services.authenticate, security_settings(host, port, allowed_hosts), services.metrics
    )

    lifespan = _lifespan(store, db, own_db=own_db, controls=controls, wait_hub=wait_hub, mcp_manager=mcp_manager)

    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from the fastapi-offline package's
    # own copy (under /docs/static), not from a CDN, so the docs work without internet.
    app = FastAPIOffline(
        title="mailstate",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs/static",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.services = services
    app.state.wait_hub = wait_hub
    http_errors.install(app)
    app.include_router(http.build_router())
    app.include_router(nodes_http.build_router())
    app.include_router(http.health_router())
    app.include_router(http.metrics_router())
    app.include_router(onboarding_http.build_router())
    app.router.routes.append(Route("/mcp", endpoint=mcp_app))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _lifespan(
    store: Store,
    db: LocalDB,
    *,
    own_db: bool,
    controls: list[tuple[Any, str]],
    wait_hub: nodes_http.WaitHub,
    mcp_manager: StreamableHTTPSessionManager,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the background threads run while it serves, and stop after."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        # One background thread: the accepted-head statement's refresh (and upstream push),
        # the upstream fetch (upstream mode), and in local mode the watch on main that adopts
        # or refuses another process's commit without waiting for a request.
        syncer = threading.Thread(
            target=store.run_background,
            args=(stop,),
            kwargs={"statement_interval": statement_interval(), "sync_interval": sync_interval()},
            name="mailstate-background",
            daemon=True,
        )
        syncer.start()
        checker = _dns_check_thread(store, db, stop)
        # Webhooks (state/events.py, state/delivery.py): commits and node freshness into events,
        # and the outbox's deliveries, each in its own thread, none of them on a write's path.
        workers = [_thread(target, stop, name) for target, name in controls]
        try:
            async with mcp_manager.run():
                yield
        finally:
            wait_hub.detach()
            stop.set()
            syncer.join(timeout=5)
            if checker is not None:
                checker.join(timeout=5)
            for worker in workers:
                worker.join(timeout=12)
            if own_db:
                db.close()

    return lifespan


def _controls(store: Store, db: LocalDB, services: http.Services) -> list[tuple[Any, str]]:
    """The webhook machinery of a server (the registry itself is open_store's): what turns commits,
    reports and node freshness into events, and the dispatcher; their loops, to run in threads."""
    hooks = store.webhooks
    if not isinstance(hooks, Webhooks):
        return []
    commits = CommitEvents(store, hooks)
    nodes = NodeEvents(store, hooks)
    dispatcher = Dispatcher(hooks)
    services.report_listener = ReportEvents(store, hooks)
    if services.metrics is not None:
        suspended = functools.partial(hooks.count_state, SUSPENDED_PREFIX, "1")
        services.metrics.count_controls(dispatcher.counters, hooks.backlog, db.sending_counts, suspended)
    return [
        (commits.run, "mailstate-events"),
        (nodes.run, "mailstate-node-events"),
        (dispatcher.run, "mailstate-webhooks"),
    ]


def _thread(target: Any, stop: threading.Event, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
    thread.start()
    return thread


def _dns_check_thread(store: Store, db: LocalDB, stop: threading.Event) -> threading.Thread | None:
    """The background DNS check (state.dnscheck): list-domains' dns_ok and dns_checked_at.
    $MAILSTATE_DNS_CHECK_INTERVAL=0 turns it off."""
    interval = check_interval()
    if not interval:
        return None
    thread = threading.Thread(
        target=BackgroundDnsCheck(store, db, interval=interval).run,
        args=(stop,),
        name="mailstate-dns-check",
        daemon=True,
    )
    thread.start()
    return thread


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(http.request_schema_components())
    report = NodeReport.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(report.pop("$defs", {}))  # e.g. UsageEntry, referenced from components
    schemas["NodeReport"] = report
    _node_route_docs(schema)
    # Every route reads its own input, so FastAPI's 422 validation shapes never answer.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components.setdefault("securitySchemes", {})["NodeBasic"] = {
        "type": "http",
        "scheme": "basic",
        "description": "A node's `name:sync_key` (from add-node or rotate-node-key).",
    }
    app.openapi_schema = schema
    return schema


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _node_route_docs(schema: dict[str, Any]) -> None:
    """The node endpoints' responses as they really answer (api.nodes_http): FastAPI would list
    a 422 for the git path parameter, which never answers, and none of the real errors."""
    paths = schema.get("paths", {})
    _git_docs(schema, paths)
    _wait_docs(schema, paths)
    _fleet_docs(schema, paths)
    _report_docs(schema, paths)  # last: NodeReportAck stays the last of the components


def _report_docs(schema: dict[str, Any], paths: dict[str, Any]) -> None:
    """The report: its answers and NodeReportAck."""
    report = paths.get("/v1/nodes/report", {}).get("post")
    if report is not None:
        report["operationId"] = "node_report"
        report["responses"] = {
            "200": {
                "description": "The report is recorded (list-nodes shows it).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeReportAck"}}},
            },
            "400": _error("The body is not a JSON object, or a report field is invalid."),
            "401": _error("Bad or missing node name and sync key."),
            "403": _error("The node has an ip_address on record and this request came from another address."),
            "405": _error("Only POST is accepted."),
            "413": _error("The request body is too large."),
        }
    schema.setdefault("components", {}).setdefault("schemas", {})["NodeReportAck"] = {
        "type": "object",
        "properties": {"ok": {"type": "boolean", "const": True}},
        "required": ["ok"],
        "title": "NodeReportAck",
    }


def _git_docs(schema: dict[str, Any], paths: dict[str, Any]) -> None:
    """The git smart HTTP route: one operation per method, each with its own id."""
    git_path = paths.setdefault("/v1/nodes/state.git/{path}", {})
    for method, ctype in (
        ("get", "application/x-git-upload-pack-advertisement"),
        ("post", "application/x-git-upload-pack-result"),
    ):
        op = git_path.setdefault(method, {})
        op.update(
            tags=["nodes"],
            summary="Read-only git smart HTTP (clone/fetch) of the state repo, HTTP Basic name:sync_key. Push is refused (403).",
            operationId=f"node_git_{method}",
            security=[{"NodeBasic": []}],
            parameters=[
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "info/refs (GET, with ?service=git-upload-pack) or git-upload-pack (POST).",
                }
            ],
        )
        op["responses"] = {
            "200": {
                "description": "git smart HTTP (upload-pack).",
                "content": {ctype: {"schema": {"type": "string", "format": "binary"}}},
            },
            "401": _error("Bad or missing node name and sync key (HTTP Basic)."),
            "403": _error("A push (receive-pack) is refused, or the address is not the node's ip_address."),
            "404": _error("Anything but info/refs?service=git-upload-pack (GET) and git-upload-pack (POST)."),
            "405": _error("Only GET and POST are accepted."),
        }
        if method == "post":
            op["responses"]["413"] = _error("The upload-pack request is too large.")


def _wait_docs(schema: dict[str, Any], paths: dict[str, Any]) -> None:
    """The long poll: its answers and NodeWaitResponse."""
    wait = paths.get("/v1/nodes/wait", {}).get("get")
    if wait is not None:
        wait["responses"] = {
            "200": {
                "description": "The accepted head moved away from `head` (changed: true), or the timeout passed (changed: false).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeWaitResponse"}}},
            },
            "400": _error(
                "An unknown or repeated query parameter, a head that is not a full sha, or a timeout out of range."
            ),
            "401": _error("Bad or missing node name and sync key (HTTP Basic)."),
            "403": _error("The node has an ip_address on record and this request came from another address."),
            "405": _error("Only GET is accepted."),
            "429": _error("This node already has the most waits open at once (see Retry-After)."),
            "503": _error("The server holds the most waiting nodes it may (see Retry-After)."),
        }
    schema.setdefault("components", {}).setdefault("schemas", {})["NodeWaitResponse"] = {
        "type": "object",
        "properties": {
            "changed": {
                "type": "boolean",
                "description": "true when the accepted head differs from the `head` asked about.",
            },
            "head": {
                "anyOf": [{"type": "string", "pattern": "^[0-9a-f]{40}$"}, {"type": "null"}],
                "description": "The server's accepted head now (the statement's), null when it has none yet.",
            },
            "issued_at": {
                "anyOf": [{"type": "integer"}, {"type": "null"}],
                "description": "Unix seconds the statement of that head was issued, null without one.",
            },
        },
        "required": ["changed", "head", "issued_at"],
        "title": "NodeWaitResponse",
    }


def _fleet_docs(schema: dict[str, Any], paths: dict[str, Any]) -> None:
    """The fleet credentials: their answers and NodeFleetResponse."""
    fleet = paths.get("/v1/nodes/fleet", {}).get("get")
    if fleet is not None:
        fleet["responses"] = {
            "200": {
                "description": "The node's own doveadm password and the peers' it may use now.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeFleetResponse"}}},
            },
            "401": _error("Bad or missing node name and sync key (HTTP Basic)."),
            "403": _error("The node has an ip_address on record and this request came from another address."),
            "405": _error("Only GET is accepted."),
        }
    secret = {"type": "string", "pattern": "^msd_[0-9a-f]{64}$"}
    schema.setdefault("components", {}).setdefault("schemas", {})["NodeFleetResponse"] = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "The node asking."},
            "doveadm_password": {**secret, "description": "This node's doveadm service password (docs/fleet.md)."},
            "peers": {
                "type": "object",
                "description": "The peers whose doveadm service this node may use now (a move it takes part in), by name.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"address": {"type": "string"}, "doveadm_password": secret},
                    "required": ["address", "doveadm_password"],
                },
            },
        },
        "required": ["name", "doveadm_password", "peers"],
        "title": "NodeFleetResponse",
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailstate")
    except Exception:
        return "0"


def prepare_data_dir(data: Path, bcrypt_cost: int | None = None) -> str | None:
    """Initialise `data` if it does not exist or is empty; the new admin token, or None when it
    already was a data dir. A non-empty directory that is not a data dir is refused, not taken over."""
    dd = DataDir(Path(data))
    if dd.is_initialised():
        return None
    if dd.root.exists() and any(p.name != "lost+found" for p in dd.root.iterdir()):
        raise StoreError(
            f"{dd.root} is neither empty nor a mailstate data dir; give an empty or new directory (or run `mailstate init --data {dd.root}` on purpose).",
            code="not_initialised",
        )
    try:
        settings = Settings(bcrypt_cost=bcrypt_cost) if bcrypt_cost is not None else Settings()
    except ValidationError as exc:
        raise invalid_input_from(exc) from None
    init_data_dir(dd.root, settings)
    db = LocalDB(dd.db)
    try:
        _info, secret = db.create_token(project_id=None, name="admin")
    finally:
        db.close()
    return secret


def serve(
    data: Path,
    host: str = "127.0.0.1",
    port: int = 8025,
    upstream: str | None = None,
    bcrypt_cost: int | None = None,
    log_format: str = "text",
) -> None:
    """`mailstate serve`: initialise an empty data dir (printing its admin token once), then serve.
    `log_format` json writes one JSON object per log line (api.logs)."""
    import uvicorn

    if port < 0 or port > 65535:
        raise InvalidInput("The port must be 0-65535.", code="invalid_request", field="port")
    dd = DataDir(Path(data))
    was_initialised = dd.is_initialised()
    secret = prepare_data_dir(dd.root, bcrypt_cost)
    if secret is not None:
        print(f"mailstate: initialised a new data dir at {dd.root}")
        print(f"  state repo: {dd.repo}   allowed_signers: {dd.allowed_signers}")
        print("admin token (shown ONCE, it cannot be recovered; store it now):")
        print(secret, flush=True)
    elif bcrypt_cost is not None and was_initialised:
        print(
            "mailstate: --bcrypt-cost only applies when initialising; the data dir's mailstate.yaml decides.",
            file=sys.stderr,
        )
    limit_heap_arenas()
    db = LocalDB(dd.db)
    store = open_store(dd.root, db=db, upstream=upstream)
    app = create_app(dd.root, db=db, store=store, host=host, port=port)
    # X-Forwarded-For is trusted only from the proxies named here (none by default), so a
    # node's IP whitelist cannot be sidestepped with a header.
    forwarded = os.environ.get("MAILSTATE_FORWARDED_ALLOW_IPS", "")
    level = os.environ.get("MAILSTATE_LOG_LEVEL", "info")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            app.state.wait_hub.close()  # long polls answer first, then the connections drain
            await super().shutdown(sockets)

    try:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            proxy_headers=bool(forwarded),
            forwarded_allow_ips=forwarded or None,
            timeout_graceful_shutdown=5,
            log_level=level,
            server_header=False,
            log_config=logging_config("json", level) if log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        )
        server = Server(config)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
    finally:
        db.close()
    if not server.started:
        sys.exit(3)  # uvicorn.run's STARTUP_FAILURE (e.g. the port is taken)
