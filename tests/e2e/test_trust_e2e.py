"""Freshness and server key rotation end to end: a real `mailstate serve`, a real mail node, real pi_pull.py ticks.

* A stopped server: the node keeps serving, its tick exits 5 and says stale; the server back:
  ok again (its statement refreshes every MAILSTATE_STATEMENT_INTERVAL).
* `mailstate key rotate` while the server runs: the next statement is signed by the new key
  and carries the old key's endorsement; the node learns the new key (trust.json, across
  runs), applies commits signed by it, and the old key is retired on both sides.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pygit2
import pytest

from mailstate.state.signing import Ed25519Signer
from mailstate.state.statement import parse_statement, read_statement, write_statement
from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.mailnode import MailNode, run_pi_pull
from tests.helpers.pipull import tick_in_process
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

EXIT_OK, EXIT_REFUSED, EXIT_STALE = 0, 3, 5
MAX_STALENESS = 3
FRESHNESS = f"[freshness]\nmax_staleness = {MAX_STALENESS}\n"


@dataclass
class World:
    server: LiveServer
    node: MailNode
    admin: httpx.Client
    project: httpx.Client
    etc: Path

    def config(self) -> Path:
        """The node's ini for the server's current URL (a restarted server has another port)."""
        return self.node.write_pi_pull_config(
            self.etc / "pi-pull.ini",
            f"{self.server.url}/v1/nodes/state.git",
            self.etc / "allowed_signers",
            name="mpi01",
            sync_key_file=self.etc / "sync_key",
            report_url=f"{self.server.url}/v1/nodes/report",
            extra=FRESHNESS,
        )

    def tick(self) -> subprocess.CompletedProcess[str]:
        return run_pi_pull(self.config())

    def add_user(self, email: str, password: str) -> None:
        r = self.project.post("/v1/email-account/add-user", json={"email": email, "password": password})
        assert r.status_code == 201, r.text

    def clients(self) -> None:
        self.admin.close()
        self.project.close()
        self.admin = self.server.client(self.server.admin_token)
        self.project = self.server.client(self.project_token)

    project_token: str = ""


def statement_issued_at(server: LiveServer) -> int:
    """Issued-At of the statement in the server's repo (refs/mailstate/accepted)."""
    found = read_statement(pygit2.Repository(str(server.data.repo)))
    assert found is not None, "no statement in the server's repo"
    return parse_statement(found[1]).issued_at


def wait_until(predicate: Callable[[], bool], *, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def world(mailnode: MailNode, tmp_path: Path) -> Iterator[World]:
    server, admin, project = start_server_for(
        mailnode, tmp_path / "server", env={"MAILSTATE_STATEMENT_INTERVAL": "0.5"}
    )
    try:
        provision_node(mailnode, server, admin, tmp_path / "etc")
        w = World(server=server, node=mailnode, admin=admin, project=project, etc=tmp_path / "etc")
        w.project_token = str(project.headers["Authorization"]).split(" ", 1)[1]
        r = admin.post("/v1/email-account/link-domain", json={"domain": "example.com", "project_id": 42})
        assert r.status_code == 201, r.text
        assert project.post("/v1/email-account/enable-email", json={"domain": "example.com"}).status_code == 200
        yield w
    finally:
        admin.close()
        project.close()
        server.stop()


def test_a_stopped_server_makes_the_node_stale_and_its_return_makes_it_ok(world: World, pipull: ModuleType) -> None:
    w = world
    w.add_user("info@example.com", "info password")
    r = w.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert w.node.can_login("info@example.com", "info password")
    w.server.stop()
    last_signed = statement_issued_at(w.server)
    # The node's next tick, MAX_STALENESS + 1 s on by its clock: no server, no newer statement.
    r = tick_in_process(pipull, w.config(), later_by=MAX_STALENESS + 1)
    assert r.returncode == EXIT_STALE, r.stderr
    assert "stale:" in r.stderr and f"max_staleness = {MAX_STALENESS}" in r.stderr
    assert w.node.can_login("info@example.com", "info password")  # keeps serving
    state = json.loads((w.node.root / "state.json").read_text())
    assert state["last_status"] == "stale"
    assert state["pending_reports"][-1]["status"] == "stale"
    assert isinstance(state["pending_reports"][-1]["statement_issued_at"], int)
    # recovery: the server back, its statement refreshed: ok, the queued stale report delivered
    w.server.start()
    w.clients()
    wait_until(lambda: statement_issued_at(w.server) > last_signed, what="the restarted server refreshes its statement")
    r = w.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert "delivered" in r.stderr
    state = json.loads((w.node.root / "state.json").read_text())
    assert state["pending_reports"] == [] and state.get("last_status") in (None, "ok")
    assert time.time() - state["statement"]["issued_at"] < MAX_STALENESS


def test_server_key_rotation_reaches_the_node_without_reprovisioning(world: World) -> None:
    w = world
    w.add_user("info@example.com", "info password")
    assert w.tick().returncode == EXIT_OK
    provisioned = (w.etc / "allowed_signers").read_text()
    old_pub = " ".join(Path(f"{w.server.data.key}.pub").read_text().split()[:2])

    out = w.server.cli("key", "rotate", "--data", str(w.server.data.root)).stdout
    new_pub = " ".join(Path(f"{w.server.data.key}.pub").read_text().split()[:2])
    assert new_pub != old_pub and new_pub in out
    signers = w.server.data.allowed_signers.read_text()
    assert new_pub.split()[1] in signers and "valid-before=" in next(
        line for line in signers.splitlines() if old_pub.split()[1] in line
    )
    retired = next((w.server.data.root / "retired_keys").glob("signing_key-*[!b]"))

    # a write through the running server: signed by the new key, stated with the endorsement
    w.add_user("after@example.com", "after password")
    assert w.server.verify_commit().returncode == 0  # git verify-commit with the server's allowed_signers
    r = w.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert "learned server key" in r.stderr
    assert w.node.can_login("after@example.com", "after password")
    assert (w.etc / "allowed_signers").read_text() == provisioned  # the provisioned file is never touched
    trust = json.loads((w.node.root / "trust.json").read_text())
    assert [e["key"] for e in trust["learned"]] == [new_pub]
    assert old_pub.split()[1] in trust["retired"]

    # kept across runs (and a restarted server keeps the new key)
    w.server.stop()
    w.server.start()
    w.clients()
    w.add_user("restart@example.com", "restart password")
    r = w.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert "learned" not in r.stderr
    assert w.node.can_login("restart@example.com", "restart password")

    # the retired key signs nothing any more: a statement by it is refused, the node stays
    w.server.stop()
    head = w.server.git("rev-parse", "main").strip()
    write_statement(w.server.data.repo, Ed25519Signer(retired), head)
    w.server.env["MAILSTATE_STATEMENT_INTERVAL"] = "3600"
    w.server.start()  # the server leaves a statement of its own head in place until it refreshes it
    r = w.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr, r.stderr
    assert w.node.can_login("restart@example.com", "restart password")


def test_a_server_whose_statement_is_not_refreshed_makes_the_node_stale_in_list_nodes(
    mailnode: MailNode, tmp_path: Path, pipull: ModuleType
) -> None:
    """The server up but its statement old (here: refreshed only hourly; on a git host: a host
    that keeps serving an old tip): exit 5, and list-nodes shows the node stale with the age."""
    server, admin, project = start_server_for(
        mailnode, tmp_path / "server", env={"MAILSTATE_STATEMENT_INTERVAL": "3600"}
    )
    try:
        provision_node(mailnode, server, admin, tmp_path / "etc")
        w = World(server=server, node=mailnode, admin=admin, project=project, etc=tmp_path / "etc")
        assert (
            admin.post("/v1/email-account/link-domain", json={"domain": "example.com", "project_id": 42}).status_code
            == 201
        )
        assert project.post("/v1/email-account/enable-email", json={"domain": "example.com"}).status_code == 200
        w.add_user("info@example.com", "info password")
        assert w.tick().returncode == EXIT_OK
        kept = json.loads((w.node.root / "state.json").read_text())["statement"]["issued_at"]
        # MAX_STALENESS + 1 s on by the node's clock; the server re-signs hourly, so nothing newer.
        r = tick_in_process(pipull, w.config(), later_by=MAX_STALENESS + 1)
        assert r.returncode == EXIT_STALE, r.stderr
        assert statement_issued_at(server) == kept
        row = next(n for n in admin.get("/v1/email-account/list-nodes").json()["nodes"] if n["name"] == "mpi01")
        assert row["status"] == "stale" and row["stale"] is True
        # The server's age of the statement the node reported (the server's clock did not move).
        assert row["statement_age_s"] is not None and abs(row["statement_age_s"] - (time.time() - kept)) <= 2
        assert w.node.can_login("info@example.com", "info password")
        # a write states a new head: fresh again, applied, ok
        w.add_user("next@example.com", "next password")
        r = w.tick()
        assert r.returncode == EXIT_OK, r.stderr
        assert w.node.can_login("next@example.com", "next password")
        row = next(n for n in admin.get("/v1/email-account/list-nodes").json()["nodes"] if n["name"] == "mpi01")
        assert row["status"] == "ok" and row["stale"] is False
    finally:
        admin.close()
        project.close()
        server.stop()
