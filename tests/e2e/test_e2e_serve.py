"""The whole product, end to end: `mailstate serve` over HTTP → signed commits → pi-pull
ticks through the server's own git endpoint → real Postfix and Dovecot on loopback, checked
with smtplib and imaplib. Nothing is faked. Under CI=true the mail services must be there
(tests.helpers.mailnode fails instead of skipping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mailstate.state.signing import generate_key
from tests.helpers.fleet import P1, P2, Fleet, start_server_for
from tests.helpers.mailnode import MailNode, run_pi_pull

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 3

pytestmark = pytest.mark.e2e


def test_mailboxes_made_through_the_api_receive_mail_and_log_in(fleet: Fleet) -> None:
    f, node = fleet, fleet.node
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    f.call(f.project, "add-user", {"email": "info@example.com", "password": P1, "quota_mb": 512}, status=201)
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr

    # SMTP accepts the address and IMAP reads what was delivered.
    assert node.rcpt_code("info@example.com")[0] == 250
    node.send("info@example.com", "through-the-api", "hello via mailstate\n")
    assert b"hello via mailstate" in node.wait_for_message("info@example.com", P1, "through-the-api")
    # The quota reaches Dovecot.
    user = node.doveadm("user", "info@example.com")
    assert user.returncode == 0, user.stderr
    assert "quota_rule\t*:storage=512M" in user.stdout
    # The node reported, and the server knows it is current.
    row = f.node_row()
    assert row["status"] == "ok" and row["applied_commit"] == f.head() and row["commits_behind"] == 0
    assert row["last_sync_at"]

    # update-password: the old password fails, the new one works.
    f.call(f.project, "update-password", {"email": "info@example.com", "password": P2})
    assert f.node_row()["commits_behind"] == 1
    assert f.tick().returncode == EXIT_OK
    assert not node.can_login("info@example.com", P1)
    assert node.can_login("info@example.com", P2)

    # remove-user (soft): no login, and 550 on delivery.
    f.call(f.project, "remove-user", {"email": "info@example.com"})
    assert f.tick().returncode == EXIT_OK
    assert not node.can_login("info@example.com", P2)
    assert node.rcpt_code("info@example.com")[0] == 550

    # hard_delete: the same.
    f.call(f.project, "add-user", {"email": "sales@example.com", "password": P1}, status=201)
    assert f.tick().returncode == EXIT_OK
    assert node.can_login("sales@example.com", P1)
    f.call(f.project, "remove-user", {"email": "sales@example.com", "hard_delete": True})
    assert f.tick().returncode == EXIT_OK
    assert not node.can_login("sales@example.com", P1)
    assert node.rcpt_code("sales@example.com")[0] == 550

    # disable-email: the whole domain is refused.
    f.call(f.project, "add-user", {"email": "last@example.com", "password": P1}, status=201)
    assert f.tick().returncode == EXIT_OK
    assert node.rcpt_code("last@example.com")[0] == 250
    f.call(f.project, "remove-user", {"email": "last@example.com"})
    f.call(f.project, "disable-email", {"domain": "example.com"})
    assert f.tick().returncode == EXIT_OK
    code, text = node.rcpt_code("last@example.com")
    assert code in (550, 554), text
    assert f.node_row()["status"] == "ok"


def test_refused_commits_never_reach_the_node(fleet: Fleet) -> None:
    """Commits pushed straight into the server's repo that it refuses are never stated accepted:
    the node, which follows only the statement, stays on the last accepted commit and reports ok."""
    f, node = fleet, fleet.node
    f.call(f.admin, "add-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "add-user", {"email": "info@example.com", "password": P1}, status=201)
    assert f.tick().returncode == EXIT_OK
    good = f.head()

    def still_serving() -> None:
        assert node.can_login("info@example.com", P1)
        assert node.rcpt_code("info@example.com")[0] == 250
        assert node.rcpt_code("evil@example.com")[0] == 550

    def add_evil(work: Path) -> None:
        # A hand edit of the compiled files: an extra login the state never had.
        p = work / "rendered/domains/ex/example.com/passwd"
        line = p.read_text().splitlines()[0].replace("info@", "evil@")
        p.write_text(p.read_text() + line + "\n")

    stranger = f.tmp / "stranger_key"
    generate_key(stranger, "stranger@example.org")
    for label, key in (
        ("unsigned", None),
        ("untrusted key", stranger),
        ("trusted key, invalid content", f.server.data.key),
    ):
        bad = f.push_into_server(add_evil, key=key)
        r = f.tick()
        assert r.returncode == EXIT_OK and f"up to date at {good[:12]}" in r.stderr, (label, r.stderr)
        still_serving()
        row = f.node_row()
        assert row["status"] == "ok" and row["applied_commit"] == good, (label, row)
        f.server.git("update-ref", "refs/heads/main", good, bad)  # put the branch back for the next case

    # main forced back to an older commit: the statement only moves forward, the node stays
    f.call(f.project, "add-user", {"email": "sales@example.com", "password": P1}, status=201)
    newer = f.head()
    assert f.tick().returncode == EXIT_OK
    f.server.git("update-ref", "refs/heads/main", good, newer)
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert node.can_login("sales@example.com", P1)  # still on `newer`
    f.server.git("update-ref", "refs/heads/main", newer, good)
    assert f.tick().returncode == EXIT_OK
    assert f.node_row()["status"] == "ok"


PLAIN_NOPASSWORD = "{PLAIN}anything"


def _plain_nopassword(work: Path) -> None:
    """A trusted admin's hand edit: info@ logs in with any password ({PLAIN}, nopassword=y)."""
    p = work / "rendered/domains/ex/example.com/passwd"
    lines = p.read_text().splitlines()
    fields = lines[0].split(":")
    fields[1] = PLAIN_NOPASSWORD
    lines[0] = ":".join(fields) + " nopassword=y"
    p.write_text("\n".join(lines) + "\n")


def test_a_trusted_signed_invalid_commit_never_goes_live_and_the_node_converges(fleet: Fleet) -> None:
    """A commit signed by a trusted key but with a hand-edited {PLAIN} nopassword=y line,
    pushed into the running server's state.git, never goes live on the node; after the correction
    (the next API write) the node converges to the server's head with exit 0; list-nodes tells
    "behind" from "diverged"."""
    f, node = fleet, fleet.node
    f.call(f.admin, "add-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "add-user", {"email": "info@example.com", "password": P1}, status=201)
    assert f.tick().returncode == EXIT_OK
    good = f.head()

    bad = f.push_into_server(_plain_nopassword, key=f.server.data.key)
    assert bad != good
    for _ in range(2):  # before and after the server looked at it
        r = f.tick()
        assert r.returncode == EXIT_OK and f"up to date at {good[:12]}" in r.stderr, r.stderr
        assert not node.can_login("info@example.com", "any password at all")
        assert node.can_login("info@example.com", P1)
        assert f.node_row()["applied_commit"] == good

    # The correction: the next API write. The node moves forward to the server's head.
    f.call(f.project, "add-user", {"email": "sales@example.com", "password": P2}, status=201)
    head = f.head()
    assert head not in (good, bad)
    row = f.node_row()
    assert row["diverged"] is False and row["commits_behind"] >= 1  # behind, not diverged
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f"applied {head[:12]}" in r.stderr
    assert not node.can_login("info@example.com", "any password at all")
    assert node.can_login("info@example.com", P1) and node.can_login("sales@example.com", P2)
    row = f.node_row()
    assert (
        row["status"] == "ok"
        and row["applied_commit"] == head
        and row["commits_behind"] == 0
        and row["diverged"] is False
    )

    # A node that reports a commit off the accepted history (e.g. applied by an old agent) is
    # "diverged", never "N commits behind".
    tree = f.server.git("rev-parse", f"{good}^{{tree}}").strip()
    stray = f.server.git("commit-tree", tree, "-p", good, "-m", "never accepted").strip()
    key = (f.tmp / "etc" / "sync_key").read_text().strip()
    resp = httpx.post(
        f"{f.server.url}/v1/nodes/report",
        auth=("mpi01", key),
        json={"applied_commit": stray, "status": "ok", "error": None},
    )
    assert resp.status_code == 200, resp.text
    row = f.node_row()
    assert row["diverged"] is True and row["commits_behind"] is None
    assert f.tick().returncode == EXIT_OK  # the real node's next report puts it right
    row = f.node_row()
    assert row["diverged"] is False and row["commits_behind"] == 0


def test_a_node_following_a_git_host_never_applies_a_refused_commit(mailnode: MailNode, tmp_path: Path) -> None:
    """Upstream mode: the server pushes main and the statement to a bare repo (the "git host");
    the node follows that repo directly. A trusted-signed invalid commit pushed to the host is
    never applied; after the correction the node converges to the server's head."""
    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    server, admin, project = start_server_for(
        mailnode, tmp_path / "server", extra_args=["--upstream", str(up)], env={"MAILSTATE_SYNC_INTERVAL": "0.3"}
    )
    try:
        signers = tmp_path / "allowed_signers"
        shutil.copy(server.data.allowed_signers, signers)
        cfg = mailnode.write_pi_pull_config(tmp_path / "pi-pull.ini", str(up), signers, name="mpi01")
        assert (
            admin.post("/v1/email-account/add-domain", json={"domain": "example.com", "project_id": 42}).status_code
            == 201
        )
        assert (
            project.post("/v1/email-account/add-user", json={"email": "info@example.com", "password": P1}).status_code
            == 201
        )
        r = run_pi_pull(cfg)
        assert r.returncode == EXIT_OK, r.stderr
        good = subprocess.run(
            ["git", "-C", str(up), "rev-parse", "main"], check=True, capture_output=True, text=True
        ).stdout.strip()
        assert mailnode.can_login("info@example.com", P1)

        # An admin with a trusted key pushes a hand-edited commit to the git host.
        work = tmp_path / "work"
        subprocess.run(["git", "clone", "-q", str(up), str(work)], check=True, env=server.env)
        _plain_nopassword(work)
        base = ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org"]
        subprocess.run([*base, "add", "-A"], check=True, env=server.env)
        subprocess.run(
            [
                *base,
                "-c",
                "gpg.format=ssh",
                "-c",
                f"user.signingkey={server.data.key}",
                "commit",
                "-S",
                "-qm",
                "bypass",
            ],
            check=True,
            env=server.env,
        )
        subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True, env=server.env)
        for _ in range(2):
            r = run_pi_pull(cfg)
            assert r.returncode == EXIT_OK and f"up to date at {good[:12]}" in r.stderr, r.stderr
            assert not mailnode.can_login("info@example.com", "any password at all")
            time.sleep(0.5)  # let the server sync and refuse it

        # The correction: the next API write, pushed to the host with its statement.
        assert (
            project.post("/v1/email-account/add-user", json={"email": "sales@example.com", "password": P2}).status_code
            == 201
        )
        head = server.git("rev-parse", "main").strip()
        r = run_pi_pull(cfg)
        assert r.returncode == EXIT_OK, r.stderr
        assert f"applied {head[:12]}" in r.stderr
        assert not mailnode.can_login("info@example.com", "any password at all")
        assert mailnode.can_login("info@example.com", P1) and mailnode.can_login("sales@example.com", P2)
    finally:
        admin.close()
        project.close()
        server.stop()


def test_a_node_off_its_whitelist_is_refused(fleet: Fleet) -> None:
    f = fleet
    added = f.call(f.admin, "add-node", {"name": "mpi09", "ip_address": "192.0.2.9"}, status=201)
    key_file = f.tmp / "etc" / "mpi09_key"
    key_file.write_text(str(added["sync_key"]))
    key_file.chmod(0o600)
    cfg = f.node.write_pi_pull_config(
        f.tmp / "etc" / "mpi09.ini",
        f"{f.server.url}/v1/nodes/state.git",
        f.tmp / "etc" / "allowed_signers",
        name="mpi09",
        sync_key_file=key_file,
        report_url=f"{f.server.url}/v1/nodes/report",
    )
    r = run_pi_pull(cfg, "--once")
    assert r.returncode == EXIT_ERROR, r.stderr
    assert str(added["sync_key"]) not in r.stderr + r.stdout
    # Its direct report is refused too, and nothing is recorded.
    resp = httpx.post(
        f"{f.server.url}/v1/nodes/report",
        auth=("mpi09", str(added["sync_key"])),
        json={"applied_commit": None, "status": "ok", "error": None},
    )
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "ip_not_allowed"
    rows = f.call(f.admin, "list-nodes")["nodes"]
    assert isinstance(rows, list)
    assert next(r for r in rows if r["name"] == "mpi09")["last_sync_at"] is None
    assert os.path.exists(f.cfg)
