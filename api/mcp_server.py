"""The MCP server (official `mcp` SDK, low-level `Server`): the spec's 11 tools.

Each tool is one spec operation (`Operation.in_spec`), named `Operation.tool_name`
(`email_account_add_user`, ...), with the operation's pydantic request model as its input
schema. A call runs `Store.execute` in a worker thread, exactly like its HTTP twin. A failed
call is an MCP tool error (`isError: true`) whose content is the HTTP error body, so both
surfaces say the same code and message.

Transports:
- streamable HTTP at `/mcp` on the API server, behind the same bearer tokens (`mcp_http_app`);
- stdio, `mailstate mcp --data DIR --token T` (`run_stdio`).

A repeated key (api/strict_json.py): the SDK parses each message with pydantic, which keeps the
last value of a key given twice, before any handler sees it. So both transports read the raw
message first: on /mcp an ASGI gate reads the POST body, on stdio a filter reads each line. A
tools/call holding a repeated key anywhere is flagged (in the request's ASGI scope, or by its
JSON-RPC id on stdio), and the tool answers the error its HTTP twin answers with status 400,
`{"error": {"code": "duplicate_key", ...}}`, without running. Any other message with a repeated
key is refused on /mcp with HTTP 400 and JSON-RPC error -32600; on stdio it goes on as the SDK
reads it (initialize, tools/list and ping carry no operation's input).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
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

from mailstate.api import strict_json
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
DUPLICATE_KEY = "mailstate.duplicate_key"  # ASGI scope: the key a tools/call repeated
# A POST to /mcp is one JSON-RPC message; ours are small (destinations: 6000 characters).
MAX_MCP_BODY = 1024 * 1024
INSTRUCTIONS = (
    "Email account management: enable email on a domain linked to your project, then add, list and remove "
    "mailboxes. Every change is one signed git commit; mail nodes apply it within about a minute."
)

# The spec's tools, in the spec's order.
TOOLS: dict[str, Operation] = {op.tool_name: op for op in OPERATIONS.values() if op.in_spec}

ActorOf = Callable[[ServerRequestContext[Any, Any]], Actor]
DuplicateOf = Callable[[ServerRequestContext[Any, Any]], str | None]


def scope_duplicate(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The key a tools/call over /mcp repeated (StrictJsonGate put it in the request's scope)."""
    scope = getattr(ctx.request, "scope", None)
    found = scope.get(DUPLICATE_KEY) if isinstance(scope, dict) else None
    return found if isinstance(found, str) else None


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
        "set-vacation",
        "set-filters",
        "remove-app-password",
        "set-limits",
        "set-quota",
        "suspend-sending",
        "remove-webhook",
        "set-replica",
        "failover-node",
        "set-spam-policy",
        "remove-sender-rule",
    }
)
IDEMPOTENT = frozenset(
    {
        "enable-email",
        "disable-email",
        "remove-user",
        "set-limits",
        "set-quota",
        "suspend-sending",
        "resume-sending",
        "set-replica",
        "failover-node",
    }
)


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
                    read_only_hint=not (op.write or op.local),
                    destructive_hint=(op.write or op.local) and op.name in DESTRUCTIVE,
                    idempotent_hint=not (op.write or op.local) or op.name in IDEMPOTENT,
                    # add-webhook makes the server call out to an address the caller names.
                    open_world_hint=op.name == "add-webhook",
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


def build_server(
    store: Executor,
    actor_of: ActorOf,
    metrics: Metrics | None = None,
    duplicate_of: DuplicateOf = scope_duplicate,
) -> Server[Any]:
    """The MCP server running operations on `store`; `actor_of(ctx)` names each request's caller;
    writes are counted in `metrics` (the HTTP server's) when given; `duplicate_of(ctx)` names the
    key a tools/call repeated (the transport saw it in the raw message), refused before it runs."""

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
            repeated = duplicate_of(ctx)
            if repeated is not None:
                raise strict_json.duplicate_key_error(repeated)
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


def _is_tool_call(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "tools/call" and "id" in message


def _jsonrpc_refusal(key: str) -> bytes:
    text = strict_json.duplicate_key_error(key).message
    return json.dumps(
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": f"Invalid Request: {text}"}}
    ).encode()


class StrictJsonGate:
    """ASGI wrapper: read a POST's JSON-RPC message before the SDK does, to see repeated keys
    (the module docstring says what happens then). The body is then handed on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body = await self._body(receive)
        if body is None:
            too_large = error_body("request_too_large", f"The request body may be at most {MAX_MCP_BODY} bytes.")
            await json_error(413, too_large)(scope, receive, send)
            return
        duplicate = strict_json.find_duplicate(body)
        if duplicate is not None:
            if not _is_tool_call(duplicate.root):
                refusal = _jsonrpc_refusal(duplicate.key)
                await send(
                    {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": refusal})
                return
            scope[DUPLICATE_KEY] = duplicate.key
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _body(receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return b"".join(chunks)
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > MAX_MCP_BODY:
                return None
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


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
    return OriginGate(BearerGate(StrictJsonGate(manager.handle_request), authenticate), settings), manager


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

        lines = StrictLines()
        server = build_server(store, actor_of, duplicate_of=lines.duplicate_of)

        async def main() -> None:
            with lines.claim_stdin():
                async with stdio_server(stdin=lines) as (read_stream, write_stream):  # type: ignore[arg-type]
                    await server.run(read_stream, write_stream, server.create_initialization_options())

        anyio.run(main)
    finally:
        db.close()


class StrictLines:
    """stdin for the SDK's stdio transport (`stdio_server(stdin=...)` only iterates its lines),
    each line read for repeated keys before the SDK parses it (see the module docstring)."""

    def __init__(self) -> None:
        self.flagged: dict[Any, str] = {}
        self._file: Any = None

    @contextmanager
    def claim_stdin(self) -> Iterator[None]:
        """Read the wire from a private copy of fd 0 and point fd 0 at /dev/null meanwhile, as the
        SDK does for the stdin it opens itself: a child process must never read MCP messages."""
        import io

        private = os.dup(0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        raw = os.fdopen(private, "rb", closefd=True)
        self._file = anyio.wrap_file(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))
        try:
            yield
        finally:
            os.dup2(private, 0)
            raw.close()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for line in self._file:
            duplicate = strict_json.find_duplicate(line)
            if duplicate is not None and _is_tool_call(duplicate.root):
                self.flagged[_id_key(duplicate.root["id"])] = duplicate.key
            yield line

    def duplicate_of(self, ctx: ServerRequestContext[Any, Any]) -> str | None:
        return self.flagged.pop(_id_key(ctx.request_id), None)


def _id_key(request_id: Any) -> tuple[str, Any]:
    return (
        (type(request_id).__name__, request_id) if isinstance(request_id, (int, str)) else ("other", repr(request_id))
    )
