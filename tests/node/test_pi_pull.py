"""pi-pull against real git repos, real SSH signatures, and (e2e) real Postfix + Dovecot.

Nothing is mocked: state repos are built with git, commits are signed with throwaway ed25519
keys (`git commit -S` with gpg.format=ssh), and pi-pull runs as a subprocess through its CLI.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.common import PROJECT_A
from tests.helpers.mailnode import (
    AGENT_DIR,
    MailNode,
    StateRepo,
    free_ports,
    git,
    run_pi_pull,
)
from tests.helpers.pipull import Setup, snapshot, two_domains

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_LOCKED = 0, 1, 2, 3, 4

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]


# --------------------------------------------------------------------------- HTTP stand-ins


class ReportServer:
    """A tiny report receiver. It stands in for `mailstate serve`'s `POST /v1/nodes/report`;
    the end-to-end test against the real server lives in another file and uses the real one."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.received.append((dict(self.headers), json.loads(body)))
                payload = json.dumps({"ok": outer.status == 200}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/nodes/report"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class GitHttpServer:
    """Read-only git smart HTTP at /v1/nodes/state.git behind HTTP Basic auth, through the real
    `git http-backend`. Stands in for `mailstate serve`'s node git endpoint."""

    def __init__(self, project_root: Path, user: str, password: str) -> None:
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth_seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                auth = self.headers.get("Authorization", "")
                outer.auth_seen.append(auth)
                if auth != outer.expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mailstate"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, _, query = self.path.partition("?")
                prefix = "/v1/nodes/state.git"
                if not path.startswith(prefix + "/"):
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(project_root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": "/state.git" + path[len(prefix) :],
                    "QUERY_STRING": query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": user,
                    "REMOTE_ADDR": self.client_address[0],
                }
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                out = subprocess.run(["git", "http-backend"], input=body, capture_output=True, env=env).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = out.partition(b"\n\n")
                status = 200
                headers = []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.strip().split()[0])
                    else:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/nodes/state.git"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- setup


# --------------------------------------------------------------------------- apply


def test_apply_signed_commit_builds_release(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit("add mailboxes")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f"applied {sha[:12]}" in r.stderr

    rel = setup.root / "releases" / sha
    assert os.readlink(setup.root / "current") == f"releases/{sha}"
    assert (rel / "COMMIT").read_text() == sha + "\n"
    files = setup.repo.rendered_files()
    assert (rel / "dovecot/passwd.d/example.com").read_text() == files["rendered/domains/ex/example.com/passwd"]
    assert (rel / "dovecot/passwd.d/beta.org").read_text() == files["rendered/domains/be/beta.org/passwd"]
    # maps: fragments concatenated in sorted domain order
    assert (rel / "postfix/virtual_mailbox_domains").read_text() == "beta.org OK\nexample.com OK\n"
    assert (rel / "postfix/virtual_mailbox_maps").read_text() == (
        "admin@beta.org beta.org/admin/\ninfo@example.com example.com/info/\nsales@example.com example.com/sales/\n"
    )
    for name in ("virtual_mailbox_domains", "virtual_mailbox_maps"):
        assert (rel / "postfix" / f"{name}.db").stat().st_size > 0
    q = subprocess.run(
        [
            "postmap",
            "-c",
            str(setup.postfix_etc),
            "-q",
            "sales@example.com",
            f"hash:{setup.root}/current/postfix/virtual_mailbox_maps",
        ],
        capture_output=True,
        text=True,
    )
    assert q.stdout.strip() == "example.com/sales/"
    assert oct((rel / "dovecot/passwd.d/example.com").stat().st_mode & 0o777) == "0o644"
    assert not (setup.root / "mirror.git" / "index").exists()  # bare mirror, never checked out
    st = setup.state()
    assert st["applied_commit"] == sha and st["last_status"] == "ok"
    assert sorted(setup.reloads()) == ["dovecot", "postfix"]


def test_passwd_group_makes_passwd_files_0640(setup: Setup) -> None:
    setup.repo.set_mailbox("info@example.com", "pw-123456")
    sha = setup.repo.commit()
    r = setup.tick(setup.config(paths__passwd_group="dovecot" if _group_exists("dovecot") else "root"))
    assert r.returncode == EXIT_OK, r.stderr
    st = (setup.root / "releases" / sha / "dovecot/passwd.d/example.com").stat()
    assert st.st_mode & 0o777 == 0o640


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_noop_tick_touches_nothing(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit()
    cfg = setup.config()
    assert setup.tick(cfg).returncode == EXIT_OK
    before = snapshot(setup.root)
    state_before = (setup.root / "state.json").read_bytes()
    reloads_before = setup.reloads()
    time.sleep(0.02)
    r = setup.tick(cfg)
    assert r.returncode == EXIT_OK, r.stderr
    assert f"up to date at {sha[:12]}" in r.stderr
    assert snapshot(setup.root) == before
    assert (setup.root / "state.json").read_bytes() == state_before
    assert setup.reloads() == reloads_before


def test_only_changed_service_is_reloaded(setup: Setup) -> None:
    setup.repo.set_mailbox("info@example.com", "first-password")
    setup.repo.commit()
    assert setup.tick().returncode == EXIT_OK
    assert sorted(setup.reloads()) == ["dovecot", "postfix"]
    setup.repo.set_mailbox("info@example.com", "second-password")  # passwd only: maps unchanged
    setup.repo.commit("update-password")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert sorted(setup.reloads()) == ["dovecot", "dovecot", "postfix"]
    setup.repo.commit("no rendered change")  # YAML-only change: nothing to reload
    assert setup.tick().returncode == EXIT_OK
    assert sorted(setup.reloads()) == ["dovecot", "dovecot", "postfix"]


def test_unchanged_domains_are_hardlinked_from_the_live_release(setup: Setup) -> None:
    two_domains(setup.repo)
    first = setup.repo.commit()
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("new@example.com", "new-password")
    second = setup.repo.commit("add new@example.com")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    old, new = setup.root / "releases" / first, setup.root / "releases" / second
    same = (old / "dovecot/passwd.d/beta.org").stat(), (new / "dovecot/passwd.d/beta.org").stat()
    assert same[0].st_ino == same[1].st_ino and same[1].st_nlink == 2
    assert (old / "dovecot/passwd.d/example.com").stat().st_ino != (new / "dovecot/passwd.d/example.com").stat().st_ino
    assert "new@example.com" in (new / "dovecot/passwd.d/example.com").read_text()
    manifest = json.loads((new / "MANIFEST.json").read_text())
    assert manifest["reused_domains"] == 1 and manifest["mailboxes"] == 4
    # a config change that affects the files (group/mode) disables reuse
    setup.repo.set_mailbox("third@example.com", "third-password")
    third = setup.repo.commit("third")
    assert setup.tick(setup.config(paths__passwd_group="root")).returncode == EXIT_OK
    assert json.loads((setup.root / "releases" / third / "MANIFEST.json").read_text())["reused_domains"] == 0
    assert (setup.root / "releases" / third / "dovecot/passwd.d/beta.org").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- refusals


def _apply_first(setup: Setup) -> str:
    two_domains(setup.repo)
    sha = setup.repo.commit("first")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    return sha


def _assert_refused(setup: Setup, good: str, needle: str) -> subprocess.CompletedProcess[str]:
    before = snapshot(setup.root / "releases")
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED, r.stderr
    assert needle in r.stderr
    assert setup.current() == good
    assert snapshot(setup.root / "releases") == before  # nothing materialised
    st = setup.state()
    assert st["applied_commit"] == good and st["last_status"] == "refused"
    return r


def test_unsigned_commit_refused(setup: Setup) -> None:
    good = _apply_first(setup)
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    setup.repo.commit("unsigned", sign=False)
    _assert_refused(setup, good, "is not signed")
    # the same refused tip again: still refused, and the tick writes nothing
    before = snapshot(setup.root)
    assert setup.tick().returncode == EXIT_REFUSED
    assert snapshot(setup.root) == before


def test_unsigned_first_commit_refused(setup: Setup) -> None:
    setup.repo.set_mailbox("info@example.com", "pw-123456")
    setup.repo.commit("unsigned", sign=False)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED
    assert not (setup.root / "current").exists()


def test_untrusted_key_refused(setup: Setup) -> None:
    good = _apply_first(setup)
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    setup.repo.commit("signed by a stranger", key=setup.untrusted)
    _assert_refused(setup, good, "not signed by a trusted key")


def test_key_in_repo_is_not_trusted(setup: Setup) -> None:
    """A commit that ships its own allowed_signers is still checked against the node's file only."""
    good = _apply_first(setup)
    (setup.repo.work / "allowed_signers").write_text(setup.untrusted.allowed_signers_line() + "\n")
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    setup.repo.commit("bring my own key", key=setup.untrusted)
    _assert_refused(setup, good, "not signed by a trusted key")


def test_statement_of_an_older_commit_changes_nothing(setup: Setup) -> None:
    """A statement naming an ancestor of the applied commit (a server behind, or main forced back)
    is a no-op: exit 0, the node stays where it is."""
    first = _apply_first(setup)
    setup.repo.set_mailbox("new@example.com", "new-password")
    second = setup.repo.commit("second")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.push(first)  # main and the statement forced back to the older, validly signed commit
    before = snapshot(setup.root / "releases")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f"up to date at {second[:12]}" in r.stderr and "older" in r.stderr
    assert setup.current() == second and snapshot(setup.root / "releases") == before


def test_unrelated_signed_history_refused_as_rollback(setup: Setup) -> None:
    good = _apply_first(setup)
    other = StateRepo(setup.tmp / "other", setup.key)
    other.set_mailbox("info@example.com", "hijack-password")
    sha = other.commit("unrelated root")
    git(setup.repo.work, "fetch", "--quiet", str(other.bare), "main")
    setup.repo.push(sha)
    _assert_refused(setup, good, "does not descend")


def test_hand_edited_rendered_files_refused(setup: Setup) -> None:
    good = _apply_first(setup)
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.write_text(passwd.read_text() + passwd.read_text().splitlines()[0].replace("info@", "intruder@") + "\n")
    setup.repo.commit("hand edit", sign=False, write=False)
    _assert_refused(setup, good, "is not signed")


def test_forged_commit_reusing_a_signature_refused(setup: Setup) -> None:
    """Rendered files edited by hand, with the previous commit's signature copied over."""
    good = _apply_first(setup)
    setup.repo.set_mailbox("info@example.com", "new-password-1")
    signed = setup.repo.commit("signed", push=False)
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.write_text(passwd.read_text().replace("info@example.com", "root@example.com"))
    git(setup.repo.work, "add", "-A")
    tree = git(setup.repo.work, "write-tree")
    raw = git(setup.repo.work, "cat-file", "commit", signed)
    header, _, rest = raw.partition("\n")
    assert header.startswith("tree ") and "gpgsig" in raw
    forged = git(setup.repo.work, "hash-object", "-t", "commit", "-w", "--stdin", input=f"tree {tree}\n{rest}\n")
    setup.repo.push(forged)
    _assert_refused(setup, good, "not signed by a trusted key")


@pytest.mark.parametrize(
    ("description", "mutate"),
    [
        ("home path escapes", lambda t: t.replace("/var/vmail/example.com/info", "/var/vmail/../../etc")),
        ("uid 0", lambda t: t.replace(":5000:5000:", ":0:0:", 1)),
        ("too few fields", lambda t: t.split("::userdb")[0].rsplit(":", 3)[0] + "\n"),
    ],
)
def test_signed_but_invalid_content_refused(setup: Setup, description: str, mutate: Any) -> None:
    good = _apply_first(setup)
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.write_text(mutate(passwd.read_text()))
    setup.repo.commit(description, write=False)
    _assert_refused(setup, good, "passwd of example.com")


def test_misplaced_domain_directory_refused(setup: Setup) -> None:
    good = _apply_first(setup)
    src = setup.repo.work / "rendered/domains/ex/example.com"
    dst = setup.repo.work / "rendered/domains/zz/example.com"
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    setup.repo.commit("misplaced", write=False)
    _assert_refused(setup, good, "misplaced domain directory")


def test_symlink_in_rendered_refused(setup: Setup) -> None:
    good = _apply_first(setup)
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.unlink()
    passwd.symlink_to("/etc/shadow")
    setup.repo.commit("symlink", write=False)
    _assert_refused(setup, good, "not a regular file")


# --------------------------------------------------------------------------- reload failure, lock, pruning


def test_failing_reload_rolls_back(setup: Setup) -> None:
    good = _apply_first(setup)
    setup.repo.set_mailbox("new@example.com", "new-password")
    bad = setup.repo.commit("second")
    cfg = setup.config(services__postfix_reload="false")
    r = setup.tick(cfg)
    assert r.returncode == EXIT_ERROR, r.stderr
    assert "postfix reload failed" in r.stderr and f"rolled back to {good[:12]}" in r.stderr
    assert setup.current() == good
    assert not (setup.root / "releases" / bad).exists()
    st = setup.state()
    assert st["applied_commit"] == good and st["last_status"] == "error"
    # dovecot was reloaded for the new release and again after swapping back
    assert setup.reloads().count("dovecot") == 3
    # once reloads work again, the next tick applies the commit
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == bad and setup.state()["last_status"] == "ok"


def test_failing_reload_without_previous_release(setup: Setup) -> None:
    setup.repo.set_mailbox("info@example.com", "pw-123456")
    setup.repo.commit()
    r = setup.tick(setup.config(services__dovecot_reload="exit 7"))
    assert r.returncode == EXIT_ERROR
    assert "dovecot reload failed (rc=7)" in r.stderr
    assert not (setup.root / "current").exists()


def test_lock_prevents_overlap(setup: Setup) -> None:
    _apply_first(setup)
    setup.repo.set_mailbox("new@example.com", "new-password")
    setup.repo.commit("second")
    fd = os.open(setup.root / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = setup.tick()
        assert r.returncode == EXIT_LOCKED
        assert "another pi-pull run holds" in r.stderr
    finally:
        os.close(fd)
    assert setup.tick().returncode == EXIT_OK


def test_keep_releases_pruning(setup: Setup) -> None:
    cfg = setup.config(paths__keep_releases="2")
    shas = []
    for i in range(5):
        setup.repo.set_mailbox(f"user{i}@example.com", f"password-{i}")
        shas.append(setup.repo.commit(f"commit {i}"))
        assert setup.tick(cfg).returncode == EXIT_OK
    assert sorted(os.listdir(setup.root / "releases")) == sorted(shas[-2:])
    # keep_releases = 1 still keeps the previous good release
    setup.repo.set_mailbox("last@example.com", "password-last")
    shas.append(setup.repo.commit("last"))
    assert setup.tick(setup.config(paths__keep_releases="1")).returncode == EXIT_OK
    assert sorted(os.listdir(setup.root / "releases")) == sorted(shas[-2:])
    assert setup.current() == shas[-1]


def test_current_removed_by_hand_is_rebuilt(setup: Setup) -> None:
    sha = _apply_first(setup)
    (setup.root / "current").unlink()
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == sha


# --------------------------------------------------------------------------- reports and secrets


def test_report_sent(setup: Setup) -> None:
    server = ReportServer()
    try:
        sha = _apply_first_with(setup, setup.config(report__url=server.url))
        assert len(server.received) == 1
        headers, body = server.received[0]
        issued = setup.state()["statement"]["issued_at"]
        assert body == {
            "name": "pi-test",
            "sync_key": setup.sync_key,
            "applied_commit": sha,
            "status": "ok",
            "error": None,
            "statement_issued_at": issued,
        }
        assert headers["Authorization"] == "Basic " + base64.b64encode(f"pi-test:{setup.sync_key}".encode()).decode()
        # a refused tick reports the refusal with the still-applied commit
        setup.repo.commit("unsigned", sign=False)
        assert setup.tick(setup.config(report__url=server.url)).returncode == EXIT_REFUSED
        _, body = server.received[-1]
        assert body["status"] == "refused" and body["applied_commit"] == sha and "not signed" in body["error"]
    finally:
        server.close()


def _apply_first_with(setup: Setup, cfg: Path) -> str:
    two_domains(setup.repo)
    sha = setup.repo.commit("first")
    r = setup.tick(cfg)
    assert r.returncode == EXIT_OK, r.stderr
    return sha


def test_report_failure_is_delivered_next_tick(setup: Setup) -> None:
    (port,) = free_ports(1)
    cfg = setup.config(report__url=f"http://127.0.0.1:{port}/v1/nodes/report")
    sha = _apply_first_with(setup, cfg)  # server down: still applied, exit 0
    assert "report to" in setup.outputs[-1] and "failed" in setup.outputs[-1]
    assert setup.current() == sha
    issued = setup.state()["statement"]["issued_at"]
    assert setup.state()["pending_reports"] == [
        {"applied_commit": sha, "status": "ok", "error": None, "statement_issued_at": issued}
    ]
    server = ReportServer(port=port)
    try:
        r = setup.tick(cfg)
        assert r.returncode == EXIT_OK, r.stderr
        assert [b["applied_commit"] for _, b in server.received] == [sha]
        assert "delivered 1 pending report" in r.stderr
        assert setup.state()["pending_reports"] == []
    finally:
        server.close()


def test_report_rejected_with_401_is_logged(setup: Setup) -> None:
    server = ReportServer(status=401)
    try:
        _apply_first_with(setup, setup.config(report__url=server.url))
        assert "HTTP 401 bad node name or sync key" in setup.outputs[-1]
    finally:
        server.close()


def test_fetch_over_http_sends_basic_auth_via_environment(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit()
    http = GitHttpServer(setup.repo.path, "pi-test", setup.sync_key)
    try:
        r = setup.tick(setup.config(remote__url=http.url))
        assert r.returncode == EXIT_OK, r.stderr
        assert setup.current() == sha
        assert http.auth_seen and set(http.auth_seen) == {http.expected}
        # a wrong key is rejected by the server: an error, nothing applied, key not logged
        setup.sync_key_file.write_text("wrong-key-value\n")
        setup.repo.set_mailbox("more@example.com", "more-password")
        setup.repo.commit("more")
        r = setup.tick(setup.config(remote__url=http.url))
        assert r.returncode == EXIT_ERROR
        assert "fetch from" in r.stderr and "wrong-key-value" not in r.stderr
        assert setup.current() == sha
    finally:
        http.close()


def test_sync_key_never_on_a_command_line(setup: Setup, pipull: Any) -> None:
    """Through the runner seam: every subprocess pi-pull starts, with its argv and extra env."""
    calls: list[tuple[list[str], dict[str, str]]] = []

    class RecordingRunner(pipull.runner.Runner):  # type: ignore[misc,name-defined]
        def run(self, argv: Any, **kw: Any) -> Any:
            calls.append(([str(a) for a in argv], dict(kw.get("env") or {})))
            return super().run(argv, **kw)

        def shell(self, command: str, **kw: Any) -> Any:
            calls.append(([command], {}))
            return super().shell(command, **kw)

    two_domains(setup.repo)
    sha = setup.repo.commit()
    http = GitHttpServer(setup.repo.path, "pi-test", setup.sync_key)
    report = ReportServer()
    try:
        cfg = pipull.config.load_config(str(setup.config(remote__url=http.url, report__url=report.url)))
        log = io.StringIO()
        result = pipull.agent.Agent(
            cfg, runner=RecordingRunner(), log=pipull.log.make_logger(stream=log, verbose=True)
        ).tick()
    finally:
        http.close()
        report.close()
    assert result.exit_code == EXIT_OK and result.applied_commit == sha
    token = base64.b64encode(f"pi-test:{setup.sync_key}".encode()).decode()
    assert calls and all(setup.sync_key not in a and token not in a for argv, _ in calls for a in argv)
    fetch_env = next(env for argv, env in calls if "fetch" in argv)
    assert fetch_env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    assert fetch_env["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {token}"
    assert report.received[0][1]["sync_key"] == setup.sync_key
    assert f"applied {sha[:12]}" in log.getvalue() and setup.sync_key not in log.getvalue()


def test_sync_key_never_in_output(setup: Setup) -> None:
    good_report = ReportServer()
    bad_report = ReportServer(status=403)
    http = GitHttpServer(setup.repo.path, "pi-test", setup.sync_key)
    (closed,) = free_ports(1)
    try:
        two_domains(setup.repo)
        setup.repo.commit()
        setup.tick(setup.config(remote__url=http.url, report__url=good_report.url), "--verbose")
        setup.tick(setup.config(remote__url=http.url, report__url=bad_report.url), "--verbose")
        setup.tick(
            setup.config(remote__url=f"http://127.0.0.1:{closed}/v1/nodes/state.git", report__url=good_report.url), "-v"
        )
        setup.repo.commit("unsigned", sign=False)
        setup.tick(setup.config(remote__url=http.url, report__url=f"http://127.0.0.1:{closed}/r"), "-v")
    finally:
        for s in (good_report, bad_report, http):
            s.close()
    token = base64.b64encode(f"pi-test:{setup.sync_key}".encode()).decode()
    assert len(setup.outputs) == 4
    for out in setup.outputs:
        assert setup.sync_key not in out and token not in out
    assert setup.sync_key not in (setup.root / "state.json").read_text()


def test_unsafe_sync_key_file_mode_is_a_config_error(setup: Setup) -> None:
    setup.sync_key_file.chmod(0o644)
    r = setup.tick(setup.config(report__url="http://127.0.0.1:9/r"))
    assert r.returncode == EXIT_USAGE
    assert "chmod 600" in r.stderr and setup.sync_key not in r.stderr


# --------------------------------------------------------------------------- CLI


def test_log_filter_masks_secrets_in_every_line(pipull: Any) -> None:
    """The redacting filter sits on the logger: args, multi-line messages and every level are masked."""
    out = io.StringIO()
    log = pipull.log.make_logger(stream=out, verbose=True)
    pipull.log.add_secret(log, "s3cr3t-key")
    log.debug("debug %s", "s3cr3t-key")
    log.info("two\nlines with s3cr3t-key")
    log.warning("Authorization: Basic %s", "s3cr3t-key")
    log.error("s3cr3t-keys3cr3t-key")
    lines = out.getvalue().splitlines()
    assert lines == [
        "pi-pull: debug: debug ***",
        "pi-pull: two lines with ***",
        "pi-pull: warning: Authorization: Basic ***",
        "pi-pull: error: ******",
    ]
    quiet = io.StringIO()
    pipull.log.make_logger(stream=quiet).debug("hidden")
    assert quiet.getvalue() == ""


def test_config_booleans_and_numbers_come_from_configparser(tmp_path: Path, pipull: Any) -> None:
    ini = tmp_path / "c.ini"
    mail = "mail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    ini.write_text(
        f"[remote]\nurl = /x\nsend_credentials = On\n[node]\nallowed_signers = s\n[paths]\nsync = 0\nkeep_releases = 7\n{mail}"
    )
    cfg = pipull.config.load_config(str(ini))
    assert cfg.send_credentials is True and cfg.sync is False and cfg.keep_releases == 7
    assert cfg.allowed_signers == str(tmp_path / "s")
    for bad, words in (("sync = maybe", "expected yes/no"), ("keep_releases = 2.5", "must be a number")):
        ini.write_text(f"[remote]\nurl = /x\n[node]\nallowed_signers = s\n[paths]\n{mail}{bad}\n")
        with pytest.raises(pipull.errors.ConfigError, match=words):
            pipull.config.load_config(str(ini))


def test_single_file_is_a_zipapp_of_the_package(pi_pull: Path) -> None:
    import zipfile

    assert pi_pull.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(pi_pull).namelist()
    assert names[0] == "__main__.py"
    assert {f"pipull/{m}.py" for m in ("agent", "cli", "config", "mirror", "release", "report", "verify")} <= set(names)


def test_help_documents_exit_codes(pi_pull: Path) -> None:
    r = subprocess.run([sys.executable, "-I", "-S", str(pi_pull), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for line in ("0  applied", "1  error", "2  usage", "3  refused", "4  another pi-pull run"):
        assert line in r.stdout


def test_usage_and_config_errors(tmp_path: Path, pi_pull: Path) -> None:
    r = subprocess.run([sys.executable, str(pi_pull)], capture_output=True, text=True)
    assert r.returncode == EXIT_USAGE
    r = run_pi_pull(tmp_path / "missing.ini")
    assert r.returncode == EXIT_USAGE and "cannot read config" in r.stderr
    mail = "[paths]\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    (tmp_path / "bad.ini").write_text(
        f"[remote]\nurl = /x\n[services]\nmap_type = nosuch\n[node]\nallowed_signers = /x\n{mail}"
    )
    r = run_pi_pull(tmp_path / "bad.ini")
    assert r.returncode == EXIT_USAGE and "map_type" in r.stderr
    # mail_root/mail_uid/mail_gid pin what a passwd line may say: without them nothing is trusted
    for missing, word in (
        ("mail_root", "missing [paths] mail_root"),
        ("mail_uid", "mail_uid must be set"),
        ("mail_gid", "mail_gid must be set"),
    ):
        text = "".join(line + "\n" for line in mail.splitlines() if not line.startswith(missing))
        (tmp_path / "nomail.ini").write_text(f"[remote]\nurl = /x\n[node]\nallowed_signers = /x\n{text}")
        r = run_pi_pull(tmp_path / "nomail.ini")
        assert r.returncode == EXIT_USAGE and word in r.stderr, r.stderr
    for root in ("/", "relative/path", "/var/../etc", "/var/v mail", "/var:vmail"):
        (tmp_path / "badroot.ini").write_text(
            f"[remote]\nurl = /x\n[node]\nallowed_signers = /x\n{mail.replace('/var/vmail', root)}"
        )
        r = run_pi_pull(tmp_path / "badroot.ini")
        assert r.returncode == EXIT_USAGE and "mail_root" in r.stderr, (root, r.stderr)


def test_example_config_parses(pipull: Any) -> None:
    if not _group_exists("dovecot"):
        pytest.skip("the example config names the dovecot group")
    cfg = pipull.config.load_config(str(AGENT_DIR / "pi-pull.example.ini"))
    assert cfg.remote_url.endswith("/v1/nodes/state.git") and cfg.send_credentials
    assert cfg.keep_releases == 5 and cfg.map_type == "hash" and cfg.report_url.endswith("/v1/nodes/report")
    assert cfg.usage_interval == 900 and cfg.usage_budget_s == 2.0
    assert cfg.max_staleness == 600 and cfg.clock_skew == 300
    assert (cfg.fleet_relay_port, cfg.fleet_doveadm_port, cfg.fleet_sync_budget_s) == (2525, 12345, 20.0)
    assert (cfg.fleet_policy_port, cfg.fleet_policy_timeout) == (10041, 1.0)
    assert cfg.fleet_tls_key == "/etc/pi-pull/tls/privkey.pem"
    assert cfg.fleet_url.endswith("/v1/nodes/fleet") and cfg.fleet_dir.endswith("/fleet")


def test_loop_mode_ticks_until_sigterm(setup: Setup, pi_pull: Path) -> None:
    two_domains(setup.repo)
    first = setup.repo.commit()
    cfg = setup.config(agent__interval="0.2")
    proc = subprocess.Popen([sys.executable, str(pi_pull), "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while setup.current() != first and time.monotonic() < deadline:
            time.sleep(0.05)
        setup.repo.set_mailbox("next@example.com", "next-password")
        second = setup.repo.commit("next")
        while setup.current() != second and time.monotonic() < deadline:
            time.sleep(0.05)
        assert setup.current() == second
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK, err
    assert f"applied {first[:12]}" in err and f"applied {second[:12]}" in err


def test_runs_on_python_39(setup: Setup) -> None:
    """A Raspberry Pi may only have Python 3.9. Every source of the package must parse as 3.9
    grammar (checked everywhere), and where a 3.9 interpreter exists, a real tick of the built
    single file must run under it."""
    import ast

    sources = sorted((AGENT_DIR / "pipull").glob("*.py"))
    assert len(sources) > 10
    for src in sources:
        ast.parse(src.read_text(), filename=str(src), feature_version=(3, 9))
    py39 = next(
        (p for p in ("/root/.pyenv/versions/3.9.18/bin/python", "/usr/bin/python3.9") if Path(p).exists()), None
    )
    if py39 is None:
        return  # the grammar check above is what this machine can do
    two_domains(setup.repo)
    sha = setup.repo.commit()
    r = run_pi_pull(setup.config(), python=py39)
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == sha


# --------------------------------------------------------------------------- end to end: real Postfix + Dovecot


@dataclass
class E2E:
    node: MailNode
    setup: Setup
    repo: StateRepo
    cfg: Path

    def tick(self, cfg: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.setup.tick(cfg or self.cfg)

    def current(self) -> str | None:
        link = self.node.root / "current"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None


@pytest.fixture
def e2e(mailnode: MailNode, setup: Setup) -> Iterator[E2E]:
    repo = StateRepo(
        setup.tmp / "e2e-repo", setup.key, mail_root=str(mailnode.mail_root), uid=mailnode.uid, gid=mailnode.gid
    )
    cfg = mailnode.write_pi_pull_config(setup.tmp / "node.ini", str(repo.bare), setup.signers)
    yield E2E(node=mailnode, setup=setup, repo=repo, cfg=cfg)


@pytest.mark.e2e
def test_e2e_deliver_login_quota_and_password_change(e2e: E2E) -> None:
    node, repo = e2e.node, e2e.repo
    repo.set_mailbox("info@example.com", "first-password", quota_mb=1024)
    repo.commit("add-user info@example.com")
    r = e2e.tick()
    assert r.returncode == EXIT_OK, r.stderr

    assert node.rcpt_code("info@example.com")[0] == 250
    node.send("info@example.com", "e2e-hello-1", "first message\n")
    msg = node.wait_for_message("info@example.com", "first-password", "e2e-hello-1")
    assert b"first message" in msg

    user = node.doveadm("user", "info@example.com")
    assert user.returncode == 0, user.stderr
    assert "quota_rule\t*:storage=1024M" in user.stdout

    repo.set_mailbox("info@example.com", "second-password")
    repo.commit("update-password info@example.com")
    assert e2e.tick().returncode == EXIT_OK
    assert not node.can_login("info@example.com", "first-password")
    assert node.can_login("info@example.com", "second-password")

    repo.set_mailbox("info@example.com", quota_mb=2048)
    repo.commit("set-quota")
    assert e2e.tick().returncode == EXIT_OK
    assert "quota_rule\t*:storage=2048M" in node.doveadm("user", "info@example.com").stdout


@pytest.mark.e2e
def test_e2e_remove_user_and_disable_domain(e2e: E2E) -> None:
    node, repo = e2e.node, e2e.repo
    repo.set_mailbox("info@example.com", "info-password")
    repo.set_mailbox("sales@example.com", "sales-password")
    repo.set_mailbox("admin@beta.org", "admin-password")
    repo.commit("setup")
    assert e2e.tick().returncode == EXIT_OK
    assert node.can_login("info@example.com", "info-password")

    repo.domains["example.com"]["info"].active = False  # soft remove
    repo.remove_mailbox("sales@example.com")  # hard delete
    repo.commit("remove-user")
    assert e2e.tick().returncode == EXIT_OK
    for email, pw in (("info@example.com", "info-password"), ("sales@example.com", "sales-password")):
        assert not node.can_login(email, pw)
        code, text = node.rcpt_code(email)
        assert code == 550, text
    assert node.can_login("admin@beta.org", "admin-password")

    repo.set_email_enabled("beta.org", False)
    repo.commit("disable-email beta.org")
    assert e2e.tick().returncode == EXIT_OK
    code, text = node.rcpt_code("admin@beta.org")
    assert code in (550, 554), text
    assert not node.can_login("admin@beta.org", "admin-password")


@pytest.mark.e2e
def test_e2e_refused_and_failed_ticks_keep_serving(e2e: E2E) -> None:
    node, repo, setup = e2e.node, e2e.repo, e2e.setup
    repo.set_mailbox("info@example.com", "info-password")
    good = repo.commit("setup")
    assert e2e.tick().returncode == EXIT_OK

    def still_serving() -> None:
        assert node.can_login("info@example.com", "info-password")
        assert node.rcpt_code("info@example.com")[0] == 250
        assert node.rcpt_code("evil@example.com")[0] == 550
        assert e2e.current() == good

    # unsigned
    repo.set_mailbox("evil@example.com", "evil-password")
    repo.remove_mailbox("info@example.com")
    repo.commit("unsigned", sign=False)
    assert e2e.tick().returncode == EXIT_REFUSED
    still_serving()
    # untrusted key
    repo.commit("untrusted", key=setup.untrusted)
    assert e2e.tick().returncode == EXIT_REFUSED
    still_serving()
    # hand-edited rendered files on top, unsigned
    passwd = repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.write_text(passwd.read_text() + "\n")
    repo.commit("hand edit", sign=False, write=False)
    assert e2e.tick().returncode == EXIT_REFUSED
    still_serving()
    # main and the statement forced back to an older, validly signed commit: nothing changes
    # (the refused commits leave the history: every commit under a tip is verified, not only the tip)
    repo.push(good)
    git(repo.work, "reset", "--quiet", "--hard", good)
    repo.set_mailbox("info@example.com", "info-password")
    newer = repo.commit("newer")
    assert e2e.tick().returncode == EXIT_OK
    repo.push(good)
    r = e2e.tick()
    assert r.returncode == EXIT_OK and "older" in r.stderr
    assert e2e.current() == newer
    assert node.can_login("info@example.com", "info-password")

    # a failing reload rolls back: the new mailbox never becomes deliverable
    repo.push(newer)
    repo.remove_mailbox("evil@example.com")
    repo.set_mailbox("late@example.com", "late-password")
    repo.commit("add late")
    bad_cfg = node.write_pi_pull_config(setup.tmp / "bad.ini", str(repo.bare), setup.signers, postfix_reload="false")
    r = e2e.tick(bad_cfg)
    assert r.returncode == EXIT_ERROR and "rolled back" in r.stderr
    assert e2e.current() == newer
    assert node.rcpt_code("late@example.com")[0] == 550
    assert node.can_login("info@example.com", "info-password")

    # and a no-op tick against the live node changes nothing on disk
    assert e2e.tick().returncode == EXIT_OK
    before = snapshot(node.root)
    assert e2e.tick().returncode == EXIT_OK
    assert snapshot(node.root) == before
    assert node.rcpt_code("late@example.com")[0] == 250


# --------------------------------------------------------------------------- the real store's commits


def test_commits_from_the_real_store_apply(setup: Setup, mail_store: Any, data_dir: Any) -> None:
    """pi-pull accepts what `state/` + `compiler/` actually commit, verified with the data dir's
    allowed_signers (conftest's `mail_store`: example.com with info@example.com). The store runs
    on conftest's frozen clock, so its statements are months old: freshness is off here."""
    cfg = setup.config(
        remote__url=str(data_dir.repo),
        node__allowed_signers=str(data_dir.allowed_signers),
        freshness__max_staleness="0",
    )
    r = setup.tick(cfg)
    assert r.returncode == EXIT_OK, r.stderr
    tip = git(data_dir.repo, "rev-parse", "main")
    assert setup.current() == tip
    passwd = (setup.root / "current/dovecot/passwd.d/example.com").read_text()
    assert passwd.startswith("info@example.com:{BLF-CRYPT}$2b$")
    # format 1 homes are <local>, format 2 homes <local>~<id>
    assert re.fullmatch(
        r"info@example\.com example\.com/info(~[0-9]{8}-[0-9a-f]{6})?/\n",
        (setup.root / "current/postfix/virtual_mailbox_maps").read_text(),
    )
    # a further API write fast-forwards
    mail_store.execute("add-user", PROJECT_A, {"email": "sales@example.com", "password": "another password"})
    assert setup.tick(cfg).returncode == EXIT_OK
    assert "sales@example.com" in (setup.root / "current/dovecot/passwd.d/example.com").read_text()
    # the node trusts only its own allowed_signers, not the server's key it never installed
    r = setup.tick(setup.config(remote__url=str(data_dir.repo), freshness__max_staleness="0"))
    assert r.returncode == EXIT_OK  # nothing new: no verification needed
    mail_store.execute("add-user", PROJECT_A, {"email": "third@example.com", "password": "yet another password"})
    r = setup.tick(
        setup.config(remote__url=str(data_dir.repo), freshness__max_staleness="0")
    )  # allowed_signers = the test key only
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr
