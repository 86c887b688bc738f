"""The node endpoints: sync reports and a read-only git endpoint for the state repo.

Both authenticate with HTTP Basic `name:sync_key` (a report may carry `name` and `sync_key`
in its JSON body instead). A node with an `ip_address` on record is refused (403) from any
other address.

    POST /v1/nodes/report                                  → {"ok": true}
    GET  /v1/nodes/wait?head=<sha>&timeout=<s>             → {"changed", "head", "issued_at"}
    GET  /v1/nodes/state.git/info/refs?service=git-upload-pack
    POST /v1/nodes/state.git/git-upload-pack               (git smart HTTP, fetch/clone only)

The git endpoint runs `git http-backend` as a CGI in a worker thread, for exactly the two
upload-pack URLs; anything that smells of receive-pack (push) is refused with 403, and
REMOTE_USER is never set, so http-backend would refuse a push anyway.

It serves nodes only what the server accepted: the one ref it advertises is the accepted-head
statement `refs/mailstate/accepted` (state/statement.py); main, HEAD and the server's private
refs are hidden. It always speaks protocol v0 (the client's Git-Protocol header is not passed
on): protocol v2's upload-pack hands out ANY object by sha, while v0 with the
allow*SHA1InWant settings off serves only objects reachable from an advertised ref. So a commit
the server refused (pushed into state.git by hand, or replaced by a correction) cannot be
fetched here, by name or by sha.

The wait endpoint is a long poll for follow mode (`pi_pull.py --follow`): it answers as soon as
the accepted head (the statement's) differs from `head`, or after `timeout` seconds with
`"changed": false`. A waiting node costs one small coroutine and one future, no thread. The
store's statement listener (state/store.py add_statement_listener, called after REF moved)
hands over to the event loop with one `loop.call_soon_threadsafe`, whatever the number of
waiters; WAKE_DELAY_S (50 ms) later the loop wakes them WAKE_CHUNK at a time, one chunk per
pass, so that the write's own answer goes first and other requests are served between chunks.
See WaitHub.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
import re
import subprocess
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from mailstate.api.http import Services, read_json_object, read_limited
from mailstate.api.http_errors import HTTPError, error_body
from mailstate.state import fleet
from mailstate.state.errors import MailstateError, Unauthenticated
from mailstate.state.nodes import NodeReport, authenticate_node, record_report
from mailstate.state.statement import REF as STATEMENT_REF
from mailstate.state.store import Store

log = logging.getLogger("mailstate.nodes")
GIT_PREFIX = "/v1/nodes/state.git"
MAX_UPLOAD_PACK_BODY = 16 * 1024 * 1024
# A report may carry every mailbox's usage (~90 bytes each): room for 200k mailboxes.
MAX_REPORT_BODY = 24 * 1024 * 1024
GIT_TIMEOUT = 300.0
_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="mailstate nodes", charset="UTF-8"'}
_CGI_HEADERS = {"content-type", "cache-control", "expires", "pragma", "last-modified"}


WAIT_DEFAULT_S = 25.0
# Below the read timeout of common reverse proxies (nginx: 60 s) with room to spare.
WAIT_MAX_S = 55.0
MAX_WAITERS_PER_NODE = 4  # a node runs one follower; a few more cover reconnects
MAX_WAITERS = 20_000  # all nodes together (each costs a few KB)
# Waiters woken per pass of the event loop: 500 answers at once would hold the loop for ~0.5 s
# and make the write that moved the statement wait that long for its own answer.
WAKE_CHUNK = 32
# The wake-up waits this long after the statement moved: the write that moved it is then (almost
# always) answered before the fan-out competes with it for the GIL, and a burst of writes wakes
# the fleet once. Nothing next to a node's tick (about a second).
WAKE_DELAY_S = 0.05
_SHA = re.compile(r"^[0-9a-f]{40}$")
_WAIT_PARAMS = {"head", "timeout"}


class WaitHub:
    """The long-poll waiters of one app: who waits, and the futures that wake them.

    Lives on the event loop (only `_moved` is ever called from another thread, and only through
    `call_soon_threadsafe`). A waiter reads the stated head and, when it equals the one it
    knows, registers a future in the same step (nothing can run in between on the loop), then
    awaits it. The store's listener, once per new stated head, has `_moved` take every
    registered future and resolve them in chunks of WAKE_CHUNK, one chunk per loop pass.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.waiting: dict[str, int] = {}
        self.total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._wake_due = False
        self.closing = False  # the server is shutting down: every wait answers at once

    def head(self) -> str:
        """The accepted head nodes can fetch now (the statement's), or "" when there is none."""
        stated = self.store.statement
        return str(stated["head"]) if stated else ""

    def attach(self) -> None:
        """Listen to the store from the running loop (again after a loop change, e.g. in tests)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            self.store.remove_statement_listener(self._listener)
        self._loop = loop
        self._waiters = set()
        self.store.add_statement_listener(self._listener)

    def close(self) -> None:
        """Shutdown: every open wait answers now with the head as it is (a node then simply
        polls again, elsewhere or after the restart), and new ones answer at once. Called on
        the loop when the server starts shutting down, before it drains its connections:
        otherwise each long poll held the shutdown until uvicorn's graceful timeout cut it."""
        self.closing = True
        pending, self._waiters = list(self._waiters), set()
        self._wake(pending, 0)

    def detach(self) -> None:
        self.closing = True
        if self._loop is not None:
            self.store.remove_statement_listener(self._listener)
            self._loop = None
        pending, self._waiters = list(self._waiters), set()
        self._wake(pending, 0)  # shutdown: everyone answers now (the head as it is)

    def _listener(self, _head: str) -> None:
        # Runs in the thread that moved the statement, maybe under the write lock: one cheap
        # hand-over to the loop, never a wait.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_later(WAKE_DELAY_S, self._moved)

    def _moved(self) -> None:
        self._wake_due = False
        pending, self._waiters = list(self._waiters), set()
        self._wake(pending, 0)

    def _wake(self, pending: list[asyncio.Future[None]], start: int) -> None:
        for fut in pending[start : start + WAKE_CHUNK]:
            if not fut.done():
                fut.set_result(None)
        if start + WAKE_CHUNK < len(pending):
            # The next chunk on the next pass: what became ready meanwhile runs in between.
            asyncio.get_running_loop().call_soon(self._wake, pending, start + WAKE_CHUNK)

    async def wait(self, node: str, head: str, timeout: float, disconnected: asyncio.Future[Any]) -> str:
        """The stated head once it differs from `head`, or at `timeout`, or when the client left."""
        self.attach()
        current = self.head()
        if current != head or timeout <= 0 or self.closing:
            return current
        if self.waiting.get(node, 0) >= MAX_WAITERS_PER_NODE:
            raise HTTPError(
                429,
                "too_many_waiters",
                f"Node {node} already has {MAX_WAITERS_PER_NODE} waits open; close one first.",
                {"Retry-After": "5"},
            )
        if self.total >= MAX_WAITERS:
            raise HTTPError(
                503,
                "too_many_waiters",
                "The server holds as many waiting nodes as it may; retry in a minute.",
                {"Retry-After": "60"},
            )
        self.waiting[node] = self.waiting.get(node, 0) + 1
        self.total += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while current == head:
                left = deadline - loop.time()
                if left <= 0 or disconnected.done() or self.closing:
                    break
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.add(fut)  # right after reading the head: no move can slip between
                try:
                    await asyncio.wait((fut, disconnected), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiters.discard(fut)
                current = self.head()
            return current
        finally:
            self.total -= 1
            if self.waiting[node] <= 1:
                del self.waiting[node]
            else:
                self.waiting[node] -= 1


def _wait_query(request: Request) -> tuple[str, float]:
    """(head, timeout) from the query, or a 400 that names the parameter."""
    seen: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in _WAIT_PARAMS:
            raise HTTPError(
                400, "invalid_request", f"Unknown query parameter '{key}'; only head and timeout are accepted."
            )
        if key in seen:
            raise HTTPError(400, "invalid_request", f"The query parameter '{key}' is given more than once.")
        seen[key] = value
    head = seen.get("head", "").strip().lower()
    if head and not _SHA.match(head):
        raise HTTPError(
            400,
            "invalid_request",
            "head must be a full commit sha (40 hex digits), or empty for the current head at once.",
        )
    raw = seen.get("timeout", "").strip()
    timeout = WAIT_DEFAULT_S
    if raw:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not math.isfinite(timeout) or not 0 <= timeout <= WAIT_MAX_S:
            raise HTTPError(400, "invalid_request", f"timeout must be a number of seconds from 0 to {WAIT_MAX_S:g}.")
    return head, timeout


async def _until_disconnect(request: Request) -> None:
    """Return when the client goes away (its connection closed): the waiter then leaves."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """(name, sync_key) from `Authorization: Basic ...`, or None when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthenticated() from None
    name, sep, key = decoded.partition(":")
    if not sep:
        raise _unauthenticated()
    return name, key


def _unauthenticated() -> HTTPError:
    return HTTPError(401, "unauthenticated", "A valid node name and sync key are required.", _BASIC_CHALLENGE)


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1/nodes", tags=["nodes"])
    _add_report(router)
    _add_fleet_credentials(router)
    _add_wait(router)
    _add_git_endpoint(router)
    return router


def _add_report(router: APIRouter) -> None:
    @router.post(
        "/report",
        summary="A node reports its last pull (HTTP Basic name:sync_key).",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeReport"}}},
            },
            "security": [{"NodeBasic": []}],
        },
        responses={
            200: {"description": '`{"ok": true}`'},
            401: {"description": "Bad node name or sync key."},
            403: {"description": "Address not allowed."},
        },
    )
    async def report(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        creds = basic_credentials(request)
        data = await read_json_object(request, limit=MAX_REPORT_BODY)
        body_name, body_key = data.pop("name", None), data.pop("sync_key", None)
        if creds is None:
            if not isinstance(body_name, str) or not isinstance(body_key, str):
                raise _unauthenticated()
            creds = (body_name, body_key)
        elif body_name is not None and body_name != creds[0]:
            raise _unauthenticated()
        name, key = creds
        peer = _peer(request)

        def run() -> None:
            authenticate_node(services.store.snapshot, name, key, peer)
            report = record_report(
                services.db, services.store.snapshot, name, data, peer, _now(), services.report_listener
            )
            try:
                fleet.apply_report(services.store, name, report)
            except MailstateError as exc:
                # The status is recorded; the node reports the same again next tick, and the commit
                # its report calls for (a certificate, a move's switch) is made then.
                log.warning("report of node %s: commit postponed: %s", name, exc.message)

        try:
            await run_in_threadpool(run)
        except Unauthenticated:
            raise _unauthenticated() from None
        return JSONResponse({"ok": True})


def _add_fleet_credentials(router: APIRouter) -> None:
    @router.get(
        "/fleet",
        summary="A node's credentials for the other nodes (HTTP Basic name:sync_key): its own doveadm password, and the "
        "peers' it may use now (docs/fleet.md).",
        operation_id="node_fleet",
        openapi_extra={"security": [{"NodeBasic": []}]},
        responses={
            200: {"description": '`{"name", "doveadm_password", "peers": {name: {"address", "doveadm_password"}}}`'},
            401: {"description": "Bad node name or sync key."},
            403: {"description": "Address not allowed."},
        },
    )
    async def fleet_credentials(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        creds = basic_credentials(request)
        if creds is None:
            raise _unauthenticated()

        def run() -> dict[str, Any]:
            snap = services.store.snapshot
            authenticate_node(snap, creds[0], creds[1], _peer(request))
            return fleet.credentials(fleet.fleet_key(services.data.root), snap, creds[0])

        try:
            body = await run_in_threadpool(run)
        except Unauthenticated:
            raise _unauthenticated() from None
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _add_wait(router: APIRouter) -> None:
    @router.get(
        "/wait",
        summary="Follow mode: wait until the accepted head differs from `head` (long poll, HTTP Basic name:sync_key).",
        operation_id="node_wait",
        openapi_extra={
            "security": [{"NodeBasic": []}],
            "parameters": [
                {
                    "name": "head",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^([0-9a-f]{40})?$", "default": ""},
                    "description": "The accepted head the node knows (the statement's). Empty or absent: answer at once.",
                },
                {
                    "name": "timeout",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0, "maximum": WAIT_MAX_S, "default": WAIT_DEFAULT_S},
                    "description": f"Seconds to wait at most (0 to {WAIT_MAX_S:g}); then the answer is `changed: false`.",
                },
            ],
        },
    )
    async def wait(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        hub: WaitHub = request.app.state.wait_hub
        head, timeout = _wait_query(request)
        creds = basic_credentials(request)
        if creds is None:
            raise _unauthenticated()
        try:
            # On the loop, not in a worker thread like the report (which writes the database):
            # one SHA-256 of at most 512 characters and a dict lookup cost microseconds, less
            # than the thread hop, and a fleet re-arming after a wake-up comes all at once.
            authenticate_node(services.store.snapshot, creds[0], creds[1], _peer(request))
        except Unauthenticated:
            raise _unauthenticated() from None
        disconnected = asyncio.ensure_future(_until_disconnect(request))
        try:
            current = await hub.wait(creds[0], head, timeout, disconnected)
        finally:
            disconnected.cancel()
        stated = services.store.statement
        issued = stated["issued_at"] if stated and stated["head"] == current else None
        return JSONResponse(
            {"changed": current != head, "head": current or None, "issued_at": issued},
            headers={"Cache-Control": "no-store"},
        )


def _add_git_endpoint(router: APIRouter) -> None:
    # ONE route for both methods: with a route per method, a request in neither (OPTIONS, PUT)
    # met the first route only, and its 405 said `Allow: POST` though GET is served too. Its
    # OpenAPI entry (one operation per method, each with its own id) is written by
    # api/server.py's _node_route_docs.
    @router.api_route("/state.git/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def git_endpoint(path: str, request: Request) -> Response:
        services: Services = request.app.state.services
        service = request.query_params.get("service", "")
        if "receive-pack" in path or "receive-pack" in service:
            return JSONResponse(
                error_body("read_only", "The state repo is read-only over HTTP; push is not allowed."), status_code=403
            )
        if (request.method, path, service) not in (
            ("GET", "info/refs", "git-upload-pack"),
            ("POST", "git-upload-pack", ""),
        ):
            return JSONResponse(
                error_body("not_found", "Only git smart HTTP fetch (git-upload-pack) is served here."), status_code=404
            )
        creds = basic_credentials(request)
        if creds is None:
            raise _unauthenticated()
        try:
            await run_in_threadpool(authenticate_node, services.store.snapshot, creds[0], creds[1], _peer(request))
        except Unauthenticated:
            raise _unauthenticated() from None
        body = b""
        if request.method == "POST":
            body = await read_limited(request, MAX_UPLOAD_PACK_BODY)
        return await run_in_threadpool(_http_backend, services, request, path, body)


def _http_backend(services: Services, request: Request, path: str, body: bytes) -> Response:
    """Run `git http-backend` for one request and turn its CGI answer into a Response."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_PROJECT_ROOT": str(services.data.root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": f"/{services.data.repo.name}/{path}",
        "QUERY_STRING": request.url.query,
        "REQUEST_METHOD": request.method,
        "CONTENT_TYPE": request.headers.get("content-type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": _peer(request) or "",
        # REMOTE_USER is deliberately absent: http-backend only enables receive-pack with it.
        # HTTP_GIT_PROTOCOL is deliberately absent too: it forces protocol v0 (see the module
        # docstring). Config from the environment outranks the repo's own config.
        **_git_config(UPLOAD_PACK_CONFIG),
    }
    if encoding := request.headers.get("content-encoding"):
        env["HTTP_CONTENT_ENCODING"] = encoding
    try:
        proc = subprocess.run(
            ["git", "http-backend"], input=body, capture_output=True, env=env, timeout=GIT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HTTPError(500, "internal_error", "The git endpoint could not answer; the cause has been logged.") from exc
    return _cgi_response(proc.stdout)


# Advertise only the statement: hide every ref, HEAD included (it names main), then un-hide
# the statement. Never serve an object that is not reachable from it.
UPLOAD_PACK_CONFIG: tuple[tuple[str, str], ...] = (
    ("uploadpack.hideRefs", "refs/"),
    ("uploadpack.hideRefs", "HEAD"),
    ("uploadpack.hideRefs", f"!{STATEMENT_REF}"),
    ("uploadpack.allowTipSHA1InWant", "false"),
    ("uploadpack.allowReachableSHA1InWant", "false"),
    ("uploadpack.allowAnySHA1InWant", "false"),
    ("uploadpack.allowFilter", "false"),
    ("protocol.version", "0"),
)


def _git_config(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for i, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def _cgi_response(out: bytes) -> Response:
    head, sep, content = out.partition(b"\r\n\r\n")
    if not sep:
        head, sep, content = out.partition(b"\n\n")
    if not sep:
        raise HTTPError(500, "internal_error", "The git endpoint could not answer; the cause has been logged.")
    status = 200
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "status":
            status = int(value.split()[0]) if value.split() and value.split()[0].isdigit() else 500
        elif key in _CGI_HEADERS:
            headers[key] = value
    media = headers.pop("content-type", None)
    return Response(content=content, status_code=status, headers=headers, media_type=media)


def node_report_schema() -> dict[str, Any]:
    return NodeReport.model_json_schema()
