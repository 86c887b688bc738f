"""What `mailstate serve` answers mail clients and sending servers, without a token.

    GET  /mail/config-v1.1.xml?emailaddress=                   Thunderbird autoconfig
    GET  /.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=   (the same, newer path)
    POST /autodiscover/autodiscover.xml                        Outlook autodiscover (POX)
    GET  /.well-known/mta-sts.txt   (Host: mta-sts.<domain>)   the MTA-STS policy

The Apple profile is the `mobileconfig` operation (api.http, /v1/email-account/mobileconfig).
Everything is rendered by state.autoconfig and state.dns from the snapshot and the `dns:`
settings; the answer for any address of an email-enabled domain is the same, other domains
get 404. Errors have the one shape (api.http_errors). These hosts are reached over HTTPS
through a proxy that holds certificates for autoconfig.<domain>, autodiscover.<domain> and
mta-sts.<domain> (docs/onboarding.md).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mailstate.api.http import ErrorResponse, Services, query_object, read_limited
from mailstate.state import autoconfig as ac
from mailstate.state import validate as v
from mailstate.state.errors import InvalidInput, NotFound

THUNDERBIRD_PATHS = ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml")
AUTODISCOVER_PATHS = ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml")
MTA_STS_PATH = "/.well-known/mta-sts.txt"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "The address (or the request) is not valid.",
        404: "The domain has no mail service here (or is not known).",
        405: "Another HTTP method than the one documented.",
        409: "The server has no `dns:` settings to answer from.",
        413: "The request body is too large.",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


def _file(media: str, title: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {media: {"schema": {"type": "string", "title": title}}}}}


def _host_domain(request: Request, prefix: str) -> str | None:
    """The domain in a Host header `<prefix><domain>[:port]`, normalised; None if it is not one."""
    host = request.headers.get("host", "").strip().lower().split(":", 1)[0].rstrip(".")
    if not host.startswith(prefix):
        return None
    try:
        return v.normalize_domain(host[len(prefix) :])
    except InvalidInput:
        return None


def _thunderbird_settings(request: Request) -> ac.ClientSettings:
    services: Services = request.app.state.services
    params = query_object(request)
    state = services.store.current()
    if "emailaddress" in params:
        return ac.client_settings(state, params["emailaddress"], field="emailaddress")
    domain = _host_domain(request, "autoconfig.")
    if domain is None:
        raise InvalidInput(
            "Give the address as ?emailaddress=, or ask autoconfig.<domain>.",
            code="missing_field",
            field="emailaddress",
        )
    return ac.domain_settings(state, domain)


def build_router() -> APIRouter:
    router = APIRouter(tags=["onboarding"])

    async def thunderbird(request: Request) -> Response:
        return Response(ac.thunderbird_xml(_thunderbird_settings(request)), media_type="application/xml")

    for path in THUNDERBIRD_PATHS:
        router.add_api_route(
            path,
            thunderbird,
            methods=["GET"],
            operation_id="autoconfig" + ("_well_known" if path.startswith("/.well-known") else ""),
            summary="Thunderbird autoconfig (config-v1.1.xml) for an address of an email-enabled domain. No token.",
            description="`emailaddress`: the address being set up (or ask `autoconfig.<domain>` without it). Every "
            "address of the domain gets the same answer; the login is the full address (%EMAILADDRESS%).",
            responses={
                **_file("application/xml", "ClientConfigXml", "clientConfig 1.1"),
                **_errors(400, 404, 405, 409),
            },
            response_class=Response,
            openapi_extra={
                "security": [{}],
                "parameters": [
                    {
                        "name": "emailaddress",
                        "in": "query",
                        "required": False,
                        "description": "The address being set up, e.g. info@mycompany.nl.",
                        "schema": {"type": "string", "maxLength": 318},
                    }
                ],
            },
        )

    async def autodiscover(request: Request) -> Response:
        services: Services = request.app.state.services
        email = ac.autodiscover_email(await read_limited(request, ac.MAX_AUTODISCOVER_BYTES))
        settings = ac.client_settings(services.store.current(), email, field="EMailAddress")
        return Response(ac.autodiscover_xml(settings), media_type="application/xml")

    for path in AUTODISCOVER_PATHS:
        router.add_api_route(
            path,
            autodiscover,
            methods=["POST"],
            operation_id="autodiscover" + ("_capitalised" if path[1] == "A" else ""),
            summary="Outlook autodiscover (POX, responseschema 2006a): IMAP and SMTP over TLS. No token.",
            description="The body is Outlook's request (`Autodiscover/Request/EMailAddress`, at most "
            f"{ac.MAX_AUTODISCOVER_BYTES} bytes, no DTD).",
            openapi_extra={
                "security": [{}],
                "requestBody": {
                    "required": True,
                    "content": {"text/xml": {"schema": {"type": "string", "title": "AutodiscoverRequestXml"}}},
                },
            },
            responses={
                **_file("application/xml", "AutodiscoverXml", "The Autodiscover answer."),
                **_errors(400, 404, 405, 409, 413),
            },
            response_class=Response,
        )

    @router.get(
        MTA_STS_PATH,
        operation_id="mta_sts_policy",
        summary="The MTA-STS policy (RFC 8461) for `Host: mta-sts.<domain>`. No token.",
        description="The mode from `dns.mta_sts_mode`, one `mx:` line per MX host; `_mta-sts.<domain>` carries its id.",
        responses={**_file("text/plain", "MtaStsPolicy", "The policy."), **_errors(404, 405, 409)},
        response_class=Response,
        openapi_extra={"security": [{}]},
    )
    async def mta_sts(request: Request) -> Response:
        services: Services = request.app.state.services
        domain = _host_domain(request, "mta-sts.")
        if domain is None:
            raise NotFound("There is no MTA-STS policy for this host.", code="domain_not_found")
        return Response(ac.mta_sts_policy(services.store.current(), domain), media_type="text/plain")

    return router
