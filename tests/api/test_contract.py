"""The published contract is what the server does.

- The request schemas (OpenAPI, and the MCP tools' input schemas, which are the same) are never
  looser than the validators: requests GENERATED from the live server's /openapi.json never get
  a 400 or 422; only state-dependent 403/404/409 may answer. The generator (`strategy`) reads
  the JSON Schema keywords our models publish and refuses any other, so a new keyword cannot be
  skipped silently; every generated request is also checked with jsonschema's validator.
  (hypothesis-jsonschema would do, but its last release does not run on today's Hypothesis.)
- Every operation's security requirement is true: a required token is required (401 without
  one), and /v1/health and the mail-client pages (autoconfig, autodiscover, the Apple profile,
  the MTA-STS policy), documented as open, answer without one.
- A 405 (OPTIONS included) names in `Allow` exactly the methods the path serves.
- The MCP tool list in docs/api.md (the README links there) is the server's.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import idna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from mailstate.api.mcp_server import TOOLS
from mailstate.state.ops import OPERATIONS
from tests.helpers.mcp import http_session
from tests.helpers.server import LiveServer, assert_error

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
# Concrete URLs for the templated paths (a request must reach the route's own checks), and for
# the open pages, whose answer needs an address.
AUTOCONFIG = "emailaddress=info@mycompany.nl"
CONCRETE = {"/v1/nodes/state.git/{path}": {"get": "/v1/nodes/state.git/info/refs?service=git-upload-pack",
                                           "post": "/v1/nodes/state.git/git-upload-pack"},
            f"{API}/mobileconfig": {"get": f"{API}/mobileconfig?email=info@mycompany.nl"},
            "/mail/config-v1.1.xml": {"get": f"/mail/config-v1.1.xml?{AUTOCONFIG}"},
            "/.well-known/autoconfig/mail/config-v1.1.xml": {
                "get": f"/.well-known/autoconfig/mail/config-v1.1.xml?{AUTOCONFIG}"}}  # fmt: skip
OUTLOOK = (
    b'<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    b"<Request><EMailAddress>info@mycompany.nl</EMailAddress></Request></Autodiscover>"
)
# What else a request to an open page carries: Outlook's body, the MTA-STS policy's Host.
EXTRAS: dict[str, dict[str, Any]] = {
    "/autodiscover/autodiscover.xml": {"content": OUTLOOK},
    "/Autodiscover/Autodiscover.xml": {"content": OUTLOOK},
    "/.well-known/mta-sts.txt": {"headers": {"Host": "mta-sts.mycompany.nl"}},
}
OPEN = {"/v1/health", f"{API}/mobileconfig", "/.well-known/mta-sts.txt", *CONCRETE, *EXTRAS} - {
    "/v1/nodes/state.git/{path}"
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("contract"))
    # A dns: block, so the open pages answer; check-dns's lookups go to a closed port and give up
    # fast (what DNS holds is tests/api/test_check_dns.py's business), and no background check runs.
    server.cli("init", "--data", str(server.data.root), "--bcrypt-cost", "4", "--mx-host", "mx1.mycompany.nl")
    server.admin_token = server.create_token(name="admin")
    # Webhooks: the schema cannot say which hosts are public, so the server takes any (and the
    # add-webhook case removes what it registered, so nothing is ever delivered anywhere).
    server.env.update(
        MAILSTATE_DNS_RESOLVER="127.0.0.1:9",
        MAILSTATE_DNS_TIMEOUT="0.05",
        MAILSTATE_DNS_CHECK_INTERVAL="0",
        MAILSTATE_WEBHOOK_ALLOW_PRIVATE="1",
    )
    server.start()
    try:
        admin = server.client(server.admin_token)
        # Some state for generated requests to meet (most still name things that do not exist).
        for domain in ("mycompany.nl", "xn--bcher-kva.example"):
            admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": 1}).raise_for_status()
            admin.post(f"{API}/enable-email", json={"domain": domain}).raise_for_status()
        admin.post(f"{API}/add-user", json={"email": "info@mycompany.nl", "password": "12345678"}).raise_for_status()
        admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def spec(srv: LiveServer) -> dict[str, Any]:
    return dict(httpx.get(f"{srv.url}/openapi.json").json())


# --- the schemas are never looser than the server ---------------------------------------------------


def _idn_ok(host: str) -> bool:
    try:
        idna.encode(host)
    except (idna.IDNAError, UnicodeError):
        return False
    return True


# JSON Schema's idn-hostname / idn-email (RFC 5890/6531): an xn-- label must be valid punycode of
# an allowed name. jsonschema's own idn-email checker only looks for an "@".
FORMATS = FormatChecker()
FORMATS.checks("idn-hostname")(_idn_ok)
FORMATS.checks("idn-email")(lambda value: isinstance(value, str) and _idn_ok(value.rpartition("@")[2]))

VALID_IDN = ["xn--bcher-kva.example", "xn--mnchen-3ya.de", "mail.xn--fiqs8s"]


_A_LABEL = re.compile(r"\(\?:(?:\[Xx\]\[Nn\]|xn)--\[[^\]]+\]\(\?:\[[^\]]+\]\{0,57\}\[[^\]]+\]\)\?\|")


# Annotations: they say nothing about which values are valid.
ANNOTATIONS = {"title", "description", "examples", "default", "writeOnly", "readOnly"}
EMAILS = [*(f"info@{d}" for d in VALID_IDN), "anna@mycompany.nl"]


KEYWORDS = {
    "string": {"pattern", "format", "minLength", "maxLength"},
    "integer": {"minimum", "maximum"},
    # No multipleOf: most validators divide floats and call 0.3 no multiple of 0.1.
    "number": {"minimum", "maximum"},
    "boolean": set(),
    "null": set(),
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
    "object": {"properties", "required", "additionalProperties"},
}


def _ecma(pattern: str) -> str:
    """A JSON Schema pattern for Python's re: ECMA 262's `$` is the end of the input, Python's
    also matches before a final newline (none of our patterns has a literal `$`)."""
    return pattern.replace("$", r"\Z")


def strategy(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for `schema` (the subset of JSON Schema our request models publish)."""
    keys = {k for k in schema if k not in ANNOTATIONS and not k.startswith("x-")}
    if "anyOf" in keys:
        base = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of(*(strategy({**base, **branch}) for branch in schema["anyOf"]))
    if "oneOf" in keys:
        # `oneOf: [{required: [a]}, {required: [b]}]` (exactly one of the fields): each branch
        # requires its field and leaves out the fields the other branches require.
        base = {k: v for k, v in schema.items() if k != "oneOf"}
        branches = []
        for branch in schema["oneOf"]:
            assert set(branch) == {"required"}, branch
            others = {f for b in schema["oneOf"] if b is not branch for f in b["required"]}
            props = {k: v for k, v in base.get("properties", {}).items() if k not in others}
            required = [*base.get("required", []), *branch["required"]]
            branches.append(strategy({**base, "properties": props, "required": required}))
        return st.one_of(*branches)
    kind = schema.get("type")
    if "enum" in keys:
        return st.sampled_from(schema["enum"])
    unknown = keys - {"type"} - set().union(*KEYWORDS.values())
    assert kind in KEYWORDS and not unknown, f"the generator does not know {sorted(unknown)} ({kind})"
    # A keyword of another type does not apply (JSON Schema: `minimum` says nothing of a null).
    schema = {k: val for k, val in schema.items() if k in KEYWORDS[kind] or k not in keys}
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return _number(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(
            strategy(schema["items"]),
            min_size=schema.get("minItems", 0),
            max_size=schema.get("maxItems"),
            unique=bool(schema.get("uniqueItems")),
        )
    assert schema.get("additionalProperties") is False
    props = {name: strategy(sub) for name, sub in schema.get("properties", {}).items()}
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {k: s for k, s in props.items() if k in required},
        optional={k: s for k, s in props.items() if k not in required},
    )


def _number(schema: dict[str, Any]) -> st.SearchStrategy[float]:
    """Any finite number within the bounds, whole ones too (the server rounds what it keeps)."""
    lo, hi = schema["minimum"], schema["maximum"]
    return st.one_of(st.integers(math.ceil(lo), math.floor(hi)).map(float), st.floats(lo, hi))


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    pattern, fmt = schema.get("pattern"), schema.get("format")
    lo, hi = schema.get("minLength", 0), schema.get("maxLength", 10**6)
    if fmt in ("ipv4", "ipv6"):
        base: st.SearchStrategy[str] = st.ip_addresses(v=int(fmt[-1])).map(str)
    elif fmt in ("idn-hostname", "idn-email"):
        # The pattern's xn-- branch would mostly make random, invalid punycode (which the format
        # refuses), so the random part leaves it out and valid A-labels come from samples.
        plain = _A_LABEL.sub("(?:", pattern)
        assert plain != pattern, "the published pattern changed shape"
        samples = VALID_IDN if fmt == "idn-hostname" else EMAILS
        base = st.one_of(st.from_regex(_ecma(plain)), st.sampled_from(samples))
    elif pattern is not None:
        base = st.from_regex(_ecma(pattern))
    else:
        assert fmt in (None, "password"), fmt
        base = st.text(min_size=lo, max_size=min(hi, 100))
    return base.filter(
        lambda s: (
            lo <= len(s) <= hi
            and (pattern is None or re.search(_ecma(pattern), s) is not None)
            and (fmt is None or FORMATS.conforms(s, fmt))
        )
    )


def _request_schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    op = OPERATIONS[name]
    doc = spec["paths"][f"{API}/{name}"][op.method.lower()]
    if op.method == "POST":
        ref = doc["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = copy.deepcopy(spec["components"]["schemas"][ref.rsplit("/", 1)[1]])
    else:
        params = doc.get("parameters", [])
        schema = {
            "type": "object",
            "properties": {p["name"]: copy.deepcopy(p["schema"]) for p in params},
            "required": [p["name"] for p in params if p["required"]],
            "additionalProperties": False,
        }
    # A cursor is opaque: its only valid values are the server's own next_cursor.
    schema.get("properties", {}).pop("cursor", None)
    return schema


def _send(client: httpx.Client, name: str, body: dict[str, Any]) -> httpx.Response:
    if OPERATIONS[name].method == "GET":
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items() if v is not None}
        return client.get(f"{API}/{name}", params=params)
    return client.post(f"{API}/{name}", json=body)


# Rules across two fields that the published schema does not express (JSON Schema has no "below
# the other field"): the only 400s a schema-obeying request may get, each by its sentence.
CROSS_FIELD = {
    "set-spam-policy": ("scores need an action", "must be below reject_score"),
}


def _cross_field(name: str, r: httpx.Response) -> bool:
    message = str(r.json().get("error", {}).get("message", ""))
    return any(sentence in message for sentence in CROSS_FIELD.get(name, ()))


STATE_DEPENDENT = {200, 201, 202, 403, 404, 409}  # 202: move-domain


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_request_that_obeys_the_published_schema_is_never_refused_as_invalid(
    srv: LiveServer, spec: dict[str, Any], name: str
) -> None:
    schema = _request_schema(spec, name)
    validator = Draft202012Validator(schema, format_checker=FORMATS)
    client = srv.client(srv.admin_token)
    wrong: list[str] = []

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(strategy(schema))
    def check(body: dict[str, Any]) -> None:
        assert validator.is_valid(body), list(validator.iter_errors(body))[:1]
        r = _send(client, name, body)
        if r.status_code == 400 and _cross_field(name, r):
            return
        if r.status_code not in STATE_DEPENDENT:
            wrong.append(f"{name} {json.dumps(body)[:300]} -> {r.status_code} {r.text[:300]}")

    try:
        check()
        if name == "add-webhook":
            for hook in client.get(f"{API}/list-webhooks").json()["webhooks"]:
                assert client.post(f"{API}/remove-webhook", json={"id": hook["id"]}).status_code == 200
    finally:
        client.close()
    assert not wrong, "\n".join(wrong[:10])


def test_the_mcp_tools_publish_the_same_input_schemas(srv: LiveServer, spec: dict[str, Any]) -> None:
    async def main() -> dict[str, Any]:
        async with http_session(srv, srv.admin_token) as session:
            return {t.name: t.input_schema for t in (await session.list_tools()).tools}

    served = anyio.run(main)
    assert set(served) == set(TOOLS)
    for tool, op in TOOLS.items():
        assert served[tool] == op.request.model_json_schema(), tool
        if op.method == "POST":
            assert served[tool] == spec["components"]["schemas"][op.request.__name__], tool


def test_the_schemas_refuse_what_the_server_refuses(spec: dict[str, Any]) -> None:
    """The issue's cases, each against the published schema (with its formats)."""
    schemas = spec["components"]["schemas"]

    def valid(model: str, body: dict[str, Any]) -> bool:
        return Draft202012Validator(schemas[model], format_checker=FORMATS).is_valid(body)

    for domain in ("a_b.example", "a" * 64 + ".example", "example.123", "xn--a.example", "ab--c.example"):
        assert not valid("AddDomainRequest", {"domain": domain}), domain
    assert valid("AddDomainRequest", {"domain": "xn--bcher-kva.example"})
    assert valid("AddDomainRequest", {"domain": "a" * 63 + ".example"})
    dests = {"address": "x@mycompany.nl", "destinations": ["a@mycompany.nl", "a@mycompany.nl"]}
    assert not valid("AddAliasRequest", dests)
    assert not valid(
        "AddAliasRequest", {"address": "x@mycompany.nl", "destinations": ["A@mycompany.nl", "a@mycompany.nl"]}
    )
    for ip in ("not-an-ip", "::1%eth0", "1.2.3.4.5", "01.2.3.4"):
        assert not valid("AddNodeRequest", {"name": "n1", "ip_address": ip}), ip
    assert valid("AddNodeRequest", {"name": "n1", "ip_address": "2001:db8::1"})
    for email in ("a..b@mycompany.nl", "a.@mycompany.nl", "x" * 65 + "@mycompany.nl", "\u212aelvin@mycompany.nl"):
        assert not valid("AddUserRequest", {"email": email, "password": "12345678"}), email
    assert not valid("AddUserRequest", {"email": "a@mycompany.nl", "password": "1234567"})
    assert not valid("AddUserRequest", {"email": "a@mycompany.nl", "password": "\u00e9" * 19 + "a" * 30})


# --- security requirements --------------------------------------------------------------------------


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def test_every_operation_needs_exactly_the_credentials_it_documents(srv: LiveServer, spec: dict[str, Any]) -> None:
    assert "security" not in spec  # no global requirement: each operation says its own
    open_ops = []
    for path, method, op in _operations(spec):
        url = CONCRETE.get(path, {}).get(method, path)
        security = op.get("security", [])
        assert security, (method, path)
        r = httpx.request(method.upper(), f"{srv.url}{url}", timeout=30, **EXTRAS.get(path, {}))
        if {} in security:
            open_ops.append(path)
            assert r.status_code == 200, (method, path, r.text)
        else:
            assert_error(r, 401, "unauthenticated")
    assert set(open_ops) == OPEN and len(open_ops) == len(OPEN)


def test_health_answers_without_a_token_and_says_only_its_status(srv: LiveServer, spec: dict[str, Any]) -> None:
    doc = spec["paths"]["/v1/health"]["get"]
    assert {} in doc["security"] and {"BearerToken": []} in doc["security"]
    assert httpx.get(f"{srv.url}/v1/health").json() == {"status": "ok"}
    project = srv.create_token(project=1, name="health")
    assert httpx.get(f"{srv.url}/v1/health", headers={"Authorization": f"Bearer {project}"}).json() == {"status": "ok"}
    admin = httpx.get(f"{srv.url}/v1/health", headers={"Authorization": f"Bearer {srv.admin_token}"}).json()
    assert admin["status"] == "ok" and admin["head"]
    assert_error(httpx.get(f"{srv.url}/v1/health", headers={"Authorization": "Bearer nope"}), 401)


# --- Allow ------------------------------------------------------------------------------------------


def test_a_405_names_every_method_the_path_serves(srv: LiveServer, spec: dict[str, Any]) -> None:
    for path, methods in spec["paths"].items():
        documented = {m.upper() for m in methods}
        url = next(iter(CONCRETE.get(path, {}).values()), path)
        for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
            r = httpx.request(method, f"{srv.url}{url}", timeout=30)
            assert_error(r, 405, "method_not_allowed")
            allowed = {m.strip() for m in r.headers["allow"].split(",")} - {"HEAD"}
            assert allowed == documented, (method, path, r.headers["allow"])


# --- the docs -------------------------------------------------------------------------------------


def test_the_docs_list_the_mcp_tools_the_server_lists() -> None:
    text = API_DOC.read_text()
    match = re.search(r"The (\d+) tools \(([^)]*)\)", text)
    assert match, "docs/api.md's MCP section starts 'The N tools (...)'"
    assert int(match.group(1)) == len(TOOLS)
    named = re.findall(r"`(email_account_[a-z_]+)`", match.group(2))
    assert named == list(TOOLS), "docs/api.md names every tool, in the server's order"
