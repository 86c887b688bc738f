"""The MCP server (official `mcp` SDK, low-level `Server`): the spec's 11 tools.

Each tool is one spec operation (`Operation.in_spec`), named `Operation.tool_name`
(`email_account_add_user`, ...), with the operation's pydantic request model as its input
schema. A call runs `Store.execute` in a worker thread, exactly like its HTTP twin. A failed
call is an MCP tool error (`isError: true`) whose content is the HTTP error body, so both
surfaces say the same code and message.

Transports:
- streamable HTTP at `/mcp` on the API server, behind the same bearer tokens (`mcp_http_app`);
- stdio, `mailstate mcp --data DIR --token T` (`run_stdio`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from mailstate.api.http_errors import INTERNAL_MESSAGE, error_body, json_error, render
from mailstate.api.metrics import Metrics
from mailstate.state.describe import describe
from mailstate.state.errors import MailstateError, StoreError, Unauthenticated
from mailstate.state.models import RESPONSES, Settings
from mailstate.state.ops import OPERATIONS, Operation
from mailstate.state.snapshot import Actor, Outcome, Snapshot
from mailstate.state.store import Store

log = logging.getLogger("mailstate.mcp")

SERVER_NAME = "mailstate"
ACTOR_KEY = "mailstate.actor"
INSTRUCTIONS = (
    "Email account management: enable email on a domain linked to your project, then add, list and remove "
    "mailboxes. Every change is one signed git commit; mail nodes apply it within about a minute."
)

# The spec's tools, in the spec's order.
TOOLS: dict[str, Operation] = {op.tool_name: op for op in OPERATIONS.values() if op.in_spec}

ActorOf = Callable[[ServerRequestContext[Any, Any]], Actor]


# Tools that destroy or overwrite something: a mailbox, a domain's mail, a credential.
# update-alias and set-forwarding replace where mail goes; the removes take an address away.
DESTRUCTIVE = frozenset(
    {
        "remove-user",
        "remove-domain",
        "disable-email",
        "update-password",
        "update-alias",
        "remove-alias",
        "set-forwarding",
        "remove-alias-domain",
    }
)
IDEMPOTENT = frozenset({"enable-email", "disable-email", "remove-user"})


def output_schema(op: Operation) -> dict[str, Any] | None:
    """The tool's outputSchema: the JSON schema of the operation's answer (state.models.RESPONSES)."""
    model = RESPONSES.get(op.name)
    return model.model_json_schema() if model is not None else None


def tool_list(settings: Settings | None = None) -> list[types.Tool]:
    """The tools, described for `settings` (the data dir's; e.g. its real default quota)."""
    out = []
    for name, op in TOOLS.items():
        out.append(
            types.Tool(
                name=name,
                title=op.name,
                description=describe(op, settings),
                input_schema=op.request.model_json_schema(),
                output_schema=output_schema(op),
                annotations=types.ToolAnnotations(
                    read_only_hint=not op.write,
                    destructive_hint=op.write and op.name in DESTRUCTIVE,
                    idempotent_hint=not op.write or op.name in IDEMPOTENT,
                    open_world_hint=False,
                ),
            )
        )
    return out


def _text(body: dict[str, Any]) -> list[types.ContentBlock]:
    return [types.TextContent(text=json.dumps(body, sort_keys=False))]


def error_result(body: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(content=_text(body), structured_content=body, is_error=True)


class Executor(Protocol):
    def execute(self, name: str, actor: Actor, data: Any = None, *, request_id: str | None = None) -> Outcome: ...

    @property
    def snapshot(self) -> Snapshot: ...


def build_server(store: Executor, actor_of: ActorOf, metrics: Metrics | None = None) -> Server[Any]:
    """The MCP server running operations on `store`; `actor_of(ctx)` names each request's caller;
    writes are counted in `metrics` (the HTTP server's) when given."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list(store.snapshot.settings))

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        op = TOOLS.get(params.name)
        if op is None:
            # A protocol error, not a tool result: the spec's "Unknown tool" is JSON-RPC -32602.
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {params.name[:100]!r}.")
        started = time.perf_counter()
        try:
            actor = actor_of(ctx)
            call = functools.partial(store.execute, op.name, actor, params.arguments or {})
            outcome = await anyio.to_thread.run_sync(call)
        except MailstateError as exc:
            if op.write and metrics is not None:
                metrics.observe(op.name, started, error=exc)
            _status, body = render(exc)
            return error_result(body)
        except Exception as exc:
            if op.write and metrics is not None:
                metrics.observe(op.name, started, error=exc)
            log.exception("tool %s failed", params.name)
            return error_result(error_body("internal_error", INTERNAL_MESSAGE))
        if op.write and metrics is not None:
            metrics.observe(op.name, started, outcome.result)
        return types.CallToolResult(content=_text(outcome.result), structured_content=outcome.result)

    return Server(
        SERVER_NAME,
        version=_version(),
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailstate")
    except Exception:
        return "0"


# --- streamable HTTP -----------------------------------------------------------------------


def _http_actor(ctx: ServerRequestContext[Any, Any]) -> Actor:
    request = ctx.request
    actor = getattr(request, "scope", {}).get(ACTOR_KEY) if request is not None else None
    if not isinstance(actor, Actor):
        raise Unauthenticated("A valid bearer token is required.", code="unauthenticated")
    return actor


class BearerGate:
    """ASGI wrapper: every request to /mcp needs a valid bearer token (401 otherwise).

    The token is checked on every request (a revoked token stops working mid-session), and the
    actor rides in the ASGI scope to the tool handler. The SDK's session manager binds each
    MCP session to the credential that opened it (via `scope["user"]`).
    """

    def __init__(self, app: ASGIApp, authenticate: Callable[[str | None], Actor]) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("A valid bearer token is required.", code="unauthenticated")
            actor = self.authenticate(token.strip())
        except MailstateError as exc:
            status, body = render(exc)
            await json_error(status, body)(scope, receive, send)
            return
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        scope[ACTOR_KEY] = actor
        scope["user"] = AuthenticatedUser(
            AccessToken(token=f"sha256:{digest}", client_id=f"sha256:{digest}", scopes=[])
        )
        await self.app(scope, receive, send)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def security_settings(
    host: str | None = None, port: int | None = None, extra_hosts: Sequence[str] = ()
) -> TransportSecuritySettings:
    """DNS-rebinding protection for /mcp (the MCP spec requires it for streamable HTTP).

    Allowed Host values: the address the server listens on with its port (all loopback names
    for a loopback address; `host:*` when the port is not known), plus `extra_hosts`
    ($MAILSTATE_ALLOWED_HOSTS: the names clients reach the server by, e.g. behind a proxy).
    Allowed Origins: http(s):// + each allowed host. A server listening on every interface
    (0.0.0.0, ::) cannot know its names: it checks Host only against `extra_hosts` when given,
    and Origin always (a browser page on another origin is refused)."""
    suffix = f":{port}" if port else ":*"
    names: list[str] = []
    if host is None or host in ("127.0.0.1", "localhost", "::1"):
        names = [h + suffix for h in LOOPBACK_HOSTS]
    elif host not in ("0.0.0.0", "::", ""):
        names = [(f"[{host}]" if ":" in host else host) + suffix]
    names += [h.strip() for h in extra_hosts if h.strip()]
    wildcard_bind = host in ("0.0.0.0", "::", "")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        # An empty list means "no Host check" (wildcard bind without names), see OriginGate.
        allowed_hosts=[] if wildcard_bind and not extra_hosts else names,
        allowed_origins=[f"{scheme}://{name}" for name in names for scheme in ("http", "https")],
    )


def _allowed(value: str, allowed: Sequence[str]) -> bool:
    # The SDK's matching: exact, or `base:*` for any port.
    return value in allowed or any(
        a.endswith(":*") and value.startswith(a[:-1]) and value[len(a) - 1 :].isdigit() for a in allowed
    )


class OriginGate:
    """ASGI wrapper: refuse (403) a request to /mcp whose Host or Origin is not allowed.

    A request without Origin (every non-browser client) passes the Origin check; a browser
    always sends one, so a page on another origin, even one whose name was rebound to this
    server's address, is refused before it can use a token the browser holds."""

    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host, origin = headers.get("host", ""), headers.get("origin")
            problem = None
            if self.settings.allowed_hosts and not _allowed(host, self.settings.allowed_hosts):
                problem = ("host_not_allowed", "The Host header names a host this server does not serve MCP for.")
            elif origin is not None and not _allowed(origin, self.settings.allowed_origins):
                problem = (
                    "origin_not_allowed",
                    "Requests from this Origin are not allowed (DNS rebinding protection).",
                )
            if problem is not None:
                log.warning(
                    "refused /mcp request: %s (host %r, origin %r)", problem[0], host[:100], (origin or "")[:100]
                )
                await json_error(403, error_body(*problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def mcp_http_app(
    store: Store,
    authenticate: Callable[[str | None], Actor],
    settings: TransportSecuritySettings | None = None,
    metrics: Metrics | None = None,
) -> tuple[ASGIApp, StreamableHTTPSessionManager]:
    """The /mcp ASGI app and its session manager (run `manager.run()` in the app's lifespan)."""
    settings = settings or security_settings()
    # The SDK checks the same settings again behind our gate (which answers in our error shape).
    sdk_settings = (
        settings if settings.allowed_hosts else TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )
    manager = StreamableHTTPSessionManager(
        app=build_server(store, _http_actor, metrics), security_settings=sdk_settings
    )
    return OriginGate(BearerGate(manager.handle_request, authenticate), settings), manager


# --- stdio ---------------------------------------------------------------------------------


def run_stdio(data: Path, token: str) -> None:
    """Serve MCP on stdin/stdout for one token (`mailstate mcp`). The token is checked at
    start (a bad one fails before anything is served) and again on every call."""
    from mcp.server.stdio import stdio_server

    from mailstate.state.datadir import DataDir, open_store
    from mailstate.state.localdb import LocalDB

    dd = DataDir(Path(data))
    if not dd.is_initialised():
        raise StoreError(
            f"{data} is not a mailstate data dir; run `mailstate init --data {data}`.", code="not_initialised"
        )
    db = LocalDB(dd.db)
    try:
        db.authenticate(token)
        # The store adopts (after verifying) commits that `mailstate serve` or the CLI make on
        # the same data dir, and re-runs a write that loses the race to one of them.
        store = open_store(dd.root, db=db)

        def actor_of(ctx: ServerRequestContext[Any, Any]) -> Actor:
            return db.authenticate(token)

        server = build_server(store, actor_of)

        async def main() -> None:
            async with stdio_server() as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())

        anyio.run(main)
    finally:
        db.close()
