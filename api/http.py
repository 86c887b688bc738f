"""The HTTP API: one route per operation at `/v1/email-account/<name>`, generated from OPERATIONS.

Each route authenticates the bearer token, refuses a project token on an admin endpoint,
reads its input (query parameters for GET, a JSON object for POST) and runs ONE operation
with `Store.execute` in a worker thread, so that bcrypt (the operation's prepare step, which
runs outside the store's write lock) never blocks the event loop and uses every core.

Input is parsed here only as far as "is it a JSON object"; the fields are validated by the
operation's pydantic request model, the same model the MCP tools and OpenAPI use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from mailstate.api import strict_json
from mailstate.api.http_errors import HTTPError
from mailstate.api.metrics import Metrics
from mailstate.state.autoconfig import PROFILE_CONTENT_TYPE
from mailstate.state.datadir import DataDir
from mailstate.state.describe import describe
from mailstate.state.errors import Forbidden, InvalidInput, Unauthenticated
from mailstate.state.localdb import LocalDB
from mailstate.state.models import RESPONSES, HealthResponse
from mailstate.state.nodes import ReportListener
from mailstate.state.ops import OPERATIONS, Operation
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store, clean_request_id

API_PREFIX = "/v1/email-account"
MAX_BODY_BYTES = 64 * 1024

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="`Authorization: Bearer <token>` (`mailstate token create`). A project token acts for one project; [Admin] endpoints need an admin token.",
)


@dataclass
class Services:
    """What the routes and tools share: the data dir, its store and its local database."""

    data: DataDir
    store: Store
    db: LocalDB
    metrics: Metrics | None = None
    # Hears what node reports change (state/events.py ReportEvents: webhooks, auto-suspensions).
    report_listener: ReportListener | None = None

    def authenticate(self, token: str | None) -> Actor:
        return self.db.authenticate(token)


# --- documentation models (OpenAPI only; requests are validated by state.models) ----------


class ErrorDetail(BaseModel):
    code: str = Field(description="snake_case error code, e.g. mailbox_exists.", examples=["mailbox_exists"])
    message: str = Field(description="A human sentence.", examples=["Mailbox info@mycompany.nl exists."])
    field: str | None = Field(default=None, description="The request field at fault, if any.")
    target: str | None = Field(default=None, description="The domain, mailbox or node concerned, if any.")
    limit: str | None = Field(
        default=None, description="409 limit_reached / limit_below_use: the plan limit, e.g. max_mailboxes."
    )
    max: int | None = Field(default=None, description="409 limit_reached / limit_below_use: the limit's value.")
    use: int | None = Field(
        default=None,
        description="409 limit_reached: what the scope would use after the write; limit_below_use: what it uses now.",
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Which operations can answer 404 and 409, as the operations in state.ops raise them
# (the generated-client test drives them, so a change shows up there).
_CAN_404 = {
    "enable-email", "disable-email", "add-user", "remove-user", "restore-user", "list-users", "update-password",
    "remove-domain", "unlink-domain", "remove-node", "rotate-node-key",
    "add-alias", "update-alias", "remove-alias", "list-aliases", "set-forwarding", "add-alias-domain", "remove-alias-domain",
    "dns-records", "check-dns", "mobileconfig", "move-domain", "set-node-address", "set-replica", "failover-node",
    "set-vacation", "set-filters", "list-filters", "add-app-password", "list-app-passwords", "remove-app-password",
    "set-limits", "list-limits", "set-quota", "suspend-sending", "resume-sending", "remove-webhook",
    "set-spam-policy", "list-spam-policy", "add-sender-rule", "list-sender-rules", "remove-sender-rule",
}  # fmt: skip
_CAN_409 = {"disable-email", "add-user", "restore-user", "update-password", "add-domain", "remove-domain", "add-node", "link-domain", "unlink-domain",
            "add-alias", "update-alias", "remove-alias", "set-forwarding", "add-alias-domain", "remove-user", "dns-records",
            "check-dns", "mobileconfig", "set-vacation", "set-filters", "add-app-password",
            "set-limits", "set-quota", "enable-email", "add-webhook", "move-domain", "remove-node", "set-node-address",
            "set-replica", "set-spam-policy", "add-sender-rule", "remove-sender-rule"}  # fmt: skip
# Reads that answer 503 when a service they need is not there (check-dns: no usable resolver).
_CAN_503 = {"check-dns", "add-webhook", "list-webhooks", "remove-webhook"}
# Operations whose HTTP answer is a file, not their JSON (the MCP tool answers the JSON):
# name -> (media type, the result field holding the file, the result field naming it).
FILE_ANSWERS: dict[str, tuple[str, str, str]] = {
    "mobileconfig": (PROFILE_CONTENT_TYPE, "profile", "filename"),
}
# Success statuses: 201 when the call created something (Outcome.created), 202 when it started
# work the nodes finish (move-domain), else 200.
CREATED: dict[str, tuple[int, ...]] = {
    "add-user": (201,),
    "add-domain": (201,),
    "add-node": (201,),
    "link-domain": (201, 200),
    "add-alias": (201,),
    "add-app-password": (201,),
    "add-sender-rule": (201, 200),
    "add-webhook": (201,),
    "move-domain": (202,),
}


def success_statuses(op: Operation) -> tuple[int, ...]:
    """The 2xx statuses `op` answers, the main one first."""
    return CREATED.get(op.name, (200,))


def _error_responses(op: Operation) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in success_statuses(op)[1:]:
        out[status] = {
            "model": RESPONSES[op.name],
            "description": "Nothing was created: the domain was already linked to this project (commit null), or existed unlinked and is linked now.",
        }
    out[400] = {
        "model": ErrorResponse,
        "description": "Invalid input (malformed JSON, a key given twice, unknown or missing field, bad value).",
    }
    if not op.public:
        out[401] = {"model": ErrorResponse, "description": "No valid bearer token."}
    if op.admin:
        out[403] = {"model": ErrorResponse, "description": "An admin token is required."}
    if op.name in _CAN_404:
        out[404] = {
            "model": ErrorResponse,
            "description": "No such domain, mailbox or node (another project's reads as absent).",
        }
    out[405] = {"model": ErrorResponse, "description": f"Only {op.method} is accepted."}
    if op.name in _CAN_409:
        out[409] = {
            "model": ErrorResponse,
            "description": "Conflict with the current state (exists, still active, not enabled, a plan limit "
            "reached: limit_reached / limit_below_use, naming the limit, its max and the use, ...).",
        }
    if op.method == "POST":
        out[413] = {"model": ErrorResponse, "description": f"The request body is larger than {MAX_BODY_BYTES} bytes."}
    if op.write:
        out[503] = {
            "model": ErrorResponse,
            "description": "The state repo kept moving under other writers, or the upstream is unavailable; nothing changed.",
        }
    if op.name in _CAN_503:
        why = "No usable DNS resolver ($MAILSTATE_DNS_RESOLVER)." if op.name == "check-dns" else "No local database."
        out[503] = {"model": ErrorResponse, "description": why}
    if op.name in FILE_ANSWERS:
        media = FILE_ANSWERS[op.name][0]
        out[200] = {
            "description": "The file itself (attachment); the MCP tool answers it inside JSON.",
            "content": {media: {"schema": {"type": "string", "title": f"{op.request.__name__[:-7]}File"}}},
        }
    return out


def request_schema_components() -> dict[str, Any]:
    """Every request model's JSON schema, keyed by model name, for OpenAPI components."""
    out: dict[str, Any] = {}
    for op in OPERATIONS.values():
        schema = op.request.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[op.request.__name__] = schema
    return out


def _openapi_extra(op: Operation) -> dict[str, Any]:
    extra = _request_doc(op)
    if op.public:
        extra["security"] = [{}]  # no credentials: mail clients call it
    return extra


def _request_doc(op: Operation) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{op.request.__name__}"}
    if op.method == "POST":
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
    schema = op.request.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        params.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "description": prop.pop("description", ""),
                "schema": prop,
            }
        )
    return {"parameters": params} if params else {}


# --- input ---------------------------------------------------------------------------------


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, "request_too_large", f"The request body may be at most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "request_too_large", f"The request body may be at most {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, *, limit: int = MAX_BODY_BYTES, empty_ok: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or an error in the one shape."""
    body = await read_limited(request, limit)
    if not body.strip():
        if empty_ok:
            return {}
        raise InvalidInput("The request body must be a JSON object.", code="invalid_request")
    # No Content-Type at all is read as JSON (some clients send none); any other type is refused.
    ctype = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
        raise InvalidInput(
            "The request body must be JSON, sent with Content-Type: application/json.", code="invalid_request"
        )
    try:
        data = strict_json.loads(body)
    except strict_json.DuplicateKey as exc:
        raise strict_json.duplicate_key_error(exc.key) from None
    except (ValueError, RecursionError):
        raise InvalidInput("The request body is not valid JSON.", code="invalid_request") from None
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.", code="invalid_request")
    return data


def query_object(request: Request) -> dict[str, Any]:
    """Query parameters as a flat object; a repeated parameter is refused, not guessed at."""
    out: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in out:
            raise InvalidInput(
                f"The query parameter '{key}' is given more than once.", code="invalid_request", field=key
            )
        out[key] = value
    return out


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("A valid bearer token is required.", code="unauthenticated")
    return credentials.credentials


# --- routes --------------------------------------------------------------------------------


def _endpoint(op: Operation) -> Any:
    if op.public:
        return _public_endpoint(op)

    async def endpoint(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> JSONResponse:
        services: Services = request.app.state.services
        actor = services.authenticate(_token(credentials))
        if op.admin and not actor.is_admin:
            raise Forbidden("This operation needs an admin token.", code="admin_required")
        data = query_object(request) if op.method == "GET" else await read_json_object(request)
        request_id = clean_request_id(request.headers.get("x-request-id"))
        started = time.perf_counter()
        try:
            if op.inline:
                outcome = services.store.execute(op.name, actor, data, request_id=request_id)
            else:
                outcome = await run_in_threadpool(services.store.execute, op.name, actor, data, request_id=request_id)
        except Exception as exc:
            if op.write and services.metrics is not None:
                services.metrics.observe(op.name, started, error=exc)
            raise
        if op.write and services.metrics is not None:
            services.metrics.observe(op.name, started, outcome.result)
        took = (time.perf_counter() - started) * 1000
        status = 201 if outcome.created else 202 if success_statuses(op)[0] == 202 else 200
        # no-store: some answers carry a secret shown once (add-node's sync key).
        headers = {"X-Request-Id": request_id, "Server-Timing": f"op;dur={took:.2f}", "Cache-Control": "no-store"}
        return JSONResponse(outcome.result, status_code=status, headers=headers)

    endpoint.__name__ = op.name.replace("-", "_")
    return endpoint


def _public_endpoint(op: Operation) -> Any:
    """An operation answered without a token (Operation.public): it runs as Actor.anonymous()."""

    async def endpoint(request: Request) -> Response:
        services: Services = request.app.state.services
        data = query_object(request) if op.method == "GET" else await read_json_object(request)
        outcome = await run_in_threadpool(services.store.execute, op.name, Actor.anonymous(), data)
        if op.name in FILE_ANSWERS:
            media, body, name = FILE_ANSWERS[op.name]
            disposition = f'attachment; filename="{outcome.result[name]}"'
            return Response(outcome.result[body], media_type=media, headers={"Content-Disposition": disposition})
        return JSONResponse(outcome.result)

    endpoint.__name__ = op.name.replace("-", "_")
    return endpoint


def build_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    for op in OPERATIONS.values():
        tags: list[str | Enum] = ["admin" if op.admin else "email-account"]
        if not op.in_spec:
            tags.append("extension")
        statuses = success_statuses(op)
        file_answer = op.name in FILE_ANSWERS
        router.add_api_route(
            f"/{op.name}",
            _endpoint(op),
            methods=[op.method],
            summary=op.summary,
            description=_description(op),
            operation_id=op.name,
            tags=tags,
            # Documentation only: the endpoint answers a JSONResponse itself, so FastAPI does
            # not re-serialise; tests hold every real answer to this model.
            response_model=None if file_answer else RESPONSES.get(op.name),
            status_code=statuses[0],
            response_description={201: "Success (201: created).", 202: "Accepted: the nodes carry it out."}.get(
                statuses[0], "Success."
            ),
            responses=_error_responses(op),
            openapi_extra=_openapi_extra(op),
            response_class=Response if file_answer else JSONResponse,
        )
    return router


def _description(op: Operation) -> str:
    # The same text as the MCP tool's (state.describe), with the default settings' values.
    lines = [describe(op), ""]
    if op.public:
        lines += ["No token needed: mail clients call it.", ""]
    if op.in_spec:
        lines.append(f"MCP tool: `{op.tool_name}`.")
    return "\n".join(lines)


def health_router() -> APIRouter:
    router = APIRouter()

    @router.get(
        "/v1/health",
        tags=["health"],
        operation_id="health",
        summary="Liveness: the status for anyone, no token needed; with an admin token also the head, mode and a refused commit's problems.",
        description="No token is needed: without one (or with a project token) the answer is `status` only, which names "
        "no project, domain or mailbox. An admin token adds the details. A token that is given must be valid (401).",
        # Anonymous or bearer (`{}` is OpenAPI's "no authentication"): the dependency alone would
        # make FastAPI document the bearer token as required.
        openapi_extra={"security": [{}]},
        response_model=HealthResponse,
        response_model_exclude_none=True,
        responses={
            401: {
                "model": ErrorResponse,
                "description": "A bearer token was given and is not valid (give none for the status only).",
            },
            405: {"model": ErrorResponse, "description": "Only GET is accepted."},
        },
    )
    async def health(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> JSONResponse:
        services: Services = request.app.state.services
        body = services.store.health()
        # A refused commit's problems name files, domains and mailboxes: only admins see them.
        if (
            credentials is None
            or not credentials.credentials
            or not services.authenticate(credentials.credentials).is_admin
        ):
            body = {"status": body["status"]}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router


def metrics_router() -> APIRouter:
    router = APIRouter()

    @router.get(
        "/metrics",
        tags=["health"],
        operation_id="metrics",
        summary="[Admin] Prometheus metrics: writes and their latency by operation, refused commits, node lag and status.",
        response_class=Response,
        responses={
            200: {
                "description": "The Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            401: {"model": ErrorResponse, "description": "No valid bearer token."},
            403: {"model": ErrorResponse, "description": "An admin token is required (the figures name every node)."},
            405: {"model": ErrorResponse, "description": "Only GET is accepted."},
        },
    )
    async def metrics(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Response:
        services: Services = request.app.state.services
        if not services.authenticate(_token(credentials)).is_admin:
            raise Forbidden("The metrics need an admin token.", code="admin_required")
        if services.metrics is None:
            raise HTTPError(404, "not_found", "There is no such endpoint.")
        body, ctype = await run_in_threadpool(services.metrics.render)
        return Response(body, media_type=ctype, headers={"Cache-Control": "no-store"})

    return router
