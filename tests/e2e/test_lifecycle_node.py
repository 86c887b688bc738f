"""The node side of the mailbox lifecycle, with real Postfix and Dovecot.

A real `mailstate serve` (tests/helpers/server.py) makes the commits through its HTTP API; the node
pulls them through /v1/nodes/state.git with the single-file agent (`run_pi_pull`) or, where
time must pass, with the agent package in this process and a fake clock (`Agent(clock=...)`,
the seam: nothing sleeps). Mail goes in over SMTP and is read back over IMAP.

* hard delete, then re-add: the new owner's INBOX is empty; the old Maildir sits in
  `<mail_root>/.graveyard/` until `purge_after_days` have passed on the node's clock;
* a removed domain's Maildirs go to the graveyard too; a soft-deleted mailbox keeps its
  Maildir, and restore-user brings the login and the mail back;
* usage reaches list-users after a delivery and a report;
* a format-1 data dir with mail in it, upgraded by the server's upgrade commit: every Maildir
  moves to `<local>~<id>` and no message is lost, including one delivered through the old
  files while the move ran and one delivered into the old path behind the agent's back;
* hostile names (in a commit or on disk) never steer a move, a purge or a measurement.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from mailstate.state.datadir import init_data_dir
from mailstate.state.models import Settings
from mailstate.state.signing import Ed25519Signer
from mailstate.state.store import Store
from mailstate.state.upgrade import upgrade_store
from tests.helpers.common import ADMIN, PROJECT_A, FakeClock
from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.mailnode import MailNode, run_pi_pull
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

EXIT_OK = 0
P1, P2 = "first password", "second password"
DAY = 86400.0


# --------------------------------------------------------------------------- helpers


def homes(node: MailNode, domain: str) -> list[str]:
    d = node.mail_root / domain
    return sorted(os.listdir(d)) if d.is_dir() else []


def graveyard(node: MailNode) -> list[str]:
    g = node.mail_root / ".graveyard"
    return sorted(os.listdir(g)) if g.is_dir() else []


def files_containing(top: Path, needle: bytes) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def inbox_count(node: MailNode, user: str, password: str) -> int:
    m = node.imap(user, password)
    try:
        typ, data = m.select("INBOX")
        assert typ == "OK"
        return int(data[0] or 0)
    finally:
        with contextlib.suppress(Exception):
            m.logout()


def subjects(node: MailNode, user: str, password: str) -> list[str]:
    m = node.imap(user, password)
    try:
        m.select("INBOX")
        _typ, data = m.search(None, "ALL")
        out = []
        for num in (data[0] or b"").split():
            _typ, fetched = m.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            item = fetched[0]
            assert isinstance(item, tuple)
            out.append(bytes(item[1]).decode().split(":", 1)[1].strip())
        return sorted(out)
    finally:
        with contextlib.suppress(Exception):
            m.logout()


def in_process_tick(pipull: ModuleType, cfg: Path, now: float, wrap: Callable[[Any], None] | None = None) -> Any:
    """One tick of the agent package in this process, its clock reading ``now``."""
    agent = pipull.agent.Agent(pipull.config.load_config(str(cfg)), clock=lambda: now)
    if wrap is not None:
        wrap(agent)
    return agent.tick()


@dataclass
class Fleet:
    server: LiveServer
    node: MailNode
    cfg: Path
    admin: httpx.Client
    project: httpx.Client

    def call(
        self, op: str, body: dict[str, object] | None = None, status: int = 200, *, admin: bool = False
    ) -> dict[str, Any]:
        client = self.admin if admin else self.project
        r = (
            client.get(f"/v1/email-account/{op}", params=body)
            if op.startswith("list-")
            else client.post(f"/v1/email-account/{op}", json=body or {})
        )
        assert r.status_code == status, r.text
        return r.json()  # type: ignore[no-any-return]

    def tick(self) -> subprocess.CompletedProcess[str]:
        r = run_pi_pull(self.cfg)
        assert r.returncode == EXIT_OK, r.stderr
        return r


@pytest.fixture
def fleet(mailnode: MailNode, tmp_path: Path) -> Iterator[Fleet]:
    server, admin, project = start_server_for(mailnode, tmp_path / "server")
    try:
        cfg = provision_node(mailnode, server, admin, tmp_path / "etc")
        fleet = Fleet(server=server, node=mailnode, cfg=cfg, admin=admin, project=project)
        for domain in ("alpha.example", "beta.example"):
            fleet.call("link-domain", {"domain": domain, "project_id": 42}, 201, admin=True)
            fleet.call("enable-email", {"domain": domain})
        yield fleet
    finally:
        admin.close()
        project.close()
        server.stop()


# --------------------------------------------------------------------------- real node, real server


def test_hard_delete_then_re_add_starts_empty_and_the_old_maildir_is_purged_later(
    fleet: Fleet, pipull: ModuleType
) -> None:
    f, node = fleet, fleet.node
    f.call("add-user", {"email": "reuse@alpha.example", "password": P1}, 201)
    f.call("add-user", {"email": "stays@alpha.example", "password": P1}, 201)
    f.tick()
    node.send("reuse@alpha.example", "for-the-old-owner", "private to the first owner\n")
    node.send("stays@alpha.example", "for-stays")
    node.wait_for_message("reuse@alpha.example", P1, "for-the-old-owner")
    node.wait_for_message("stays@alpha.example", P1, "for-stays")
    [old_home, stays_home] = homes(node, "alpha.example")
    assert old_home.startswith("reuse~") and stays_home.startswith("stays~")

    # hard delete: no login, 550, and the Maildir leaves the live tree for the graveyard
    f.call("remove-user", {"email": "reuse@alpha.example", "hard_delete": True})
    f.tick()
    assert not node.can_login("reuse@alpha.example", P1)
    assert node.rcpt_code("reuse@alpha.example")[0] == 550
    assert homes(node, "alpha.example") == [stays_home]
    [entry] = graveyard(node)
    assert entry.endswith(f"_alpha.example_{old_home}")
    assert files_containing(node.mail_root / ".graveyard" / entry, b"private to the first owner")

    # re-add the same address: a new id, a new home, an empty INBOX
    f.call("add-user", {"email": "reuse@alpha.example", "password": P2}, 201)
    f.tick()
    assert inbox_count(node, "reuse@alpha.example", P2) == 0
    node.send("reuse@alpha.example", "for-the-new-owner")
    node.wait_for_message("reuse@alpha.example", P2, "for-the-new-owner")
    assert subjects(node, "reuse@alpha.example", P2) == ["for-the-new-owner"]
    new_home = next(h for h in homes(node, "alpha.example") if h.startswith("reuse~"))
    assert new_home != old_home
    assert graveyard(node) == [entry]  # still there: purge_after_days (7) have not passed

    # the purge, on the node's clock: not after 6 days, gone after 7; live Maildirs untouched
    now = time.time()
    assert in_process_tick(pipull, f.cfg, now + 6 * DAY).status == "ok"
    assert graveyard(node) == [entry]
    assert in_process_tick(pipull, f.cfg, now + 7 * DAY + 60).status == "ok"
    assert graveyard(node) == []
    assert not files_containing(node.mail_root, b"private to the first owner")
    assert sorted(homes(node, "alpha.example")) == sorted([stays_home, new_home])
    assert subjects(node, "stays@alpha.example", P1) == ["for-stays"]
    assert subjects(node, "reuse@alpha.example", P2) == ["for-the-new-owner"]

    # a removed domain's Maildirs go the same way (disable-email: the domain leaves rendered/)
    f.call("add-user", {"email": "b@beta.example", "password": P1}, 201)
    f.tick()
    node.send("b@beta.example", "for-beta")
    node.wait_for_message("b@beta.example", P1, "for-beta")
    [beta_home] = homes(node, "beta.example")
    f.call("remove-user", {"email": "b@beta.example"})  # soft: disable-email wants no active mailbox
    f.call("disable-email", {"domain": "beta.example"})
    f.tick()
    assert node.rcpt_code("b@beta.example")[0] in (550, 554)
    assert homes(node, "beta.example") == []
    [beta_entry] = graveyard(node)
    assert beta_entry.endswith(f"_beta.example_{beta_home}")
    # purge_after_days 0 would purge on the next tick; here 7 days on the node's clock
    assert in_process_tick(pipull, f.cfg, time.time() + 7 * DAY + 60).status == "ok"
    assert graveyard(node) == []
    assert sorted(homes(node, "alpha.example")) == sorted([stays_home, new_home])


def test_soft_delete_keeps_the_maildir_restore_brings_it_back_and_usage_reaches_list_users(
    fleet: Fleet, pipull: ModuleType
) -> None:
    f, node = fleet, fleet.node
    f.call("add-user", {"email": "keep@alpha.example", "password": P1}, 201)
    f.tick()
    rows = f.call("list-users", {"domain": "alpha.example"})["users"]
    assert [(r["used_mb"], r["messages"], r["usage_reported_at"]) for r in rows] in (
        [(None, None, None)],
        [(0.0, 0, rows[0]["usage_reported_at"])],
    )
    body = "x" * 20000 + "\n"
    node.send("keep@alpha.example", "kept-message", body)
    node.wait_for_message("keep@alpha.example", P1, "kept-message")

    # usage: measured every usage_interval (900 s) on the node's clock, sent with the report
    assert in_process_tick(pipull, f.cfg, time.time() + 1000).status == "ok"
    [row] = f.call("list-users", {"domain": "alpha.example"})["users"]
    assert row["messages"] == 1 and row["usage_reported_at"]
    assert 0.019 <= row["used_mb"] <= 0.03, row  # ~20 kB of message (MiB, two decimals)
    [dom] = [d for d in f.call("list-domains")["domains"] if d["domain"] == "alpha.example"]
    assert dom["messages"] == 1 and dom["used_mb"] == row["used_mb"], dom

    # soft delete: no login, but the Maildir stays where it is (not in the graveyard)
    [home] = homes(node, "alpha.example")
    f.call("remove-user", {"email": "keep@alpha.example"})
    f.tick()
    assert not node.can_login("keep@alpha.example", P1)
    assert node.rcpt_code("keep@alpha.example")[0] == 550
    assert homes(node, "alpha.example") == [home] and graveyard(node) == []
    # ... even once the purge age has passed
    assert in_process_tick(pipull, f.cfg, time.time() + 30 * DAY).status == "ok"
    assert homes(node, "alpha.example") == [home] and graveyard(node) == []

    # restore-user: the login and the mail are back
    f.call("restore-user", {"email": "keep@alpha.example"})
    f.call("restore-user", {"email": "keep@alpha.example"}, 409)
    f.call("restore-user", {"email": "nobody@alpha.example"}, 404)
    f.tick()
    assert node.can_login("keep@alpha.example", P1)
    assert subjects(node, "keep@alpha.example", P1) == ["kept-message"]
    assert homes(node, "alpha.example") == [home]


# --------------------------------------------------------------------------- the format 1 -> 2 upgrade


def test_upgrade_of_a_format_1_node_with_mail_loses_no_message(
    mailnode: MailNode,
    tmp_path: Path,
    pipull: ModuleType,
) -> None:
    node = mailnode
    # The data dir exactly as the format-1 code left it (a Store opened directly never upgrades).
    dd = init_data_dir(
        tmp_path / "data",
        Settings(format=1, bcrypt_cost=4, mail_root=str(node.mail_root), uid=node.uid, gid=node.gid),
        clock=FakeClock(),
    )
    store = Store(dd.repo, Ed25519Signer(dd.key), clock=FakeClock(), cache_path=None)
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    for email in ("info@example.com", "sales@example.com", "quiet@example.com", "gone@example.com"):
        store.execute("add-user", PROJECT_A, {"email": email, "password": P1})
    # The store runs on FakeClock, so its statements are dated months back: freshness off here.
    cfg = node.write_pi_pull_config(
        tmp_path / "pi-pull.ini", str(dd.repo), dd.allowed_signers, extra="[freshness]\nmax_staleness = 0\n"
    )
    assert run_pi_pull(cfg).returncode == EXIT_OK
    for to, subject in (
        ("info@example.com", "info-1"),
        ("info@example.com", "info-2"),
        ("sales@example.com", "sales-1"),
        ("gone@example.com", "gone-1"),
    ):
        node.send(to, subject)
        node.wait_for_message(to, P1, subject)
    assert homes(node, "example.com") == ["gone", "info", "sales"]  # format 1: <local>; quiet never got mail
    # A hard delete must not leave the Maildir in place for the next owner of the address.
    store.execute("remove-user", PROJECT_A, {"email": "gone@example.com", "hard_delete": True})
    assert run_pi_pull(cfg).returncode == EXIT_OK

    # The server's upgrade commit (one signed commit: ids, homes <local>~<id>, mailboxes, settings).
    result = upgrade_store(store)
    assert result["upgraded"] is True
    upgrade_commit = result["commit"]
    boxes = store.snapshot.domains["example.com"].mailboxes
    new_home = {local: f"{local}~{box.id}" for local, box in boxes.items()}

    # While the agent moves the Maildirs: a message delivered through the still-live format-1
    # files (it must follow the symlink into the new home), and one that lands in the old path
    # behind the agent's back (the race the merge after the reload exists for).
    ran: list[bool] = []

    def wrap(agent: Any) -> None:
        real_swap = agent.releases.swap_to

        def swap_to(sha: str | None) -> None:
            if sha == upgrade_commit and not ran:
                ran.append(True)
                d = node.mail_root / "example.com"
                assert (d / "info").is_symlink() and os.readlink(d / "info") == new_home["info"]
                node.send("info@example.com", "info-during-move")
                node.wait_for_message("info@example.com", P1, "info-during-move")
                (d / "sales").unlink()  # as if the delivery had raced the rename
                node.send("sales@example.com", "sales-raced")
                node.wait_for_message("sales@example.com", P1, "sales-raced")
                assert (d / "sales").is_dir() and not (d / "sales").is_symlink()
            real_swap(sha)

        agent.releases.swap_to = swap_to

    now = time.time()
    result_tick = in_process_tick(pipull, cfg, now, wrap)
    assert result_tick.status == "ok", result_tick.message
    assert ran == [True], "the swap to the upgrade commit never happened"
    d = node.mail_root / "example.com"
    # new homes; the raced sales/ was merged and its husk went to the graveyard with gone/
    assert sorted(p for p in homes(node, "example.com") if "~" in p) == sorted([new_home["info"], new_home["sales"]])
    assert (d / "info").is_symlink() and not (d / "sales").exists()
    assert any(e.endswith("_example.com_gone") for e in graveyard(node))
    assert any(e.endswith("_example.com_sales") for e in graveyard(node))
    # logins unchanged, no message lost
    assert subjects(node, "info@example.com", P1) == ["info-1", "info-2", "info-during-move"]
    assert subjects(node, "sales@example.com", P1) == ["sales-1", "sales-raced"]
    assert inbox_count(node, "quiet@example.com", P1) == 0
    assert not node.can_login("gone@example.com", P1)
    node.send("info@example.com", "info-after")
    node.wait_for_message("info@example.com", P1, "info-after")

    # After the grace period the symlinks go; everything still there. Then the purge.
    assert in_process_tick(pipull, cfg, now + 2 * DAY).status == "ok"
    assert homes(node, "example.com") == sorted(
        new_home[x] for x in ("info", "quiet", "sales")
    )  # quiet's: Dovecot, at its login
    assert subjects(node, "info@example.com", P1) == ["info-1", "info-2", "info-after", "info-during-move"]
    assert subjects(node, "sales@example.com", P1) == ["sales-1", "sales-raced"]
    assert in_process_tick(pipull, cfg, now + 8 * DAY).status == "ok"
    assert graveyard(node) == []
    assert subjects(node, "sales@example.com", P1) == ["sales-1", "sales-raced"]


# --------------------------------------------------------------------------- units: names, settings, usage


def test_settings_are_parsed_strictly(pipull: ModuleType) -> None:
    lc = pipull.lifecycle
    assert lc.parse_settings(b"format 2\npurge_after_days 0\n") == lc.NodeSettings(format=2, purge_after_days=0)
    assert lc.parse_settings(b"format 2\npurge_after_days 3650\n").purge_after_days == 3650
    for bad in (
        b"",
        b"format 2\n",
        b"format 2\npurge_after_days 7",
        b"format 3\npurge_after_days 7\n",
        b"format 2\npurge_after_days -1\n",
        b"format 2\npurge_after_days 3651\n",
        b"purge_after_days 7\nformat 2\n",
        b"format 2\npurge_after_days 7\nextra 1\n",
        b"format 2\npurge_after_days 7 \n",
        b"format 2\npurge_after_days \xff\n",
        b"format  2\npurge_after_days 7\n",
    ):
        with pytest.raises(pipull.errors.Refused):
            lc.parse_settings(bad)


def test_hostile_names_never_steer_a_path(pipull: ModuleType, tmp_path: Path) -> None:
    lc = pipull.lifecycle
    for name in ("info", "info~20261201-3fa9c2", "a.b+c_d-e", "x~20250101-000000"):
        assert lc.is_mailbox_dir_name(name)
    for name in (
        "..",
        ".",
        ".graveyard",
        "../x",
        "a/b",
        "info~",
        "info~../../etc",
        "info~20261201-3FA9C2",
        "Info",
        "",
        "a~b~c",
        "info\n",
    ):
        assert not lc.is_mailbox_dir_name(name)
    long_domain = ".".join(["a" * 63] * 3) + ".example"
    entry = lc.graveyard_name("20261201T000000Z", long_domain, "x" * 64 + "~20261201-3fa9c2")
    assert len(entry.encode()) <= 255 - 8 and "/" not in entry and entry.startswith("20261201T000000Z_")
    for line in (b"../../etc 20261201-3fa9c2 active\n", b"info ../x active\n", b"info 20261201-3fa9c2/.. active\n"):
        with pytest.raises(pipull.errors.Refused):
            list(lc.parse_mailboxes(line, "example.com"))

    # On disk: a symlinked domain dir, a symlink among the homes and odd names are never moved,
    # and the sweep never leaves the domain's directory.
    root = tmp_path / "vmail"
    outside = tmp_path / "outside"
    (outside / "victim~20261201-000001").mkdir(parents=True)
    root.mkdir()
    (root / "evil.example").symlink_to(outside)
    d = root / "example.com"
    (d / "owned~20261201-000002" / "Maildir" / "cur").mkdir(parents=True)
    (d / "unowned~20261201-000003").mkdir()
    (d / "link~20261201-000004").symlink_to(outside / "victim~20261201-000001")
    (d / "Not A Mailbox").mkdir()
    (d / "file~20261201-000005").write_text("x")
    cfg = pipull.config.Config(remote_url="/nowhere", mail_root=str(root), mail_uid=1, mail_gid=1)
    import logging

    life = lc.Lifecycle(cfg, None, None, logging.getLogger("test"), clock=lambda: 1_780_000_000.0)
    rfd = life._open_root()
    try:
        assert life._sweep_domain(rfd, "evil.example", None, keep_bare=False) == 0
        assert life._sweep_domain(rfd, "example.com", [("owned", "20261201-000002")], keep_bare=False) == 1
        with pytest.raises(pipull.errors.Refused):
            life._sweep_domain(rfd, "../outside", None, keep_bare=False)
    finally:
        os.close(rfd)
    assert sorted(os.listdir(d)) == [
        "Not A Mailbox",
        "file~20261201-000005",
        "link~20261201-000004",
        "owned~20261201-000002",
    ]
    assert os.listdir(root / ".graveyard") == ["20260528T202640Z_example.com_unowned~20261201-000003"]
    assert (outside / "victim~20261201-000001").is_dir()
    # The purge deletes the entry, not what a symlink inside it points at; foreign names stay.
    (root / ".graveyard" / "20260528T202640Z_example.com_unowned~20261201-000003" / "escape").symlink_to(outside)
    (root / ".graveyard" / "not-ours").mkdir()
    st = {"lifecycle": {"purge_after_days": 0}}
    assert life.purge(st) == 1
    assert os.listdir(root / ".graveyard") == ["not-ours"]
    assert (outside / "victim~20261201-000001").is_dir()


def test_usage_reads_sizes_from_maildir_names_and_stats_the_rest(pipull: ModuleType, tmp_path: Path) -> None:
    usage = pipull.usage
    home = tmp_path / "example.com" / "info~20261201-3fa9c2"
    md = home / "Maildir"
    for sub in ("cur", "new", "tmp", ".Sent/cur", ".Sent/new", ".Sent/tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1700000000.M1P1.host,S=1234,W=1260:2,S").write_text("ignored: the name carries the size")
    (md / "new" / "1700000001.M2P1.host,S=10").write_text("")
    (md / "new" / "1700000002.M3P1.host").write_bytes(b"y" * 77)  # no S=: stat
    (md / ".Sent" / "cur" / "1700000003.M4P1.host,S=5:2,S").write_text("")
    (md / "tmp" / "1700000004.M5P1.host,S=999999").write_text("")  # in progress: not mail yet
    (md / "dovecot.index").write_bytes(b"z" * 5000)
    (md / ".Sent" / "cur" / "escape,S=1000000").symlink_to(tmp_path)  # a name with S= still counts by name
    (md / ".Evil").symlink_to(tmp_path)  # never followed
    assert usage.measure_maildir(str(home)) == (1234 + 10 + 77 + 5 + 1000000, 5)
    # A home straight in Maildir form (Postfix virtual delivery), a missing home, a symlinked home.
    direct = tmp_path / "example.com" / "direct~20261201-000001"
    for sub in ("cur", "new", "tmp"):
        (direct / sub).mkdir(parents=True)
    (direct / "new" / "1.M1.h,S=3").write_text("")
    (tmp_path / "example.com" / "linked~20261201-000002").symlink_to(home)
    got = list(
        usage.measure(
            str(tmp_path),
            [
                ("example.com", "direct", "20261201-000001"),
                ("example.com", "missing", "20261201-000003"),
                ("example.com", "linked", "20261201-000002"),
            ],
        )
    )
    assert got == [
        {"email": "direct@example.com", "id": "20261201-000001", "used_bytes": 3, "messages": 1},
        {"email": "missing@example.com", "id": "20261201-000003", "used_bytes": 0, "messages": 0},
        {"email": "linked@example.com", "id": "20261201-000002", "used_bytes": 0, "messages": 0},
    ]
