"""Mail-client setup over a real `mailstate serve`, without a token: Thunderbird's autoconfig at
both paths (parsed as XML), Outlook's autodiscover answering a real Outlook request (parsed as
XML), and the Apple profile (parsed with plistlib, no password in it), over HTTP and as the MCP
tool. Any address of an enabled domain gets the same answer, whether the mailbox exists or
not; other domains get 404; bad input gets a 4xx in the one shape. Hosts and ports come from
the `dns:` settings: the defaults (`mailstate init --mx-host`), and a block that sets them all.
A mailstate.yaml written before the new dns keys keeps its bytes.
"""

from __future__ import annotations

import json
import plistlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mailstate.state import files
from mailstate.state.datadir import init_data_dir
from mailstate.state.dns import mta_sts_id
from mailstate.state.models import DnsSettings, MobileconfigResponse, Settings
from tests.helpers.server import LiveServer, assert_error

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
TB_PATHS = ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml")
OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
OUTLOOK_REQUEST = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>{email}</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>
"""
PASSWORD = "correct horse battery"


class World:
    """A server with shop.test (email, one mailbox info@), dark.test (linked, no email)."""

    def __init__(self, srv: LiveServer) -> None:
        self.srv = srv
        srv.admin_token = srv.admin_token or srv.create_token(name="admin")
        self.token = srv.create_token(project=42, name="p42")
        srv.start()
        self.anon = httpx.Client(base_url=srv.url, timeout=30)
        with srv.client(srv.admin_token) as admin:
            for domain in ("shop.test", "dark.test"):
                assert admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": 42}).status_code == 201
            assert admin.post(f"{API}/enable-email", json={"domain": "shop.test"}).status_code == 200
            r = admin.post(f"{API}/add-user", json={"email": "info@shop.test", "password": PASSWORD})
            assert r.status_code == 201

    def thunderbird(self, path: str, email: str | None, host: str | None = None) -> httpx.Response:
        params = {"emailaddress": email} if email is not None else {}
        return self.anon.get(path, params=params, headers={"Host": host} if host else {})

    def outlook(self, email: str) -> httpx.Response:
        body = OUTLOOK_REQUEST.format(email=email).encode()
        return self.anon.post("/autodiscover/autodiscover.xml", content=body, headers={"Content-Type": "text/xml"})

    def profile(self, email: str) -> httpx.Response:
        return self.anon.get(f"{API}/mobileconfig", params={"email": email})


def _world(root: Path, settings: Settings | None) -> Iterator[World]:
    srv = LiveServer(root)
    if settings is None:  # what `mailstate init --mx-host` writes: every other key at its default
        srv.cli("init", "--data", str(srv.data.root), "--bcrypt-cost", "4", "--mx-host", "mx1.platform.test")
    else:
        init_data_dir(srv.data.root, settings)
    srv.env.update(MAILSTATE_DNS_CHECK_INTERVAL="0")
    w = World(srv)
    try:
        yield w
    finally:
        w.anon.close()
        srv.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from _world(tmp_path_factory.mktemp("autoconfig"), None)


CUSTOM = DnsSettings(
    mx_hosts=["mx1.mail.example", "mx2.mail.example"],
    autoconfig_host="setup.mail.example",
    imap_host="imap.mail.example",
    submission_host="smtp.mail.example",
    imaps_port=10993,
    submissions_port=10465,
    submission_port=10587,
    mta_sts_mode="enforce",
    tls_rpt_rua="mailto:tls@mail.example",
)


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from _world(tmp_path_factory.mktemp("autoconfig-custom"), Settings(bcrypt_cost=4, dns=CUSTOM))


# --- Thunderbird -----------------------------------------------------------------------------


def servers(xml: bytes) -> list[tuple[str, str, str, str, str, str]]:
    root = ET.fromstring(xml)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.findtext("domain") == "shop.test"
    out = []
    for server in provider:
        if server.tag in ("incomingServer", "outgoingServer"):
            out.append(
                (
                    f"{server.tag}/{server.get('type')}",
                    server.findtext("hostname") or "",
                    server.findtext("port") or "",
                    server.findtext("socketType") or "",
                    server.findtext("authentication") or "",
                    server.findtext("username") or "",
                )
            )
    return out


def test_thunderbird_both_paths_default_settings(world: World) -> None:
    answers = []
    for path in TB_PATHS:
        for email in ("info@shop.test", "nobody@shop.test", "Someone.Else@SHOP.test"):
            r = world.thunderbird(path, email)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/xml")
            answers.append(r.content)
    assert len(set(answers)) == 1  # byte for byte the same: nothing tells whether a mailbox exists
    host = "mx1.platform.test"
    assert servers(answers[0]) == [
        ("incomingServer/imap", host, "993", "SSL", "password-cleartext", "%EMAILADDRESS%"),
        ("outgoingServer/smtp", host, "465", "SSL", "password-cleartext", "%EMAILADDRESS%"),
        ("outgoingServer/smtp", host, "587", "STARTTLS", "password-cleartext", "%EMAILADDRESS%"),
    ]
    # Asked on autoconfig.<domain> without the address (older clients): the same answer.
    assert world.thunderbird(TB_PATHS[0], None, host="autoconfig.shop.test:8443").content == answers[0]


def test_thunderbird_hosts_and_ports_from_settings(custom: World) -> None:
    r = custom.thunderbird(TB_PATHS[1], "info@shop.test")
    assert r.status_code == 200, r.text
    assert [s[:4] for s in servers(r.content)] == [
        ("incomingServer/imap", "imap.mail.example", "10993", "SSL"),
        ("outgoingServer/smtp", "smtp.mail.example", "10465", "SSL"),
        ("outgoingServer/smtp", "smtp.mail.example", "10587", "STARTTLS"),
    ]


def test_thunderbird_refusals(world: World) -> None:
    for path in TB_PATHS:
        for email in ("x@dark.test", "x@nowhere.test"):
            err = assert_error(world.thunderbird(path, email), 404, "domain_not_found")
            assert "x@" not in err["message"]
        assert_error(world.thunderbird(path, "not an address"), 400, "invalid_email")
        assert_error(world.thunderbird(path, None), 400, "missing_field")
        assert_error(world.thunderbird(path, None, host="autoconfig.dark.test"), 404, "domain_not_found")
        assert_error(world.anon.post(path, params={"emailaddress": "info@shop.test"}), 405, "method_not_allowed")
    r = world.anon.get(TB_PATHS[0], params=[("emailaddress", "a@shop.test"), ("emailaddress", "b@shop.test")])
    assert_error(r, 400, "invalid_request")


# --- Outlook ----------------------------------------------------------------------------------


def protocols(xml: bytes, email: str) -> list[tuple[str, str, str, str, str]]:
    root = ET.fromstring(xml)
    assert root.tag == "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}Autodiscover"
    account = root.find(f"{OUTLOOK}Response/{OUTLOOK}Account")
    assert account is not None
    assert (account.findtext(f"{OUTLOOK}AccountType"), account.findtext(f"{OUTLOOK}Action")) == ("email", "settings")
    out = []
    for p in account.findall(f"{OUTLOOK}Protocol"):
        assert p.findtext(f"{OUTLOOK}LoginName") == email and p.findtext(f"{OUTLOOK}AuthRequired") == "on"
        fields = ("Type", "Server", "Port", "SSL", "Encryption")
        out.append(tuple(p.findtext(f"{OUTLOOK}{f}") or "" for f in fields))
    return out  # type: ignore[return-value]


def test_outlook_autodiscover(world: World, custom: World) -> None:
    r = world.outlook("info@shop.test")
    assert r.status_code == 200, r.text
    assert protocols(r.content, "info@shop.test") == [
        ("IMAP", "mx1.platform.test", "993", "on", "SSL"),
        ("SMTP", "mx1.platform.test", "465", "on", "SSL"),
    ]
    other = world.outlook("nobody@shop.test")
    assert other.content == r.content.replace(b"info@shop.test", b"nobody@shop.test")
    capital = world.anon.post("/Autodiscover/Autodiscover.xml", content=OUTLOOK_REQUEST.format(email="info@shop.test"))
    assert capital.content == r.content
    assert protocols(custom.outlook("info@shop.test").content, "info@shop.test") == [
        ("IMAP", "imap.mail.example", "10993", "on", "SSL"),
        ("SMTP", "smtp.mail.example", "10465", "on", "SSL"),
    ]


def test_outlook_refusals(world: World) -> None:
    post = world.anon.post
    assert_error(world.outlook("x@dark.test"), 404, "domain_not_found")
    assert_error(world.outlook("x@nowhere.test"), 404, "domain_not_found")
    assert_error(world.outlook("not-an-address"), 400, "invalid_email")
    assert_error(post("/autodiscover/autodiscover.xml", content=b"<Autodiscover><Request>"), 400, "invalid_request")
    assert_error(post("/autodiscover/autodiscover.xml", content=b"<Autodiscover/>"), 400, "missing_field")
    assert_error(post("/autodiscover/autodiscover.xml", content=b""), 400)
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        b"<Autodiscover><Request><EMailAddress>&lol2;@shop.test</EMailAddress></Request></Autodiscover>"
    )
    assert_error(post("/autodiscover/autodiscover.xml", content=laughs), 400, "invalid_request")
    big = OUTLOOK_REQUEST.format(email="info@shop.test").encode() + b" " * 20000
    assert_error(post("/autodiscover/autodiscover.xml", content=big), 413, "request_too_large")
    assert_error(world.anon.get("/autodiscover/autodiscover.xml"), 405, "method_not_allowed")


# --- Apple --------------------------------------------------------------------------------------


def payload(resp: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-apple-aspen-config"
    assert resp.headers["content-disposition"] == 'attachment; filename="shop.test.mobileconfig"'
    profile = plistlib.loads(resp.content)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    (account,) = profile["PayloadContent"]
    assert account["PayloadType"] == "com.apple.mail.managed"
    return profile, account


def normalised(raw: bytes, email: str) -> str:
    """A profile with its address and its UUIDs (made from the address) taken out."""
    profile = plistlib.loads(raw)
    for part in (profile, *profile["PayloadContent"]):
        part.pop("PayloadUUID")
    return json.dumps(profile, sort_keys=True).replace(email, "ADDRESS")


def test_apple_profile_has_no_password(world: World, custom: World) -> None:
    profile, account = payload(world.profile("info@shop.test"))
    assert profile["PayloadDisplayName"] == "Mail for info@shop.test"
    assert not any("password" in key.lower() and key != "OutgoingPasswordSameAsIncomingPassword" for key in account)
    assert PASSWORD.encode() not in world.profile("info@shop.test").content
    assert {k: account[k] for k in account if "Server" in k or k.startswith("Email")} == {
        "EmailAccountDescription": "info@shop.test",
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": "info@shop.test",
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": "mx1.platform.test",
        "IncomingMailServerPortNumber": 993,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": "info@shop.test",
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": "mx1.platform.test",
        "OutgoingMailServerPortNumber": 465,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": "info@shop.test",
    }
    # The same profile for an address without a mailbox, but for the address itself.
    first = world.profile("info@shop.test").content
    assert first == world.profile("info@shop.test").content  # stable: the same UUIDs every time
    nobody = world.profile("nobody@shop.test").content
    assert normalised(nobody, "nobody@shop.test") == normalised(first, "info@shop.test")
    _, custom_account = payload(custom.profile("info@shop.test"))
    assert (custom_account["IncomingMailServerHostName"], custom_account["IncomingMailServerPortNumber"]) == (
        "imap.mail.example",
        10993,
    )
    assert (custom_account["OutgoingMailServerHostName"], custom_account["OutgoingMailServerPortNumber"]) == (
        "smtp.mail.example",
        10465,
    )


def test_apple_profile_refusals_and_token_not_needed(world: World) -> None:
    assert_error(world.profile("x@dark.test"), 404, "domain_not_found")
    assert_error(world.profile("x@nowhere.test"), 404, "domain_not_found")
    assert_error(world.profile("not an address"), 400, "invalid_email")
    assert_error(world.anon.get(f"{API}/mobileconfig"), 400, "missing_field")
    assert_error(world.anon.get(f"{API}/mobileconfig", params={"email": "a@shop.test", "x": "1"}), 400)
    assert_error(world.anon.post(f"{API}/mobileconfig", json={"email": "a@shop.test"}), 405, "method_not_allowed")
    with world.srv.client("mst_not_a_valid_token") as c:  # a token is not looked at
        assert c.get(f"{API}/mobileconfig", params={"email": "info@shop.test"}).status_code == 200


def test_mcp_tool_answers_the_profile_as_json(world: World) -> None:
    async def main() -> Any:
        async with mcp_session(world.srv, world.token) as s:
            return (
                await s.call_tool("email_account_mobileconfig", {"email": "info@shop.test"}),
                await s.call_tool("email_account_mobileconfig", {"email": "info@dark.test"}),
            )

    good, dark = anyio.run(main)
    body = json.loads(good.content[0].text)
    MobileconfigResponse.model_validate(body)
    assert body["profile"].encode() == world.profile("info@shop.test").content
    assert body["imap"] == {"host": "mx1.platform.test", "port": 993, "security": "tls"}
    assert [s["port"] for s in body["smtp"]] == [465, 587]
    assert dark.is_error is True and json.loads(dark.content[0].text)["error"]["code"] == "domain_not_found"


# --- MTA-STS and the settings ------------------------------------------------------------------


def test_mta_sts_mode_and_tls_rpt_from_settings(world: World, custom: World) -> None:
    with custom.srv.client(custom.token) as c:
        records = {
            (r["type"], r["name"]): r["value"] for r in c.get(f"{API}/dns-records?domain=shop.test").json()["records"]
        }
    policy = custom.anon.get("/.well-known/mta-sts.txt", headers={"Host": "mta-sts.shop.test"})
    assert policy.text == (
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.mail.example\r\nmx: mx2.mail.example\r\nmax_age: 604800\r\n"
    )
    assert records[("TXT", "_mta-sts.shop.test")] == f"v=STSv1; id={mta_sts_id(policy.text)}"
    assert records[("CNAME", "mta-sts.shop.test")] == "setup.mail.example"
    assert records[("TXT", "_smtp._tls.shop.test")] == "v=TLSRPTv1; rua=mailto:tls@mail.example"
    assert records[("SRV", "_imaps._tcp.shop.test")] == "0 1 10993 imap.mail.example"
    default = world.anon.get("/.well-known/mta-sts.txt", headers={"Host": "mta-sts.shop.test"}).text
    assert mta_sts_id(default) != mta_sts_id(policy.text)  # another policy, another id


def test_a_dns_block_without_the_new_keys_keeps_its_bytes(world: World, tmp_path: Path) -> None:
    """The data dir of `mailstate init --mx-host`: its mailstate.yaml names none of the new keys,
    and writes leave it byte for byte as it was; dumping it again gives the same bytes."""
    before = world.srv.git("show", f"{world.srv.git('rev-list', '--max-parents=0', 'main').strip()}:mailstate.yaml")
    assert "mta_sts" not in before and "port" not in before and "mx_hosts" in before
    assert world.srv.git("show", "main:mailstate.yaml") == before  # after the fixture's writes
    settings = files.parse_settings(before)
    assert settings.dns is not None and settings.dns.mta_sts_mode == "testing" and settings.dns.imaps_port == 993
    assert files.dump_settings(settings).decode() == before
    assert "mta_sts_mode: enforce" in files.dump_settings(Settings(dns=CUSTOM)).decode()


@asynccontextmanager
async def mcp_session(srv: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        streamable_http_client(f"{srv.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session
