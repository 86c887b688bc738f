"""DKIM end to end: real `mailstate serve`, real Postfix + Dovecot, real OpenDKIM (the bundle's
opendkim.conf) as the milter of the submission services, and the real pi-pull single file.

The node makes its key, reports it as pending (nothing is signed yet), starts signing on the
next tick; a message submitted by an authenticated user reaches the SMTP sink with a
DKIM-Signature that dkimpy verifies against the TXT value `dns-records` gives for that node
and selector. Then `pi_pull.py dkim-rotate`: the new key is reported and listed before it
signs, the old one keeps signing until then, and stays listed (retired) after the switch.

The node runs the map layout of a new user's bundle (tests/helpers/mailnode.py `bundle_layout()`: 16
bucketed tables a map). The one-table layout keeps its domains elsewhere (a text file beside the
table), so it is an extra case: a message signed and verified there too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

from mailstate.compiler.node_bundle import opendkim_snippet
from tests.helpers.fleet import provision_node
from tests.helpers.mailnode import (
    MailNode,
    bundle_layout,
    free_ports,
    pi_pull_script,
    require_binaries,
    run_pi_pull,
    running_mailnode,
    wait_port,
)
from tests.helpers.server import LiveServer
from tests.helpers.smtpsink import Received

pytestmark = pytest.mark.e2e
API = "/v1/email-account"
PASSWORD = "correct horse battery"


class OpenDkim:
    """opendkim in the background from the bundle's opendkim.conf (socket, pid file and key dir on test paths)."""

    def __init__(self, workdir: Path, port: int, key_dir: Path) -> None:
        self.conf = workdir / "opendkim.conf"
        self.pid = workdir / "opendkim.pid"
        snippet = opendkim_snippet(
            dkim_milter=f"inet:127.0.0.1:{port}",
            key_dir=str(key_dir),
            pid_file=str(self.pid),
            user="",
            syslog=False,
            require_safe_keys=False,
        )  # the keys are under /tmp (world-writable)
        self.conf.write_text(snippet)
        self.port = port

    @property
    def reload(self) -> str:
        # What systemd's ExecReload does (SIGUSR1); nothing to reload before it runs.
        return f"[ ! -f {self.pid} ] || kill -USR1 $(cat {self.pid})"

    def start(self) -> None:
        r = subprocess.run(["opendkim", "-x", str(self.conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr + r.stdout
        wait_port(self.port)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pid.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A serve and a DKIM-signing node; ``request.param`` (indirect): the node's map_buckets, else the bundle's."""
    require_binaries("opendkim", "openssl")
    (milter_port,) = free_ports(1)
    buckets = getattr(request, "param", None)
    with running_mailnode(dkim_milter=f"inet:127.0.0.1:{milter_port}", map_buckets=buckets) as node:
        key_dir = node.workdir / "dkim"
        od = OpenDkim(node.workdir, milter_port, key_dir)
        server = LiveServer(tmp_path / "srv")
        server.cli(
            "init", "--data", str(server.data.root), "--bcrypt-cost", "4", "--mail-root", str(node.mail_root),
            "--uid", str(node.uid), "--gid", str(node.gid), "--mx-host", "mx1.platform.test",
        )  # fmt: skip
        server.admin_token = server.create_token(name="admin")
        project = server.create_token(project=42, name="p42")
        server.start()
        admin, p42 = server.client(server.admin_token), server.client(project)
        try:
            ini = provision_node(node, server, admin, node.workdir / "etc", name="mpi01")
            with open(ini, "a") as fh:
                fh.write(
                    f"[dkim]\nenabled = yes\nkey_dir = {key_dir}\nkey_owner =\npublish_wait = 0\nreload = {od.reload}\n"
                )
            assert (
                admin.post(f"{API}/link-domain", json={"domain": "shop.example", "project_id": 42}).status_code == 201
            )
            assert p42.post(f"{API}/enable-email", json={"domain": "shop.example"}).status_code == 200
            assert (
                p42.post(f"{API}/add-user", json={"email": "anna@shop.example", "password": PASSWORD}).status_code
                == 201
            )
            yield {"node": node, "server": server, "p42": p42, "ini": ini, "od": od, "key_dir": key_dir}
        finally:
            od.stop()
            admin.close()
            p42.close()
            server.stop()


def tick(w: dict[str, Any]) -> str:
    r = run_pi_pull(w["ini"])
    assert r.returncode == 0, r.stderr
    return r.stderr


def dkim_records(w: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{selector: (state, TXT value)} of node mpi01, as dns-records gives them."""
    r = w["p42"].get(f"{API}/dns-records", params={"domain": "shop.example"})
    assert r.status_code == 200, r.text
    return {
        rec["selector"]: (rec["state"], rec["value"])
        for rec in r.json()["records"]
        if rec["node"] == "mpi01" and rec["type"] == "TXT"
    }


def send(w: dict[str, Any], subject: str) -> Received:
    node: MailNode = w["node"]
    node.submit("anna@shop.example", PASSWORD, "anna@shop.example", ["someone@faraway.example"], subject)
    return node.wait_sink(subject)


def send_signed_by(w: dict[str, Any], subject: str, selector: str) -> Received:
    """Submit until the sink gets a message signed with `selector`: OpenDKIM reloads its tables
    on SIGUSR1 in the background, so the first message after a reload may still see the old ones."""
    for attempt in range(20):
        msg = send(w, f"{subject} ({attempt})")
        if (msg.header("DKIM-Signature") or "") and signature_tags(msg)["s"] == selector:
            return msg
        time.sleep(0.5)
    raise AssertionError(f"no message signed by {selector}")


def signature_tags(msg: Received) -> dict[str, str]:
    value = msg.header("DKIM-Signature")
    assert value, msg.data[:2000]
    return {k.strip(): v.strip() for k, _, v in (part.partition("=") for part in value.split(";")) if k.strip()}


def verifies(msg: Received, records: dict[str, tuple[str, str]]) -> bool:
    """dkimpy's verdict, with DNS answered from `dns-records` only."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        for selector, (_state, value) in records.items():
            if name == f"{selector}._domainkey.shop.example.".encode():
                return value.encode()
        return b""

    return bool(dkim.verify(msg.data, dnsfunc=dnsfunc))


def test_submitted_mail_is_signed_with_the_published_key_and_rotation_publishes_first(world: dict[str, Any]) -> None:
    w = world
    assert w["node"].map_buckets == bundle_layout().map_buckets > 0  # bucketed, as a new user's node
    log = tick(w)  # applies the release, makes ms1 pending, reports it
    assert "new key on selector ms1-mpi01" in log and "BEGIN PRIVATE" not in log
    key = w["key_dir"] / "ms1-mpi01.private"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    w["od"].start()
    records = dkim_records(w)
    assert [(s, st) for s, (st, _v) in records.items()] == [("ms1-mpi01", "pending")]
    assert records["ms1-mpi01"][1].startswith("v=DKIM1; k=rsa; p=")
    # Reported but not active yet: OpenDKIM has no key for the domain, nothing is signed.
    unsigned = send(w, "before the key is live")
    assert unsigned.header("DKIM-Signature") is None

    log = tick(w)  # publish_wait 0: active now; tables rendered, OpenDKIM reloaded
    tick(w)  # reports the active state
    records = dkim_records(w)
    assert records["ms1-mpi01"][0] == "active"
    first = send_signed_by(w, "signed by ms1", "ms1-mpi01")
    tags = signature_tags(first)
    assert (tags["d"], tags["s"], tags["a"]) == ("shop.example", "ms1-mpi01", "rsa-sha256")
    assert verifies(first, records)
    # The log said so when it began, and names what the tables sign.
    assert "dkim: signing the mail of 1 domain(s) with ms1-mpi01" in log, log
    assert (w["key_dir"] / "SigningTable").read_text() == "*@shop.example shop.example\n"
    # A tampered message fails against the same record: the check can fail.
    assert not verifies(
        Received(first.mail_from, first.rcpt_to, first.data.replace(b"sent by the test", b"sent by a forger")), records
    )

    # Rotation: the new key is reported (and listed) while the old one still signs.
    r = subprocess.run(
        [shutil.which("python3") or "python3", str(pi_pull_script()), "dkim-rotate", "--config", str(w["ini"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "new pending key on ms2-mpi01" in r.stderr, r.stderr
    tick(w)
    records = dkim_records(w)
    assert {s: st for s, (st, _v) in records.items()} == {"ms1-mpi01": "active", "ms2-mpi01": "pending"}
    still = send(w, "still ms1 while ms2 is pending")
    assert signature_tags(still)["s"] == "ms1-mpi01" and verifies(still, records)

    tick(w)  # ms2 was reported: it signs from now on
    tick(w)
    records = dkim_records(w)
    assert {s: st for s, (st, _v) in records.items()} == {"ms1-mpi01": "retired", "ms2-mpi01": "active"}
    second = send_signed_by(w, "signed by ms2", "ms2-mpi01")
    assert verifies(second, records)
    # The retired key stays published: mail signed before the switch still verifies.
    assert verifies(first, records)
    # The private keys never left the node: the server's database holds public halves only.
    db = (w["server"].data.root / "mailstate.db").read_bytes()
    assert b"PRIVATE" not in db and key.read_text().splitlines()[1].encode() not in db
    assert httpx.get(f"{w['server'].url}/v1/health").status_code == 200


@pytest.mark.parametrize("world", [0], ids=["one-table"], indirect=True)
def test_the_one_table_layout_signs_too(world: dict[str, Any]) -> None:
    w = world
    assert w["node"].map_buckets == 0
    tick(w)
    w["od"].start()
    assert send(w, "not yet").header("DKIM-Signature") is None  # pending: nothing signed
    log = tick(w)
    tick(w)
    records = dkim_records(w)
    assert records["ms1-mpi01"][0] == "active"
    msg = send_signed_by(w, "signed, one table a map", "ms1-mpi01")
    assert signature_tags(msg)["d"] == "shop.example" and verifies(msg, records)
    assert "dkim: signing the mail of 1 domain(s) with ms1-mpi01" in log, log
