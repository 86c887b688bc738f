"""check-dns against a real authoritative DNS server (Debian's knotd on a loopback port, see
tests/helpers/knot.py) through a real `mailstate serve` whose MAILSTATE_DNS_RESOLVER points at it.

The domain's zone is right (published exactly as dns-records says, a 2048-bit DKIM key split
into 255-character strings as zone files do), missing, wrong and broken (SERVFAIL) in turn;
each time check-dns answers every record with its status and what was found, over HTTP and
MCP, and list-domains shows the verdict. A resolver that never answers gives per-record
timeouts, a bad MAILSTATE_DNS_RESOLVER a 503 in the one error shape: never a 500. The
background check fills list-domains by itself and looks at a domain at most once an interval
(knot's own query counter says so). The MTA-STS / TLS-RPT records and the unchanged bytes of a
mailstate.yaml written before their settings existed are checked here too.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mailstate.state import dnscheck
from mailstate.state.datadir import open_store
from mailstate.state.dns import mta_sts_id
from mailstate.state.dnscheck import BackgroundDnsCheck, DnsChecker, ResolverSpec
from mailstate.state.localdb import LocalDB
from mailstate.state.models import CheckDnsResponse, ListDomainsResponse
from tests.helpers.knot import KnotServer
from tests.helpers.server import LiveServer, assert_error

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
DOMAIN = "shop.test"
MX = ("mx1.platform.test", "mx2.platform.test")


def public_key(tmp: Path) -> str:
    """A fresh RSA-2048 public key's p= value, made with openssl as a node makes it."""
    key = tmp / "dkim.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
                   check=True, capture_output=True)  # fmt: skip
    der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout  # fmt: skip
    return base64.b64encode(der).decode()


def zone_line(record: dict[str, Any]) -> str:
    """A dns-records entry as a zone file line (TXT split into 255-character strings)."""
    name, kind, value = record["name"] + ".", record["type"], record["value"]
    if kind == "TXT":
        chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
        return f"{name} TXT " + " ".join(f'"{c}"' for c in chunks)
    if kind in ("MX", "SRV", "CNAME"):
        return f"{name} {kind} {value}."
    raise AssertionError(kind)


class World:
    def __init__(self, root: Path, knot: KnotServer) -> None:
        self.knot = knot
        self.srv = LiveServer(root / "srv")
        args = ["init", "--data", str(self.srv.data.root), "--bcrypt-cost", "4"]
        self.srv.cli(*args, *[a for host in MX for a in ("--mx-host", host)])
        self.srv.admin_token = self.srv.create_token(name="admin")
        self.token = self.srv.create_token(project=42, name="p42")
        self.srv.env.update(MAILSTATE_DNS_RESOLVER=knot.address, MAILSTATE_DNS_TIMEOUT="1")
        self.srv.start()
        self.admin = self.srv.client(self.srv.admin_token)
        self.p42 = self.srv.client(self.token)
        for domain in (DOMAIN, "idle.test"):
            assert self.admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": 42}).status_code == 201
            assert self.p42.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
        assert self.admin.post(f"{API}/link-domain", json={"domain": "dark.test", "project_id": 42}).status_code == 201
        node = self.admin.post(f"{API}/add-node", json={"name": "mpi01"}).json()
        self.key = public_key(root)
        report = {
            "status": "ok",
            "applied_commit": None,
            "dkim_keys": [{"selector": "ms1-mpi01", "public_key": self.key, "state": "active", "created_at": 1}],
        }
        r = httpx.post(f"{self.srv.url}/v1/nodes/report", json=report, auth=("mpi01", node["sync_key"]), timeout=30)
        assert r.status_code == 200, r.text

    def records(self, domain: str = DOMAIN) -> list[dict[str, Any]]:
        r = self.p42.get(f"{API}/dns-records", params={"domain": domain})
        assert r.status_code == 200, r.text
        return list(r.json()["records"])

    def check(self, domain: str = DOMAIN) -> dict[str, Any]:
        r = self.p42.get(f"{API}/check-dns", params={"domain": domain})
        assert r.status_code == 200, r.text
        body = r.json()
        CheckDnsResponse.model_validate(body)  # the documented shape
        return dict(body)

    def listed(self, domain: str) -> dict[str, Any]:
        body = self.p42.get(f"{API}/list-domains").json()
        ListDomainsResponse.model_validate(body)
        return next(d for d in body["domains"] if d["domain"] == domain)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("checkdns")
    with KnotServer(root / "knot", [DOMAIN, "idle.test", "dark.test"]) as knot:
        w = World(root, knot)
        try:
            yield w
        finally:
            w.admin.close()
            w.p42.close()
            w.srv.stop()


def statuses(body: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(r["type"], r["name"]): r["status"] for r in body["records"] if r["type"] != "MX"}


def test_records_list_mta_sts_and_tls_rpt_with_the_policy_id(world: World) -> None:
    by_name = {(r["type"], r["name"]): r["value"] for r in world.records()}
    policy = httpx.get(f"{world.srv.url}/.well-known/mta-sts.txt", headers={"Host": f"mta-sts.{DOMAIN}"})
    assert policy.status_code == 200 and policy.headers["content-type"].startswith("text/plain")
    lines = policy.text.split("\r\n")
    assert lines == ["version: STSv1", "mode: testing", *(f"mx: {h}" for h in MX), "max_age: 604800", ""]
    policy_id = by_name[("TXT", f"_mta-sts.{DOMAIN}")].removeprefix("v=STSv1; id=")
    assert policy_id == mta_sts_id(policy.text) and policy_id.isalnum() and 1 <= len(policy_id) <= 32
    assert by_name[("CNAME", f"mta-sts.{DOMAIN}")] == MX[0]
    assert by_name[("TXT", f"_smtp._tls.{DOMAIN}")] == f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"
    # Hosts that are not mta-sts.<an enabled domain> have no policy.
    for host in ("mta-sts.dark.test", "mta-sts.nowhere.test", DOMAIN, "mta-sts.", "mta-sts.-bad-.test"):
        assert_error(httpx.get(f"{world.srv.url}/.well-known/mta-sts.txt", headers={"Host": host}), 404)


def test_right_zone_every_record_ok_and_list_domains_says_so(world: World) -> None:
    records = world.records()
    world.knot.set_zone(DOMAIN, [zone_line(r) for r in records])
    body = world.check()
    assert body["ok"] is True and body["resolver"] == world.knot.address
    assert [r["status"] for r in body["records"]] == ["ok"] * len(records)
    assert [(r["type"], r["name"], r["value"]) for r in body["records"]] == [
        (r["type"], r["name"], r["value"]) for r in records
    ]
    dkim = next(r for r in body["records"] if r["selector"] == "ms1-mpi01")
    assert dkim["found"] == [f"v=DKIM1; k=rsa; p={world.key}"]  # 392 characters, published as two strings
    assert len(dkim["value"]) > 255
    listed = world.listed(DOMAIN)
    assert listed["dns_ok"] is True and listed["dns_checked_at"] == body["checked_at"]


def test_missing_zone_every_record_missing(world: World) -> None:
    world.knot.set_zone(DOMAIN, [])
    body = world.check()
    assert body["ok"] is False
    assert {r["status"] for r in body["records"]} == {"missing"}
    assert all(r["found"] == [] and r["error"] is None for r in body["records"])
    assert world.listed(DOMAIN)["dns_ok"] is False


def test_wrong_zone_each_record_says_what_was_found(world: World) -> None:
    records = world.records()
    wrong = [
        f"{DOMAIN}. MX 10 mx.old-provider.test.",
        f'{DOMAIN}. TXT "v=spf1 include:old-provider.test -all"',
        f'{DOMAIN}. TXT "google-site-verification=abc"',  # another kind: not SPF's business
        f'ms1-mpi01._domainkey.{DOMAIN}. TXT "v=DKIM1; k=rsa; p=AAAAB3Nza"',
        f'_dmarc.{DOMAIN}. TXT "v=DMARC1; p=reject"',
        f"autoconfig.{DOMAIN}. A 192.0.2.10",
        f"autodiscover.{DOMAIN}. CNAME elsewhere.test.",
        f"_submission._tcp.{DOMAIN}. SRV 0 1 2525 {MX[0]}.",
        f"_imaps._tcp.{DOMAIN}. SRV 0 1 993 imap.old-provider.test.",
        f'_mta-sts.{DOMAIN}. TXT "v=STSv1; id=20190101"',  # an old policy id
        f"mta-sts.{DOMAIN}. CNAME {MX[0]}.",  # right
    ]
    world.knot.set_zone(DOMAIN, wrong)
    body = world.check()
    assert body["ok"] is False
    found = {(r["type"], r["name"]): (r["status"], r["found"]) for r in body["records"]}
    assert found[("MX", DOMAIN)] == ("wrong", ["10 mx.old-provider.test"])
    assert found[("TXT", DOMAIN)] == ("wrong", ["v=spf1 include:old-provider.test -all"])
    assert found[("TXT", f"ms1-mpi01._domainkey.{DOMAIN}")] == ("wrong", ["v=DKIM1; k=rsa; p=AAAAB3Nza"])
    assert found[("TXT", f"_dmarc.{DOMAIN}")] == ("wrong", ["v=DMARC1; p=reject"])
    assert found[("CNAME", f"autoconfig.{DOMAIN}")] == ("wrong", ["A 192.0.2.10"])
    assert found[("CNAME", f"autodiscover.{DOMAIN}")] == ("wrong", ["elsewhere.test"])
    assert found[("SRV", f"_submission._tcp.{DOMAIN}")] == ("wrong", [f"0 1 2525 {MX[0]}"])
    assert found[("SRV", f"_imaps._tcp.{DOMAIN}")] == ("wrong", ["0 1 993 imap.old-provider.test"])
    assert found[("TXT", f"_mta-sts.{DOMAIN}")] == ("wrong", ["v=STSv1; id=20190101"])
    assert found[("CNAME", f"mta-sts.{DOMAIN}")] == ("ok", [MX[0]])
    assert found[("TXT", f"_smtp._tls.{DOMAIN}")] == ("missing", [])
    # Right records beside a leftover MX and a second SPF record: still wrong (mail leaks, SPF permerror).
    right = [zone_line(r) for r in records]
    world.knot.set_zone(DOMAIN, [*right, f"{DOMAIN}. MX 30 mx.old-provider.test.", f'{DOMAIN}. TXT "v=spf1 -all"'])
    body = world.check()
    mx = [r for r in body["records"] if r["type"] == "MX"]
    assert {r["status"] for r in mx} == {"wrong"} and "30 mx.old-provider.test" in mx[0]["found"]
    assert statuses(body)[("TXT", DOMAIN)] == "wrong"
    assert {s for k, s in statuses(body).items() if k != ("TXT", DOMAIN)} == {"ok"}
    # Whitespace a provider adds inside tag lists, and a DKIM key split by spaces, still match.
    spaced = [line.replace("; ", " ;  ") if "_domainkey" in line or "_dmarc" in line else line for line in right]
    world.knot.set_zone(DOMAIN, spaced)
    assert world.check()["ok"] is True


def test_servfail_is_answered_as_such(world: World) -> None:
    world.knot.break_zone(DOMAIN)
    body = world.check()
    assert body["ok"] is False
    assert {(r["status"], r["error"]) for r in body["records"]} == {("error", "servfail")}
    assert world.listed(DOMAIN)["dns_ok"] is False  # a broken zone is a failure the customer must fix
    world.knot.set_zone(DOMAIN, [zone_line(r) for r in world.records()])
    assert world.check()["ok"] is True


def test_mcp_tool_answers_the_same(world: World) -> None:
    world.knot.set_zone(DOMAIN, [zone_line(r) for r in world.records()])

    async def main() -> Any:
        async with mcp_session(world.srv, world.token) as s:
            return await s.call_tool("email_account_check_dns", {"domain": DOMAIN}), await s.call_tool(
                "email_account_check_dns", {"domain": "dark.test"}
            )

    good, dark = anyio.run(main)
    assert good.is_error is False
    body = json.loads(good.content[0].text)
    assert body["ok"] is True and [r["status"] for r in body["records"]] == ["ok"] * len(world.records())
    assert dark.is_error is True and json.loads(dark.content[0].text)["error"]["code"] == "email_not_enabled"


def test_refusals_in_the_one_shape(world: World) -> None:
    assert_error(world.p42.get(f"{API}/check-dns", params={"domain": "dark.test"}), 409, "email_not_enabled")
    assert_error(world.p42.get(f"{API}/check-dns", params={"domain": "nowhere.test"}), 404, "domain_not_found")
    assert_error(world.p42.get(f"{API}/check-dns", params={"domain": "-x-"}), 400, "invalid_domain")
    assert_error(world.p42.get(f"{API}/check-dns"), 400, "missing_field")
    assert_error(httpx.get(f"{world.srv.url}{API}/check-dns", params={"domain": DOMAIN}), 401, "unauthenticated")
    other = world.srv.client(world.srv.create_token(project=7, name="p7"))
    assert_error(other.get(f"{API}/check-dns", params={"domain": DOMAIN}), 404, "domain_not_found")


def test_the_background_check_fills_list_domains_by_itself(world: World) -> None:
    """idle.test is never checked by a caller: the server's own check (a second after start,
    then at most once an hour) fills dns_ok and dns_checked_at."""
    deadline = time.monotonic() + 30
    while (listed := world.listed("idle.test"))["dns_checked_at"] is None:
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)
    assert listed["dns_ok"] is False  # its zone holds nothing yet
    before = world.knot.queries()
    time.sleep(3)  # three ticks of the checker: nothing is due before an hour has passed
    assert world.knot.queries() == before
    assert world.listed("idle.test")["dns_checked_at"] == listed["dns_checked_at"]


# --- the checker on its own: real knot, real store, real database --------------------------------


@pytest.fixture
def local(world: World, tmp_path: Path) -> Iterator[tuple[Any, LocalDB]]:
    """A second store and database on a copy of the world's data dir."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(world.srv.data.root, copy)
    db = LocalDB(copy / "mailstate.db")
    store = open_store(copy, db=db)
    try:
        yield store, db
    finally:
        db.close()


def test_background_check_at_most_once_an_interval(world: World, local: tuple[Any, LocalDB]) -> None:
    store, db = local
    world.knot.set_zone(DOMAIN, [zone_line(r) for r in world.records()])
    now = [time.time() + 7200]  # later than every check the world's server made
    clock = lambda: datetime.fromtimestamp(now[0], UTC)  # noqa: E731
    store.dns_check_source = DnsChecker(ResolverSpec((("127.0.0.1", world.knot.port),), 1.0), db, clock=clock).check
    bg = BackgroundDnsCheck(store, db, interval=3600, sweep_every=0, budget=10, wall=lambda: now[0])
    queries = world.knot.queries()
    assert bg.round() == 2  # shop.test and idle.test; dark.test has no email (skipped for an interval)
    assert world.knot.queries() > queries
    assert db.dns_status([DOMAIN])[DOMAIN]["ok"] is True
    for _ in range(3):  # within the hour: nothing is due, knot is not asked
        queries = world.knot.queries()
        now[0] += 1000
        assert bg.round() == 0 and world.knot.queries() == queries
    now[0] += 700  # more than an hour after the checks
    assert bg.round() == 2 and world.knot.queries() > queries


def test_failed_checks_reach_the_one_hook_and_timeouts_are_not_kept(world: World, tmp_path: Path) -> None:
    db = LocalDB(tmp_path / "hook.db")
    calls: list[tuple[str, int, bool | None]] = []

    def hook(domain: str, records: list[dict[str, Any]], previous: bool | None) -> None:
        calls.append((domain, sum(r["status"] != "ok" for r in records), previous))

    checker = DnsChecker(ResolverSpec((("127.0.0.1", world.knot.port),), 1.0), db, on_failure=hook)
    world.knot.set_zone(DOMAIN, [])
    records = world.records()
    checker.check(DOMAIN, records)
    checker.check(DOMAIN, records)
    assert calls == [(DOMAIN, len(records), None), (DOMAIN, len(records), False)]
    # A resolver that never answers: every lookup times out; answered, neither kept nor announced.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        mute = DnsChecker(ResolverSpec((("127.0.0.1", silent.getsockname()[1]),), 0.3), db, on_failure=hook)
        body = mute.check("idle.test", world.records("idle.test"))
    assert {(r["status"], r["error"]) for r in body["records"]} == {("error", "timeout")}
    assert "idle.test" not in db.dns_status(["idle.test"]) and len(calls) == 2
    db.close()


def test_silent_and_invalid_resolvers_over_http(tmp_path: Path) -> None:
    """A resolver that never answers: 200 with per-record timeouts. A bad MAILSTATE_DNS_RESOLVER:
    the server starts, and check-dns answers 503 dns_resolver_invalid. Never a 500."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        for name, value in (("silent", f"127.0.0.1:{silent.getsockname()[1]}"), ("bad", "dns.example:53")):
            srv = LiveServer(tmp_path / name)
            srv.cli("init", "--data", str(srv.data.root), "--bcrypt-cost", "4", "--mx-host", MX[0])
            srv.admin_token = srv.create_token(name="admin")
            srv.env.update(MAILSTATE_DNS_RESOLVER=value, MAILSTATE_DNS_TIMEOUT="0.3", MAILSTATE_DNS_CHECK_INTERVAL="0")
            srv.start()
            try:
                with srv.client(srv.admin_token) as c:
                    assert c.post(f"{API}/add-domain", json={"domain": DOMAIN}).status_code == 201
                    r = c.get(f"{API}/check-dns", params={"domain": DOMAIN})
                    if name == "silent":
                        assert r.status_code == 200, r.text
                        assert {(x["status"], x["error"]) for x in r.json()["records"]} == {("error", "timeout")}
                    else:
                        err = assert_error(r, 503, "dns_resolver_invalid")
                        assert "MAILSTATE_DNS_RESOLVER" in err["message"] and "IP:PORT" in err["message"]
                    assert c.get(f"{API}/list-domains").json()["domains"][0]["dns_ok"] is None
            finally:
                srv.stop()


def test_resolver_setting_format() -> None:
    parse = dnscheck.parse_servers
    assert parse("127.0.0.1:5353") == (("127.0.0.1", 5353),)
    assert parse(" 10.0.0.2, 10.0.0.3 [::1]:5353 ::1") == (
        ("10.0.0.2", 53), ("10.0.0.3", 53), ("::1", 5353), ("::1", 53)
    )  # fmt: skip
    assert parse("") == ()
    for bad in ("dns.example", "1.2.3.4:0", "1.2.3.4:65536", "[::1]5353", "1.2.3.4:x", "::1:53]"):
        with pytest.raises(dnscheck.InvalidInput):
            parse(bad)
    assert dnscheck.check_interval({}) == 3600 and dnscheck.check_interval({"MAILSTATE_DNS_CHECK_INTERVAL": "0"}) == 0
    assert dnscheck.check_interval({"MAILSTATE_DNS_CHECK_INTERVAL": "60"}) == 3600  # never more than once an hour
    assert dnscheck.check_interval({"MAILSTATE_DNS_CHECK_INTERVAL": "7200"}) == 7200


@asynccontextmanager
async def mcp_session(srv: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        streamable_http_client(f"{srv.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session
