"""Follow mode (`pi_pull.py --config FILE --follow`, pipull/follow.py) against a real
`mailstate serve` and a real Postfix + Dovecot node: a change made through the API goes live
on the following node within a generous bound (not a timing test: the figures are in
bench/bench_follow.py); the timer fallback and the backoff while the server is unreachable,
then recovery; ticks taking turns with a timer run on the lock; a node that follows a plain git
remote polls the statement ref; SIGTERM stops the loop cleanly. Plus the pure parts (backoff,
wake URL)."""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.mailnode import MailNode, pi_pull_script
from tests.helpers.server import LiveServer, mailstate_cmd

pytestmark = pytest.mark.e2e

BOUND = 10.0  # seconds: generous on a loaded 2-core machine; the bench measures the real figure
PASSWORD = "follow the leader"


@dataclass
class Followed:
    server: LiveServer
    node: MailNode
    cfg: Path
    admin: httpx.Client
    project: httpx.Client
    log: Path
    proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(pi_pull_script()), "--config", str(self.cfg), "--follow", "-v"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True,
        )  # fmt: skip

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text()

    def until(self, what: Callable[[], bool], bound: float = BOUND, message: str = "") -> float:
        t0 = time.monotonic()
        while not what():
            assert self.proc is None or self.proc.poll() is None, f"the follower exited: {self.log_text()[-2000:]}"
            assert time.monotonic() - t0 < bound, (
                f"{message or 'condition'} not met in {bound}s; log:\n{self.log_text()[-3000:]}"
            )
            time.sleep(0.1)
        return time.monotonic() - t0

    def add_user(self, email: str) -> None:
        r = self.project.post("/v1/email-account/add-user", json={"email": email, "password": PASSWORD})
        assert r.status_code == 201, r.text

    def row(self) -> dict[str, object]:
        rows = self.admin.get("/v1/email-account/list-nodes").json()["nodes"]
        return next(r for r in rows if r["name"] == "mpi01")  # type: ignore[no-any-return]


@contextlib.contextmanager
def _fleet(
    node: MailNode, tmp: Path, extra: str = "", remote: str | None = None, interval: int = 60
) -> Iterator[Followed]:
    server, admin, project = start_server_for(node, tmp / "server")
    f = None
    try:
        cfg = provision_node(node, server, admin, tmp / "etc")
        text = cfg.read_text() + f"[agent]\ninterval = {interval}\n" + extra
        if remote is not None:
            text = text.replace(
                f"url = {server.url}/v1/nodes/state.git", f"url = {remote.format(repo=server.data.repo)}"
            )
        cfg.write_text(text)
        assert (
            admin.post("/v1/email-account/link-domain", json={"domain": "follow.example", "project_id": 42}).status_code
            == 201
        )
        assert project.post("/v1/email-account/enable-email", json={"domain": "follow.example"}).status_code == 200
        f = Followed(server, node, cfg, admin, project, tmp / "follow.log")
        yield f
    finally:
        if f is not None and f.proc is not None:
            f.proc.kill()
            f.proc.wait()
        admin.close()
        project.close()
        server.stop()


@pytest.fixture
def followed(mailnode: MailNode, tmp_path: Path) -> Iterator[Followed]:
    with _fleet(mailnode, tmp_path) as f:
        yield f


def test_a_change_through_the_api_goes_live_within_the_bound(followed: Followed) -> None:
    f = followed
    f.start()
    f.until(lambda: f.row()["status"] == "ok", message="the first tick")
    assert "follow mode: long poll on" in f.log_text()
    f.add_user("info@follow.example")
    f.until(lambda: f.node.can_login("info@follow.example", PASSWORD), message="the new mailbox logging in")
    # Mail to it is delivered and readable over IMAP.
    f.node.send("info@follow.example", "followed")
    assert f.node.wait_for_message("info@follow.example", PASSWORD, "followed", timeout=BOUND)
    # A second change, and the list-nodes view of the node afterwards.
    f.add_user("second@follow.example")
    f.until(lambda: f.node.can_login("second@follow.example", PASSWORD), message="the second mailbox")
    head = f.server.git("rev-parse", "main").strip()
    f.until(lambda: f.row()["applied_commit"] == head, message="the report of the applied commit")
    row = f.row()
    assert row["commits_behind"] == 0 and row["lag_s"] == 0 and row["diverged"] is False
    # The node's own report carries the Issued-At of its newest statement: fresh, not stale.
    assert isinstance(row["statement_age_s"], int) and 0 <= row["statement_age_s"] < 120
    assert row["stale"] is False and row["last_report_at"] and row["last_error"] is None
    # SIGTERM: a clean stop, exit 0.
    assert f.stop() == 0
    assert "follow mode stopped" in f.log_text()
    assert "mss_" not in f.log_text()  # the sync key never reaches the log


def test_server_unreachable_falls_back_to_the_timer_then_recovers(mailnode: MailNode, tmp_path: Path) -> None:
    with _fleet(mailnode, tmp_path, interval=2) as f:
        f.start()
        f.until(lambda: f.row()["status"] == "ok", message="the first tick")
        port = f.server.port
        f.server.stop()
        # Waits fail and back off; ticks keep coming every [agent] interval (and fail: no server).
        f.until(lambda: "retrying in" in f.log_text(), message="a failed wait with its backoff")
        mark = len(f.log_text())
        f.until(
            lambda: f.log_text()[mark:].count("error:") >= 2,
            bound=20,
            message="two timer ticks while the server is down",
        )
        # The server comes back on the same address: waits resume, changes go live again.
        _start_on(f.server, port)
        f.add_user("back@follow.example")
        f.until(
            lambda: f.node.can_login("back@follow.example", PASSWORD), bound=20, message="the change after recovery"
        )
        f.until(lambda: "wait works again" in f.log_text(), bound=20, message="the wait recovering")
        assert f.stop() == 0


def test_ticks_take_turns_with_a_timer_run_on_the_lock(followed: Followed, pipull: ModuleType) -> None:
    f = followed
    f.start()
    f.until(lambda: f.row()["status"] == "ok", message="the first tick")
    lock = pipull.statefile.Lock(str(f.node.root))  # what a `--once` run of the timer holds
    lock.acquire()
    try:
        f.add_user("locked@follow.example")
        f.until(lambda: "another pi-pull run holds the lock" in f.log_text(), message="the follower meeting the lock")
        assert not f.node.can_login("locked@follow.example", PASSWORD)  # nothing ran beside the lock holder
    finally:
        lock.release()
    f.until(lambda: f.node.can_login("locked@follow.example", PASSWORD), message="the tick after the lock was released")
    assert f.stop() == 0


def test_a_node_on_a_plain_git_remote_polls_the_statement_ref(mailnode: MailNode, tmp_path: Path) -> None:
    # The node fetches straight from a git repo (here the server's state.git by path, as from a
    # git host): no long poll there, so it polls the statement ref and says so.
    with _fleet(mailnode, tmp_path, extra="poll_interval = 1\n", remote="{repo}") as f:
        f.start()
        f.until(lambda: f.row()["status"] == "ok", message="the first tick")
        assert "polling the statement ref with git ls-remote every 1s" in f.log_text()
        f.add_user("polled@follow.example")
        f.until(lambda: f.node.can_login("polled@follow.example", PASSWORD), message="the change, polled")
        assert f.stop() == 0


def _start_on(server: LiveServer, port: int) -> None:
    """Start `server` again on the same port (LiveServer.start picks a new one)."""
    out = (server.root / "server.out").open("a")
    server.port = port
    server.proc = subprocess.Popen(
        [*mailstate_cmd(), "serve", "--data", str(server.data.root), "--host", "127.0.0.1", "--port", str(port), *server.extra_args],
        stdout=out, stderr=server._log, env=server.env, text=True,
    )  # fmt: skip
    assert server._wait_healthy(30), server.log_text()[-2000:]


# --- the pure parts -----------------------------------------------------------------------------


def test_backoff_grows_with_full_jitter_and_is_capped(pipull: ModuleType) -> None:
    follow = importlib.import_module("pipull.follow")
    rng = random.Random(7)
    firsts = [follow.backoff(1, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in firsts) and len(set(firsts)) > 100  # jittered
    assert all(4.0 <= follow.backoff(4, rng) <= 8.0 for _ in range(50))
    assert all(30.0 <= follow.backoff(n, rng) <= follow.BACKOFF_MAX for n in (7, 20, 10_000) for _ in range(20))


def test_wake_url(pipull: ModuleType, tmp_path: Path) -> None:
    follow = importlib.import_module("pipull.follow")
    cfg = pipull.config.Config(remote_url="https://mail.example:8025/v1/nodes/state.git")
    assert follow.wake_url(cfg) == "https://mail.example:8025/v1/nodes/wait"
    cfg = pipull.config.Config(remote_url="ssh://git@host.example/state.git")
    assert follow.wake_url(cfg) == ""  # a git host: poll
    cfg.wake_url = "https://mail.example/v1/nodes/wait"
    assert follow.wake_url(cfg) == cfg.wake_url


def test_follow_and_once_exclude_each_other(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(pi_pull_script()), "--config", str(tmp_path / "x.ini"), "--once", "--follow"],
                       capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip
    assert r.returncode == 2 and "not allowed with" in r.stderr
