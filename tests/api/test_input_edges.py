"""Bad input that used to get through, refused on every path that takes it.

- A domain that IDNA 2008 cannot decode (`xn--a.example`, `xn--zz-zzzzz.example`, a reserved
  `ab--c` label): one rule in state/validate.normalize_domain, so write time and `check` agree.
- A JSON object naming a key twice: 400 duplicate_key on every HTTP route, the node report,
  every MCP tool over /mcp and stdio (raw JSON-RPC: the official client cannot send one), and
  `mailstate call`.
- A non-ASCII look-alike in a local part (KELVIN SIGN) is refused, never folded into another
  mailbox's address.
- A password with a lone surrogate: a clear 400 that shows neither the codec's message nor any
  part of the password; no error message echoes an input it was given.

Everything runs against a real `mailstate serve` (tests/helpers/server.py) or the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstate.api import strict_json
from mailstate.state import validate as v
from mailstate.state.audit import filter_log
from mailstate.state.errors import InvalidInput
from mailstate.state.files import domain_path
from mailstate.state.models import AddUserRequest, DomainFile, parse
from mailstate.state.ops import OPERATIONS
from tests.helpers.server import LiveServer, assert_error, live_server, mailstate_cmd

API = "/v1/email-account"
PASSWORD = "correct horse battery"
BAD_PUNYCODE = ["xn--a.example", "xn--zz-zzzzz.example", "ab--cd.example", "mail.xn--a.example"]
KELVIN = "\u212aelvin"  # KELVIN SIGN + "elvin": str.lower() makes it "kelvin"


class World:
    """Project 42 owns k.example (email on) with mailbox kelvin@, alias sales@, and k2.example."""

    def __init__(self, srv: LiveServer) -> None:
        self.srv = srv
        self.token = srv.create_token(project=42, name="edges")
        self.admin = srv.client(srv.admin_token)
        self.p = srv.client(self.token)
        for domain in ("k.example", "k2.example"):
            ok(self.admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": 42}))
            ok(self.p.post(f"{API}/enable-email", json={"domain": domain}))
        ok(self.p.post(f"{API}/add-user", json={"email": "kelvin@k.example", "password": PASSWORD}))
        ok(self.p.post(f"{API}/add-alias", json={"address": "sales@k.example", "destinations": ["kelvin@k.example"]}))

    def head(self) -> str:
        return self.srv.git("rev-parse", "main").strip()

    def raw(self, name: str, body: bytes, client: httpx.Client | None = None) -> httpx.Response:
        return (client or self.admin).post(f"{API}/{name}", content=body, headers={"content-type": "application/json"})


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with live_server(tmp_path_factory.mktemp("edges")) as srv:
        w = World(srv)
        yield w
        w.admin.close()
        w.p.close()


# --- invalid punycode --------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("domain", BAD_PUNYCODE)
def test_invalid_punycode_is_refused_on_every_path_that_takes_a_domain(world: World, domain: str) -> None:
    before = world.head()
    calls: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
        ("admin", "add-domain", {"domain": domain}, ("invalid_domain",)),
        ("admin", "add-domain", {"domain": domain, "project_id": 42}, ("invalid_domain",)),
        ("admin", "link-domain", {"domain": domain, "project_id": 42}, ("invalid_domain",)),
        ("admin", "unlink-domain", {"domain": domain}, ("invalid_domain",)),
        ("admin", "remove-domain", {"domain": domain}, ("invalid_domain",)),
        ("p", "enable-email", {"domain": domain}, ("invalid_domain",)),
        ("p", "disable-email", {"domain": domain}, ("invalid_domain",)),
        ("p", "add-user", {"email": f"info@{domain}", "password": PASSWORD}, ("invalid_email",)),
        ("p", "remove-user", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("p", "restore-user", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("p", "update-password", {"email": f"info@{domain}", "password": PASSWORD}, ("invalid_email",)),
        ("p", "remove-alias", {"address": f"x@{domain}"}, ("invalid_email",)),
        ("p", "remove-alias-domain", {"domain": domain}, ("invalid_domain",)),
        ("p", "add-alias", {"address": f"x@{domain}", "destinations": ["kelvin@k.example"]}, ("invalid_email",)),
        ("p", "add-alias", {"address": f"@{domain}", "destinations": ["kelvin@k.example"]}, ("invalid_email",)),
        ("p", "add-alias", {"address": "new@k.example", "destinations": [f"out@{domain}"]}, ("invalid_email",)),
        ("p", "update-alias", {"address": "sales@k.example", "destinations": [f"out@{domain}"]}, ("invalid_email",)),
        ("p", "set-forwarding", {"email": "kelvin@k.example", "destinations": [f"out@{domain}"]}, ("invalid_email",)),
        ("p", "add-alias-domain", {"domain": domain, "target": "k.example"}, ("invalid_domain",)),
        ("p", "add-alias-domain", {"domain": "k2.example", "target": domain}, ("invalid_domain",)),
        ("p", "list-users", {"domain": domain}, ("invalid_domain",)),
        ("p", "list-aliases", {"domain": domain}, ("invalid_domain",)),
        ("p", "dns-records", {"domain": domain}, ("invalid_domain",)),
        ("admin", "add-node", {"name": "edge", "address": f"mx.{domain}"}, ("invalid_address",)),
        ("admin", "set-node-address", {"name": "edge", "address": domain}, ("invalid_address",)),
        ("admin", "move-domain", {"domain": domain, "node": "edge"}, ("invalid_domain",)),
        ("p", "check-dns", {"domain": domain}, ("invalid_domain",)),
        ("p", "mobileconfig", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("p", "set-vacation", {"email": f"info@{domain}", "enabled": False}, ("invalid_email",)),
        ("p", "set-filters", {"email": f"info@{domain}", "filters": []}, ("invalid_email",)),
        ("p", "set-filters", {"email": "kelvin@k.example", "filters": [
            {"name": "n", "field": "to", "op": "is", "value": "v", "action": "redirect", "target": f"out@{domain}"}
        ]}, ("invalid_email",)),
        ("p", "list-filters", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("p", "add-app-password", {"email": f"info@{domain}", "name": "n", "scopes": ["imap"]}, ("invalid_email",)),
        ("p", "list-app-passwords", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("p", "remove-app-password", {"email": f"info@{domain}", "name": "n"}, ("invalid_email",)),
        ("admin", "set-limits", {"domain": domain, "max_mailboxes": 5}, ("invalid_domain",)),
        ("p", "list-limits", {"domain": domain}, ("invalid_domain",)),
        ("p", "set-quota", {"email": f"info@{domain}", "quota_mb": 100}, ("invalid_email",)),
        ("p", "suspend-sending", {"email": f"info@{domain}", "reason": "spam"}, ("invalid_email",)),
        ("p", "resume-sending", {"email": f"info@{domain}"}, ("invalid_email",)),
        ("admin", "set-replica", {"domain": domain, "node": "edge"}, ("invalid_domain",)),
        ("p", "set-spam-policy", {"domain": domain, "action": "junk"}, ("invalid_domain",)),
        ("p", "set-spam-policy", {"email": f"info@{domain}", "action": "junk"}, ("invalid_email",)),
        ("p", "list-spam-policy", {"domain": domain}, ("invalid_domain",)),
        ("p", "add-sender-rule", {"domain": domain, "sender": "@k.example", "action": "block"}, ("invalid_domain",)),
        ("p", "add-sender-rule", {"domain": "k.example", "sender": f"x@{domain}", "action": "block"},
         ("invalid_sender_rule",)),
        ("p", "list-sender-rules", {"domain": domain}, ("invalid_domain",)),
        ("p", "remove-sender-rule", {"email": f"info@{domain}", "sender": "@k.example"}, ("invalid_email",)),
    ]  # fmt: skip
    assert {name for _who, name, _body, _codes in calls} >= {n for n, op in OPERATIONS.items() if _takes_domain(n)}
    for who, name, body, codes in calls:
        client = world.admin if who == "admin" else world.p
        op = OPERATIONS[name]
        r = client.get(f"{API}/{name}", params=body) if op.method == "GET" else client.post(f"{API}/{name}", json=body)
        err = assert_error(r, 400)
        assert err["code"] in codes, (name, body, err)
        assert "internationalised" in err["message"], (name, err)
    assert world.head() == before  # nothing was written


def _takes_domain(name: str) -> bool:
    """Operations whose request names a domain (directly, or in an address)."""
    fields = set(OPERATIONS[name].request.model_fields)
    return bool(fields & {"domain", "email", "address", "destinations", "target"})


def test_every_domain_the_server_accepts_is_one_idna_can_decode() -> None:
    @settings(max_examples=400, deadline=None)
    @given(st.from_regex(r"\A(?:(?:xn--)?[a-z0-9-]{1,8}\.){1,3}(?:xn--)?[a-z0-9-]{1,6}\Z"))
    def check(name: str) -> None:
        try:
            accepted = v.normalize_domain(name) == name
        except InvalidInput:
            return
        assert accepted
        assert idna.encode(idna.decode(name)).decode() == name, name

    check()
    for name in BAD_PUNYCODE:
        with pytest.raises(InvalidInput) as info:
            v.normalize_domain(name)
        assert info.value.code == "invalid_domain"
    assert v.normalize_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert v.normalize_domain("bücher.example") == "xn--bcher-kva.example"
    assert v.normalize_domain("XN--BCHER-KVA.Example") == "xn--bcher-kva.example"
    assert v.normalize_domain("a--b.example") == "a--b.example"  # `--` elsewhere is an ordinary label


@pytest.mark.e2e
def test_check_refuses_a_state_file_with_invalid_punycode(tmp_path: Path) -> None:
    """Write time and `check` are one rule: the domain file model (what `mailstate check` and the
    validation of incoming commits load) refuses the same names, through the real CLI."""
    for name in BAD_PUNYCODE:
        with pytest.raises(ValueError, match=r"lowercase ASCII|internationalised"):
            DomainFile.model_validate({"domain": name})
        with pytest.raises(ValueError):
            DomainFile.model_validate({"domain": "ok.example", "alias_of": name})
    data = tmp_path / "data"
    run_cli("init", "--data", str(data))
    run_cli("call", "--data", str(data), "add-domain", "domain=good.example")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(data / "state.git"), str(clone)], check=True)
    good = clone / domain_path("good.example")
    bad = clone / domain_path("xn--a.example")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(good.read_text().replace("good.example", "xn--a.example"))
    r = run_cli("check", str(clone), check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "xn--a.example" in out and "internationalised" in out, out


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*mailstate_cmd(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


# --- duplicate keys ------------------------------------------------------------------------------


def _duplicated_body(name: str) -> bytes:
    """A body for `name` whose first field is given twice (a valid value both times)."""
    samples = {
        "domain": '"k.example"',
        "email": '"kelvin@k.example"',
        "address": '"sales@k.example"',
        "name": '"nodex"',
        "project_id": "42",
        "target": '"k.example"',
        "destinations": '["kelvin@k.example"]',
        "limit": "10",
        "url": '"https://93.184.215.14/h"',
        "id": '"wh_x"',
    }
    fields = list(OPERATIONS[name].request.model_fields)
    if not fields:  # a request of no fields (list-webhooks): the parse refuses the twice-named key first
        return b'{"x": 1, "x": 1}'
    first = fields[0]
    return f'{{"{first}": {samples[first]}, "{first}": {samples[first]}}}'.encode()


@pytest.mark.e2e
def test_duplicate_keys_are_refused_on_every_post_route(world: World) -> None:
    before = world.head()
    posts = [n for n, op in OPERATIONS.items() if op.method == "POST"]
    assert len(posts) >= 18
    for name in posts:
        err = assert_error(world.raw(name, _duplicated_body(name)), 400, "duplicate_key")
        assert err["field"] == next(iter(OPERATIONS[name].request.model_fields)), err
    # The case: the first email names one mailbox, the second another; last-wins would
    # have hard-deleted the second.
    body = b'{"email": "nobody@k.example", "email": "kelvin@k.example", "hard_delete": true}'
    assert_error(world.raw("remove-user", body, world.p), 400, "duplicate_key")
    # A repeated key deeper down, and in a GET's query string.
    body = b'{"address": "new@k.example", "destinations": ["kelvin@k.example"], "x": {"a": 1, "a": 2}}'
    assert_error(world.raw("add-alias", body, world.p), 400, "duplicate_key")
    r = world.p.get(f"{API}/list-users?domain=k.example&domain=k2.example")
    assert_error(r, 400, "invalid_request")
    assert world.head() == before
    users = ok(world.p.get(f"{API}/list-users", params={"domain": "k.example"}))["users"]
    assert [u["email"] for u in users if u["active"]] == ["kelvin@k.example"]


@pytest.mark.e2e
def test_duplicate_keys_are_refused_in_a_node_report(world: World) -> None:
    key = ok(world.admin.post(f"{API}/add-node", json={"name": "edge-node"}))["sync_key"]
    auth = ("edge-node", key)
    url = f"{world.srv.url}/v1/nodes/report"
    body = b'{"status": "ok", "status": "error", "error": "x"}'
    r = httpx.post(url, content=body, auth=auth, headers={"content-type": "application/json"})
    assert_error(r, 400, "duplicate_key")
    r = httpx.post(url, json={"status": "ok"}, auth=auth)
    assert r.status_code == 200, r.text


@pytest.mark.e2e
def test_mailstate_call_refuses_a_key_given_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("init", "--data", str(data))
    for args in (
        ["add-domain", "domain=a.example", "domain=b.example"],
        ["--json", '{"domain": "a.example", "domain": "b.example"}', "add-domain"],
        ["--json", '{"domain": "a.example"}', "add-domain", "domain=b.example"],
    ):
        r = run_cli("call", "--data", str(data), *args, check=False)
        assert r.returncode != 0 and "duplicate_key" in r.stderr + r.stdout, (args, r.stderr)
    r = run_cli("call", "--data", str(data), "list-domains")
    assert json.loads(r.stdout)["domains"] == []


# --- MCP: raw JSON-RPC (the official client cannot send a repeated key) ---------------------------


class RawMcp:
    """A streamable-HTTP MCP session spoken by hand: initialize, then raw bodies."""

    def __init__(self, srv: LiveServer, token: str) -> None:
        self.c = httpx.Client(
            base_url=srv.url,
            timeout=30,
            headers={
                "authorization": f"Bearer {token}",
                "accept": "application/json, text/event-stream",
                "content-type": "application/json",
            },
        )
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        }
        r = self.c.post("/mcp", content=json.dumps(init))
        assert r.status_code == 200, r.text
        self.c.headers["mcp-session-id"] = r.headers["mcp-session-id"]
        self.c.headers["mcp-protocol-version"] = sse_json(r)["result"]["protocolVersion"]
        r = self.c.post("/mcp", content=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        assert r.status_code == 202, r.text

    def post(self, body: bytes) -> httpx.Response:
        return self.c.post("/mcp", content=body)


def sse_json(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        datas = [line[5:] for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()]
        assert len(datas) == 1, r.text
        return json.loads(datas[0])
    return r.json()


def _tool_call(i: int, tool: str, arguments: str) -> bytes:
    return f'{{"jsonrpc": "2.0", "id": {i}, "method": "tools/call", "params": {{"name": "{tool}", "arguments": {arguments}}}}}'.encode()


def _arguments(name: str) -> str:
    return _duplicated_body(name).decode()


def _assert_duplicate_tool_error(answer: Any, i: int) -> None:
    assert answer["id"] == i, answer
    result = answer["result"]
    assert result["isError"] is True, answer
    body = json.loads(result["content"][0]["text"])
    assert body["error"]["code"] == "duplicate_key", body
    assert result["structuredContent"] == body


@pytest.mark.e2e
def test_duplicate_keys_are_refused_by_every_mcp_tool_over_http(world: World) -> None:
    before = world.head()
    mcp = RawMcp(world.srv, world.srv.admin_token)
    tools = {n: op for n, op in OPERATIONS.items() if op.in_spec}
    for i, (name, op) in enumerate(tools.items(), start=1):
        r = mcp.post(_tool_call(i, op.tool_name, _arguments(name)))
        assert r.status_code == 200, r.text
        _assert_duplicate_tool_error(sse_json(r), i)
    # A key repeated in the tool call's envelope (which tool runs?) is refused the same way.
    body = (
        b'{"jsonrpc": "2.0", "id": 90, "method": "tools/call", "params": {"name": "email_account_list_domains", '
        b'"name": "email_account_remove_domain", "arguments": {"domain": "k2.example"}}}'
    )
    _assert_duplicate_tool_error(sse_json(mcp.post(body)), 90)
    # Any other message holding a repeated key: HTTP 400, JSON-RPC "Invalid Request".
    r = mcp.post(b'{"jsonrpc": "2.0", "id": 91, "method": "tools/list", "method": "tools/list"}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == -32600 and "given more than once" in r.json()["error"]["message"]
    # The flag belongs to that one request: the same session's next call runs.
    answer = sse_json(mcp.post(_tool_call(92, "email_account_list_users", '{"domain": "k.example"}')))
    assert answer["result"]["isError"] is False, answer
    assert world.head() == before


@pytest.mark.e2e
def test_duplicate_keys_are_refused_by_mcp_tools_over_stdio(world: World) -> None:
    before = world.head()
    cmd = mailstate_cmd()
    proc = subprocess.Popen(
        [*cmd, "mcp", "--data", str(world.srv.data.root), "--token", world.token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=world.srv.env,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(line: bytes | str) -> None:
        assert proc.stdin is not None
        proc.stdin.write((line.decode() if isinstance(line, bytes) else line) + "\n")
        proc.stdin.flush()

    def answer() -> Any:
        assert proc.stdout is not None
        return json.loads(proc.stdout.readline())

    try:
        send(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 0,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "raw", "version": "1"},
                    },
                }
            )
        )
        assert answer()["id"] == 0
        send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        send(_tool_call(1, "email_account_remove_user", _arguments("remove-user")))
        _assert_duplicate_tool_error(answer(), 1)
        send(
            _tool_call(
                2,
                "email_account_add_alias",
                '{"address": "a@k.example", "address": "b@k.example", "destinations": ["kelvin@k.example"]}',
            )
        )
        _assert_duplicate_tool_error(answer(), 2)
        send(_tool_call(3, "email_account_list_users", '{"domain": "k.example"}'))
        third = answer()
        assert third["id"] == 3 and third["result"]["isError"] is False, third
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert world.head() == before


# --- look-alikes in a local part -----------------------------------------------------------------


def _folds_to_ascii(c: str) -> bool:
    return not c.isascii() and any(
        f.isascii() and f.strip() for f in (c.lower(), c.casefold(), unicodedata.normalize("NFKC", c).lower())
    )


def test_no_non_ascii_letter_is_folded_into_an_address() -> None:
    lookalikes = [chr(cp) for cp in range(0x80, 0x110000) if not 0xD800 <= cp <= 0xDFFF and _folds_to_ascii(chr(cp))]
    assert "\u212a" in lookalikes and "\uff4b" in lookalikes and "\u017f" in lookalikes  # K sign, fullwidth k, long s
    accepted = []
    for c in lookalikes:
        for address in (f"{c}elvin@k.example", f"x{c}@k.example"):
            try:
                v.normalize_email(address)
            except InvalidInput as exc:
                assert exc.code == "invalid_email"
            else:
                accepted.append(address)
    assert not accepted, accepted[:20]


@pytest.mark.e2e
def test_a_kelvin_sign_never_reaches_kelvins_mailbox(world: World) -> None:
    """Folded, each of these would act on kelvin@k.example: refused, and the mailbox is untouched."""
    before = world.head()
    lookalike = f"{KELVIN}@k.example"
    calls = [
        ("add-user", {"email": lookalike, "password": PASSWORD}),
        ("update-password", {"email": lookalike, "password": "an attacker's password"}),
        ("remove-user", {"email": lookalike, "hard_delete": True}),
        ("restore-user", {"email": lookalike}),
        ("set-forwarding", {"email": lookalike, "destinations": ["thief@elsewhere.example"]}),
        ("add-alias", {"address": lookalike, "destinations": ["thief@elsewhere.example"]}),
        ("add-alias", {"address": "new@k.example", "destinations": [lookalike]}),
        ("update-alias", {"address": f"{KELVIN}ilo@k.example", "destinations": ["thief@elsewhere.example"]}),
    ]
    for name, body in calls:
        err = assert_error(world.p.post(f"{API}/{name}", json=body), 400)
        assert err["code"] in ("invalid_email", "invalid_destinations"), (name, err)
        assert "ASCII" in err["message"], err
    assert world.head() == before
    with pytest.raises(InvalidInput):
        filter_log([], mailbox=lookalike)  # `mailstate log --mailbox`: the same rule


# --- secrets and internals in messages -----------------------------------------------------------


@pytest.mark.e2e
def test_a_lone_surrogate_in_a_password_gets_a_clear_message(world: World) -> None:
    before = world.head()
    for name, email in (("add-user", "new@k.example"), ("update-password", "kelvin@k.example")):
        body = b'{"email": "%s", "password": "hunter\\udc80swordfish"}' % email.encode()
        err = assert_error(world.raw(name, body, world.p), 400, "invalid_password")
        assert "unpaired surrogate" in err["message"], err
        for leak in ("codec", "position", "hunter", "swordfish", "\udc80", "\\udc80'"):
            assert leak not in err["message"], (leak, err)
    # MCP over HTTP: the SDK's own parser refuses the message before any tool runs.
    mcp = RawMcp(world.srv, world.token)
    r = mcp.post(
        _tool_call(1, "email_account_add_user", '{"email": "new@k.example", "password": "hunter\\udc80swordfish"}')
    )
    assert r.status_code == 400 and "hunter" not in r.text and "swordfish" not in r.text, r.text
    assert world.head() == before


@pytest.mark.e2e
def test_a_lone_surrogate_password_on_the_command_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 arrive in argv as lone surrogates (PEP 383)."""
    data = tmp_path / "data"
    run_cli("init", "--data", str(data))
    run_cli("call", "--data", str(data), "add-domain", "domain=a.example", "project_id=1")
    cmd = [*mailstate_cmd(), "call", "--data", str(data), "add-user", "email=x@a.example"]
    r = subprocess.run([*map(str.encode, cmd), b"password=hunter\xffswordfish"], capture_output=True, timeout=120)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode != 0 and "invalid_password" in out and "unpaired surrogate" in out, out
    for leak in ("codec", "position", "hunter", "swordfish"):
        assert leak not in out, (leak, out)


def test_no_validation_message_echoes_a_foreign_exception() -> None:
    """pydantic's `value_error` carries the text of whatever ValueError a validator raised (a
    codec's, idna's): the message names the field only."""
    with pytest.raises(InvalidInput) as info:
        parse(AddUserRequest, {"email": "a@k.example", "password": ["hunter2hunter2"]})
    assert info.value.code == "invalid_password" and "hunter2" not in info.value.message
    with pytest.raises(InvalidInput) as info:
        parse(AddUserRequest, {"email": "a@k.example", "password": "hunter2\udc80hunter2"})
    assert "hunter2" not in info.value.message and "codec" not in info.value.message


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [
        ["add-user", "email=x@a.example", "hunter2swordfish"],  # a password without its key
        ["add-user", "email=x@a.example", "password"],
    ],
)
def test_the_cli_does_not_echo_a_malformed_field(tmp_path: Path, args: list[str]) -> None:
    data = tmp_path / "data"
    run_cli("init", "--data", str(data))
    r = run_cli("call", "--data", str(data), *args, check=False)
    assert r.returncode != 0 and "not key=value" in r.stderr, r.stderr
    assert "hunter2" not in r.stderr + r.stdout


def test_find_duplicate_names_the_key_and_where_it_is() -> None:
    """The raw bodies above hold what they claim; a body without a repeat is left alone."""
    body = _tool_call(1, "t", _arguments("add-user"))
    dup = strict_json.find_duplicate(body)
    assert dup is not None and dup.key == "email" and dup.path == ("params", "arguments")
    assert strict_json.find_duplicate(b'{"a": [{"b": 1}, {"b": 2}], "c": {"d": 1}}') is None
    assert strict_json.find_duplicate(b"not json") is None
