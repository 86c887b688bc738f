"""Replicas and failover, end to end: one `mailstate serve` and three nodes in their own network
namespaces, each with its own Postfix and Dovecot from its own bundle (tests/fleetworld.py).
Nothing is faked: mail arrives over SMTP, replication and the hand-over run `doveadm sync` over
TLS between the namespaces, IMAP logins are real.

rep.test is homed on n1 with its replica on n2. The tests run in order: replication on change
(follow mode on n1), then n1 dies and is failed over to n2, then n1 comes back.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fleetworld import PASSWORD, World, fleet_world, wait
from tests.helpers.netns import FleetNode, subjects

pytestmark = pytest.mark.e2e

USER = "ana@rep.test"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with fleet_world(["n1", "n2", "n3"], tmp_path_factory.mktemp("failover")) as w:
        w.call("link-domain", {"domain": "rep.test", "project_id": 42}, 201)
        assert w.call("enable-email", {"domain": "rep.test", "node": "n1"})["home"] == "n1"
        w.call("add-user", {"email": USER, "password": PASSWORD}, 201)
        out = w.call("set-replica", {"domain": "rep.test", "node": "n2"})
        assert (out["home"], out["replica"]) == ("n1", "n2") and out["commit"]
        w.settle()
        yield w


def files(node: FleetNode) -> dict[str, str]:
    """Every message file of rep.test on `node`: base name (dsync keeps it) -> its Maildir flags."""
    out = {}
    for path in node.maildir_messages("rep.test"):
        base, _, flags = path.name.partition(":2,")
        out[base.split(",", 1)[0]] = flags
    return out


def message_subjects(node: FleetNode) -> list[str]:
    """The Subject of every message file of rep.test on `node` (read from the files, not over IMAP)."""
    out = []
    for path in node.maildir_messages("rep.test"):
        for line in path.read_text(errors="replace").splitlines():
            if line.lower().startswith("subject:"):
                out.append(line.split(":", 1)[1].strip())
                break
    return sorted(out)


def with_imap(node: FleetNode) -> imaplib.IMAP4_SSL:
    m = node.imap(USER, PASSWORD)
    m.select("INBOX")
    return m


def uid_of(m: imaplib.IMAP4_SSL, subject: str) -> bytes:
    typ, data = m.uid("SEARCH", None, "SUBJECT", f'"{subject}"')  # type: ignore[arg-type]
    assert typ == "OK" and data[0], (subject, data)
    return bytes(data[0].split()[-1])


def test_a_delivery_a_flag_and_an_expunge_reach_the_replica_on_change(world: World) -> None:
    n1, n2, n3 = (world.nodes[n] for n in ("n1", "n2", "n3"))
    world.followers.append(n1.follow())  # follow mode on the home: replication on change
    time.sleep(2)  # its first tick
    sent = time.monotonic()
    n3.send(USER, "rep-1")  # to a node that is not the home: relayed to n1, replicated to n2
    wait("rep-1 on the home", lambda: "rep-1" in message_subjects(n1), timeout=30)
    on_home = time.monotonic()
    wait("rep-1 on the replica", lambda: "rep-1" in message_subjects(n2), timeout=30)
    lag = time.monotonic() - on_home
    print(f"replication lag of one delivery: {lag:.2f}s ({time.monotonic() - sent:.2f}s from the SMTP send)")
    assert lag < 15, lag  # a change is seen within the replicate interval, not at the minute tick
    assert files(n2).keys() == files(n1).keys()
    n3.send(USER, "rep-2")
    wait("rep-2 on the replica", lambda: "rep-2" in message_subjects(n2), timeout=30)
    # A flag change on the home (IMAP on n3 is proxied there) reaches the replica.
    m = with_imap(n3)
    try:
        m.uid("STORE", uid_of(m, "rep-1"), "+FLAGS", "(\\Flagged)")
    finally:
        with contextlib.suppress(Exception):
            m.logout()
    wait("the flag on the replica", lambda: any("F" in flags for flags in files(n2).values()), timeout=30)
    # An expunge too.
    m = with_imap(n1)
    try:
        m.uid("STORE", uid_of(m, "rep-2"), "+FLAGS", "(\\Deleted)")
        m.expunge()
    finally:
        with contextlib.suppress(Exception):
            m.logout()
    wait("the expunge on the replica", lambda: message_subjects(n2) == ["rep-1"], timeout=30)
    assert n3.maildir_messages("rep.test") == []  # the third node holds nothing
    # The home reports how its replication stands.
    world.tick("n1")
    row = next(n for n in world.call("list-nodes")["nodes"] if n["name"] == "n1")["replication"]
    assert len(row) == 1 and row[0]["peer"] == "n2" and row[0]["domains"] == 1, row
    assert row[0]["error"] is None and row[0]["lag_s"] is not None and row[0]["last_sync_at"], row
    metrics = world.server.client(world.server.admin_token).get("/metrics").text
    assert 'mailstate_replication_lag_seconds{node="n1",peer="n2"}' in metrics


def test_failover_serves_the_replicated_mail_from_the_replica(world: World) -> None:
    n1, n2, n3 = (world.nodes[n] for n in ("n1", "n2", "n3"))
    for proc in world.followers:  # n1 stops replicating...
        proc.terminate()
        proc.wait(10)
    world.followers.clear()
    n3.send(USER, "only-on-n1")  # ...then takes mail that never reaches the replica...
    wait("only-on-n1 on n1", lambda: "only-on-n1" in message_subjects(n1), timeout=30)
    assert "only-on-n1" not in message_subjects(n2)
    n1.stop()  # ...and dies.
    world.tick("n2", "n3")  # the replica reports: healthy
    out = world.call("failover-node", {"name": "n1"})
    assert out["moved"] == ["rep.test"] and out["unavailable"] == [] and out["commit"]
    dom = world.domain("rep.test")
    assert (dom["home"], dom["replica"]) == ("n2", "n1")
    world.tick("n2", "n3")
    # IMAP on the new home, and through n3, shows every replicated message.
    assert subjects(n2, USER, PASSWORD) == ["rep-1"]
    assert subjects(n3, USER, PASSWORD) == ["rep-1"]
    n3.send(USER, "after-failover")
    wait("after-failover on n2", lambda: "after-failover" in subjects(n2, USER, PASSWORD), timeout=30)
    assert n3.maildir_messages("rep.test") == []


def test_the_old_home_returns_takes_no_delivery_and_merges_what_only_it_had(world: World) -> None:
    n1, n2 = (world.nodes[n] for n in ("n1", "n2"))
    n1.start()
    world.settle()  # n1 applies the failover, hands over what it held, and reports it
    dom = world.domain("rep.test")
    assert (dom["home"], dom["replica"]) == ("n2", "n1")
    log = world.server.git("log", "--format=%s|%(trailers:key=Actor,valueonly,separator=)", "-6")
    assert "moved rep.test|node:n1" in log, log
    expected = ["after-failover", "only-on-n1", "rep-1"]
    assert sorted(subjects(n2, USER, PASSWORD)) == expected  # each exactly once
    assert message_subjects(n2) == expected
    # Mail that reaches n1 now goes to the new home; n1 delivers nothing itself.
    n1.send(USER, "to-the-old-home")
    wait("to-the-old-home on n2", lambda: "to-the-old-home" in subjects(n2, USER, PASSWORD), timeout=30)
    assert f"relay={n2.address}[{n2.address}]:2525" in n1.postfix_log()
    assert sorted(subjects(n2, USER, PASSWORD)) == sorted([*expected, "to-the-old-home"])
    # n1 is the replica now: the new home syncs everything back to it.
    world.tick("n2")
    assert message_subjects(n1) == sorted([*expected, "to-the-old-home"])
    assert sorted(subjects(n1, USER, PASSWORD)) == sorted([*expected, "to-the-old-home"])  # proxied to n2
    assert not list(Path(n1.mail_root, ".fleet-drain").glob("*"))


def test_a_rotated_key_cuts_the_old_password_off_and_replication_follows(world: World) -> None:
    n1, n2 = (world.nodes[n] for n in ("n1", "n2"))
    creds = n1.root / "fleet" / "credentials.json"
    old = json.loads(creds.read_text())["doveadm_password"]
    new_key = world.call("rotate-node-key", {"name": "n1"})["sync_key"]
    (n1.etc / "sync_key").write_text(new_key + "\n")
    world.tick("n1")  # n1 applies it and fetches its new doveadm password
    assert json.loads(creds.read_text())["doveadm_password"] not in (old, "")
    # The old password no longer opens n1's doveadm service.
    conf = n2.workdir / "old-password.conf"
    conf.write_text(f"!include {n2.dovecot_conf}\ndoveadm_password = {old}\n")
    r = n2.run(["doveadm", "-c", str(conf), "sync", "-T", "10", "-u", USER, f"tcps:{n1.address}:12345"])
    assert r.returncode != 0, r.stdout + r.stderr
    # The home's first pass is refused with the password it had cached; the next tick fetches anew.
    n2.send(USER, "after-rotation")
    wait("after-rotation on n2", lambda: "after-rotation" in message_subjects(n2), timeout=30)
    world.tick("n2")
    world.tick("n2")
    assert "after-rotation" in message_subjects(n1)
    row = next(n for n in world.call("list-nodes")["nodes"] if n["name"] == "n2")["replication"]
    assert [(r["peer"], r["error"]) for r in row] == [("n1", None)], row
