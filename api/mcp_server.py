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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from mailstate.api.http_errors import INTERNAL_MESSAGE, error_body, json_error, render
from mailstate.state.errors import MailstateError, StoreError, Unauthenticated
from mailstate.state.ops import OPERATIONS, Operation
from mailstate.state.snapshot import Actor, Outcome
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


def tool_list() -> list[types.Tool]:
    out = []
    for name, op in TOOLS.items():
        out.append(
            types.Tool(
                name=name,
                title=op.name,
                description=op.summary,
                input_schema=op.request.model_json_schema(),
                annotations=types.ToolAnnotations(
                    read_only_hint=not op.write,
                    destructive_hint=op.name in ("remove-user", "remove-domain", "disable-email"),
                    idempotent_hint=not op.write or op.name in ("enable-email", "disable-email", "remove-user"),
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


def build_server(store: Executor, actor_of: ActorOf) -> Server[Any]:
    """The MCP server running operations on `store`; `actor_of(ctx)` names each request's caller."""

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        op = TOOLS.get(params.name)
        if op is None:
            return error_result(error_body("unknown_tool", f"There is no tool named {params.name[:100]!r}."))
        try:
            actor = actor_of(ctx)
            call = functools.partial(store.execute, op.name, actor, params.arguments or {})
            outcome = await anyio.to_thread.run_sync(call)
        except MailstateError as exc:
            _status, body = render(exc)
            return error_result(body)
        except Exception:
            log.exception("tool %s failed", params.name)
            return error_result(error_body("internal_error", INTERNAL_MESSAGE))
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
        scope["user"] = AuthenticatedUser(AccessToken(token=f"sha256:{digest}", client_id=f"sha256:{digest}", scopes=[]))
        await self.app(scope, receive, send)


def mcp_http_app(store: Store, authenticate: Callable[[str | None], Actor]) -> tuple[ASGIApp, StreamableHTTPSessionManager]:
    """The /mcp ASGI app and its session manager (run `manager.run()` in the app's lifespan)."""
    manager = StreamableHTTPSessionManager(app=build_server(store, _http_actor))
    return BearerGate(manager.handle_request, authenticate), manager


# --- stdio ---------------------------------------------------------------------------------


# --- stdio (run) ---------------------------------------------------------------------------------


def run_stdio(data: Path, token: str) -> None:
    """Serve MCP on stdin/stdout for one token (`mailstate mcp`). The token is checked at
    start (a bad one fails before anything is served) and again on every call."""
    from mcp.server.stdio import stdio_server

    from mailstate.state.datadir import DataDir, open_store
    from mailstate.state.localdb import LocalDB

    dd = DataDir(Path(data))
    if not dd.is_initialised():
        raise StoreError(f"{data} is not a mailstate data dir; run `mailstate init --data {data}`.", code="not_initialised")
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
