"""dns-records over a real `mailstate serve`: two nodes report their DKIM keys through the real
report endpoint (HTTP Basic, sync keys from add-node), and the domain's records list both
nodes' keys; bad key reports are refused with a clear error and change nothing; project
scoping holds. The record builder (state/dns.py) is also checked on its own for the CNAME form."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailstate.state import dns
from mailstate.state.models import DnsSettings
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

API = "/v1/email-account"


def real_public_key(tmp: Path, name: str) -> str:
    """A fresh RSA-2048 key's p= value, made with openssl as a node makes it (pipull/dkim.py)."""
    key = tmp / f"{name}.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True, capture_output=True
    ).stdout
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dns")
    server = LiveServer(root / "srv")
    server.cli(
        "init",
        "--data",
        str(server.data.root),
        "--bcrypt-cost",
        "4",
        "--mx-host",
        "mx1.platform.test",
        "--mx-host",
        "mx2.platform.test",
    )
    server.admin_token = server.create_token(name="admin")
    project = server.create_token(project=42, name="p42")
    other = server.create_token(project=7, name="p7")
    server.start()
    admin, p42, p7 = server.client(server.admin_token), server.client(project), server.client(other)
    for domain in ("shop.example", "old-shop.example"):
        assert admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": 42}).status_code == 201
        assert p42.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
    assert admin.post(f"{API}/link-domain", json={"domain": "dark.example", "project_id": 42}).status_code == 201
    keys = {}
    for name in ("mpi01", "mpi02"):
        added = admin.post(f"{API}/add-node", json={"name": name})
        assert added.status_code == 201
        keys[name] = added.json()["sync_key"]
    pub = {n: real_public_key(root, n) for n in ("a1", "a2", "b1")}
    try:
        yield {"server": server, "admin": admin, "p42": p42, "p7": p7, "keys": keys, "pub": pub}
    finally:
        for c in (admin, p42, p7):
            c.close()
        server.stop()


def report(w: dict[str, Any], node: str, dkim_keys: Any) -> httpx.Response:
    body = {"status": "ok", "applied_commit": None, "dkim_keys": dkim_keys}
    return httpx.post(f"{w['server'].url}/v1/nodes/report", json=body, auth=(node, w["keys"][node]), timeout=30)


def records(w: dict[str, Any], client: str = "p42", domain: str = "shop.example") -> httpx.Response:
    return w[client].get(f"{API}/dns-records", params={"domain": domain})


def dkim_of(resp: httpx.Response) -> list[tuple[str, str, str, str | None]]:
    return [(r["type"], r["name"], r["value"], r["state"]) for r in resp.json()["records"] if r["selector"]]


def test_two_nodes_report_keys_and_dns_records_lists_both(world: dict[str, Any]) -> None:
    w, pub = world, world["pub"]
    assert (
        report(
            w,
            "mpi01",
            [
                {"selector": "ms1-mpi01", "public_key": pub["a1"], "state": "active", "created_at": 1_800_000_000},
                {"selector": "ms2-mpi01", "public_key": pub["a2"], "state": "pending", "created_at": 1_800_100_000},
            ],
        ).status_code
        == 200
    )
    assert (
        report(
            w,
            "mpi02",
            [{"selector": "ms1-mpi02", "public_key": pub["b1"], "state": "active", "created_at": 1_800_000_000}],
        ).status_code
        == 200
    )
    r = records(w)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == "shop.example"
    assert dkim_of(r) == [
        ("TXT", "ms1-mpi01._domainkey.shop.example", f"v=DKIM1; k=rsa; p={pub['a1']}", "active"),
        ("TXT", "ms2-mpi01._domainkey.shop.example", f"v=DKIM1; k=rsa; p={pub['a2']}", "pending"),
        ("TXT", "ms1-mpi02._domainkey.shop.example", f"v=DKIM1; k=rsa; p={pub['b1']}", "active"),
    ]
    by_type: dict[str, list[tuple[str, str]]] = {}
    for rec in body["records"]:
        assert rec["purpose"] and set(rec) == {"type", "name", "value", "purpose", "node", "selector", "state"}
        by_type.setdefault(rec["type"], []).append((rec["name"], rec["value"]))
    assert by_type["MX"] == [("shop.example", "10 mx1.platform.test"), ("shop.example", "20 mx2.platform.test")]
    assert ("shop.example", "v=spf1 mx -all") in by_type["TXT"] and (
        "_dmarc.shop.example",
        "v=DMARC1; p=none",
    ) in by_type["TXT"]
    assert ("autoconfig.shop.example", "mx1.platform.test") in by_type["CNAME"] and (
        "autodiscover.shop.example",
        "mx1.platform.test",
    ) in by_type["CNAME"]
    assert by_type["SRV"] == [
        ("_submission._tcp.shop.example", "0 1 587 mx1.platform.test"),
        ("_imaps._tcp.shop.example", "0 1 993 mx1.platform.test"),
    ]
    # An admin sees it too; the MCP tool gives the same answer.
    assert records(w, "admin").json() == body


def test_the_mcp_tool_gives_the_same_records(world: dict[str, Any]) -> None:
    import anyio

    from tests.helpers.mcp import http_session

    token = world["server"].create_token(project=42, name="p42-mcp")

    async def main() -> Any:
        async with http_session(world["server"], token) as s:
            return await s.call_tool("email_account_dns_records", {"domain": "shop.example"})

    result = anyio.run(main)
    assert result.is_error is False
    assert result.structured_content == records(world).json()


def test_a_new_report_replaces_the_nodes_keys_and_the_old_ones_go(world: dict[str, Any]) -> None:
    w, pub = world, world["pub"]
    assert (
        report(
            w,
            "mpi01",
            [
                {"selector": "ms1-mpi01", "public_key": pub["a1"], "state": "retired", "created_at": 1_800_000_000},
                {"selector": "ms2-mpi01", "public_key": pub["a2"], "state": "active", "created_at": 1_800_100_000},
            ],
        ).status_code
        == 200
    )
    states = {name: state for _t, name, _v, state in dkim_of(records(w))}
    assert (
        states["ms1-mpi01._domainkey.shop.example"] == "retired"
        and states["ms2-mpi01._domainkey.shop.example"] == "active"
    )
    # A report without dkim_keys (an older pi-pull, DKIM off) leaves the keys alone.
    assert (
        httpx.post(
            f"{w['server'].url}/v1/nodes/report", json={"status": "ok"}, auth=("mpi01", w["keys"]["mpi01"])
        ).status_code
        == 200
    )
    assert len(dkim_of(records(w))) == 3


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (
            [{"selector": "ms1-mpi02", "public_key": "A" * 392, "state": "active", "created_at": 1}],
            "not one of node mpi01's",
        ),
        ([{"selector": "s1-mpi01", "public_key": "A" * 392, "state": "active", "created_at": 1}], "selector"),
        ([{"selector": "ms1-mpi01", "public_key": "not base64!", "state": "active", "created_at": 1}], "public_key"),
        ([{"selector": "ms1-mpi01", "public_key": "A" * 5000, "state": "active", "created_at": 1}], "public_key"),
        ([{"selector": "ms1-mpi01", "public_key": "A" * 392, "state": "signing", "created_at": 1}], "state"),
        ([{"selector": "ms1-mpi01", "public_key": "A" * 392, "state": "active", "created_at": "1"}], "created_at"),
        (
            [
                {
                    "selector": "ms1-mpi01",
                    "public_key": "A" * 392,
                    "state": "active",
                    "created_at": 1,
                    "private_key": "x",
                }
            ],
            "private_key",
        ),
        ([{"selector": "ms1-mpi01", "public_key": "A" * 392, "state": "active", "created_at": 1}] * 2, "twice"),
        (
            [
                {"selector": "ms1-mpi01", "public_key": "A" * 392, "state": "active", "created_at": 1},
                {"selector": "ms2-mpi01", "public_key": "A" * 392, "state": "active", "created_at": 1},
            ],
            "more than one active",
        ),
        (
            [
                {"selector": f"ms{i}-mpi01", "public_key": "A" * 392, "state": "pending", "created_at": 1}
                for i in (1, 2, 1)
            ],
            "at most 2",
        ),
        ("ms1-mpi01", "dkim_keys"),
    ],
)
def test_bad_key_reports_are_refused_and_change_nothing(world: dict[str, Any], keys: Any, needle: str) -> None:
    before = records(world).json()
    r = report(world, "mpi01", keys)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_dkim_key" and err["field"] == "dkim_keys" and needle in err["message"], err
    assert records(world).json() == before


def test_scoping_and_refusals(world: dict[str, Any]) -> None:
    w = world
    for client in ("p7",):
        r = records(w, client)
        assert r.status_code == 404 and r.json()["error"]["code"] == "domain_not_found"
        absent = records(w, client, "nowhere.example")
        assert absent.status_code == 404 and absent.text.replace("nowhere.example", "D") == r.text.replace(
            "shop.example", "D"
        )
    r = records(w, "p42", "dark.example")
    assert r.status_code == 409 and r.json()["error"]["code"] == "email_not_enabled"
    r = w["p42"].get(f"{API}/dns-records")
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"
    # A removed node's keys are never listed again.
    assert w["admin"].post(f"{API}/remove-node", json={"name": "mpi02"}).status_code == 200
    assert not [n for _t, n, _v, _s in dkim_of(records(w)) if "mpi02" in n]


def test_cname_form_and_defaults() -> None:
    settings = DnsSettings(mx_hosts=["mx.p.test"], dkim_cname_zone="dkim.p.test", autoconfig_host="setup.p.test")
    keys = [
        {"node": "mpi01", "selector": "ms1-mpi01", "public_key": "KEY", "state": "active"},
        {"node": "gone", "selector": "ms1-gone", "public_key": "OLD", "state": "active"},
    ]
    out = dns.records_for("shop.example", settings, keys, ["mpi01"])
    dkim = [(r["type"], r["name"], r["value"]) for r in out if r["selector"]]
    assert dkim == [
        ("CNAME", "ms1-mpi01._domainkey.shop.example", "ms1-mpi01.dkim.p.test"),
        ("TXT", "ms1-mpi01.dkim.p.test", "v=DKIM1; k=rsa; p=KEY"),
    ]
    assert ("CNAME", "autoconfig.shop.example", "setup.p.test") in [(r["type"], r["name"], r["value"]) for r in out]


def test_two_real_pi_pull_nodes_report_their_own_keys(tmp_path: Path) -> None:
    """Two nodes running the real pi-pull single file (DKIM on, services stubbed) against a real
    serve: each makes its key and reports it; dns-records lists both, pending, then active."""
    from tests.helpers.mailnode import pi_pull_script, run_pi_pull

    server = LiveServer(tmp_path / "srv")
    server.cli("init", "--data", str(server.data.root), "--bcrypt-cost", "4", "--mx-host", "mx1.platform.test")
    server.admin_token = server.create_token(name="admin")
    project = server.create_token(project=42, name="p42")
    server.start()
    admin, p42 = server.client(server.admin_token), server.client(project)
    try:
        assert admin.post(f"{API}/link-domain", json={"domain": "shop.example", "project_id": 42}).status_code == 201
        assert p42.post(f"{API}/enable-email", json={"domain": "shop.example"}).status_code == 200
        inis = []
        for name in ("mpi01", "mpi02"):
            key = admin.post(f"{API}/add-node", json={"name": name}).json()["sync_key"]
            etc = tmp_path / name
            etc.mkdir()
            (etc / "sync_key").write_text(key + "\n")
            (etc / "sync_key").chmod(0o600)
            (etc / "allowed_signers").write_bytes(server.data.allowed_signers.read_bytes())
            ini = etc / "pi-pull.ini"
            ini.write_text(
                f"[remote]\nurl = {server.url}/v1/nodes/state.git\n[node]\nname = {name}\nsync_key_file = {etc / 'sync_key'}\n"
                f"allowed_signers = {etc / 'allowed_signers'}\n[paths]\nroot = {etc / 'root'}\nmail_root = /var/vmail\nmail_uid = 5000\n"
                f"mail_gid = 5000\nsync = no\n[report]\nurl = {server.url}/v1/nodes/report\n[services]\npostfix_reload = true\n"
                f"dovecot_reload = true\nmap_type = texthash\n[dkim]\nenabled = yes\nkey_dir = {etc / 'dkim'}\nkey_owner =\n"
                "publish_wait = 0\nreload = true\n"
            )
            inis.append(ini)
        assert pi_pull_script().exists()
        for ini in inis:
            r = run_pi_pull(ini)
            assert r.returncode == 0, r.stderr
        listed = [
            (r["type"], r["name"], r["state"])
            for r in p42.get(f"{API}/dns-records", params={"domain": "shop.example"}).json()["records"]
            if r["selector"]
        ]
        assert listed == [
            ("TXT", "ms1-mpi01._domainkey.shop.example", "pending"),
            ("TXT", "ms1-mpi02._domainkey.shop.example", "pending"),
        ]
        for ini in inis:
            assert run_pi_pull(ini).returncode == 0  # reported: active now (publish_wait 0), and reported as such
            assert run_pi_pull(ini).returncode == 0
        body = p42.get(f"{API}/dns-records", params={"domain": "shop.example"}).json()
        dkim_recs = {r["node"]: r for r in body["records"] if r["selector"]}
        assert {n: r["state"] for n, r in dkim_recs.items()} == {"mpi01": "active", "mpi02": "active"}
        for name in ("mpi01", "mpi02"):
            # The listed value is the node's own key: its public half, as openssl derives it from the private key on disk.
            der = subprocess.run(
                [
                    "openssl",
                    "pkey",
                    "-in",
                    str(tmp_path / name / "dkim" / f"ms1-{name}.private"),
                    "-pubout",
                    "-outform",
                    "DER",
                ],
                check=True,
                capture_output=True,
            ).stdout
            assert dkim_recs[name]["value"] == "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
            kt = (tmp_path / name / "dkim" / "KeyTable").read_text()
            assert kt == f"shop.example shop.example:ms1-{name}:{tmp_path / name / 'dkim' / f'ms1-{name}.private'}\n"
    finally:
        admin.close()
        p42.close()
        server.stop()


def test_the_node_logs_what_the_server_refused(world: dict[str, Any], pipull: Any) -> None:
    """A refused dkim_keys report: pi-pull's TickError carries the server's sentence, not just "Bad Request"."""
    import importlib
    import logging

    config = importlib.import_module("pipull.config")
    report_mod = importlib.import_module("pipull.report")
    errors = importlib.import_module("pipull.errors")
    cfg = config.Config(
        remote_url="/x", node_name="mpi01", report_url=f"{world['server'].url}/v1/nodes/report", report_timeout=10
    )
    token = base64.b64encode(f"mpi01:{world['keys']['mpi01']}".encode()).decode()
    rep = report_mod.Reporter(cfg, logging.getLogger("t"), lambda: (world["keys"]["mpi01"], token))
    bad = [{"selector": "ms1-mpi02", "public_key": "A" * 392, "state": "active", "created_at": 1}]
    with pytest.raises(errors.TickError) as exc:
        rep.post({"status": "ok", "dkim_keys": bad})
    assert "HTTP 400" in str(exc.value) and "not one of node mpi01's" in str(exc.value)
