"""A real server for the HTTP/MCP/node tests: `mailstate serve` in a subprocess on a free
loopback port, started on an EMPTY data dir (so the CLI initialises it and prints the admin
token once), with bcrypt cost 4. Tests talk to it with httpx over real TCP."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from mailstate.state.datadir import DataDir

TOKEN_LINE = re.compile(r"^(mst_[a-z0-9]{12}_[A-Za-z0-9_-]{43})$", re.M)


def mailstate_cmd() -> list[str]:
    """The console script if installed, else the same entry point through python -m."""
    exe = shutil.which("mailstate")
    return [exe] if exe else [sys.executable, "-m", "mailstate.api.cli"]


def clean_env(home: Path) -> dict[str, str]:
    """The environment a test server runs in: no GIT_* from the machine, a private HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_") and k not in ("GNUPGHOME", "MAILSTATE_TOKEN", "MAILSTATE_UPSTREAM")
    }
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PYTHONUNBUFFERED="1",
        MAILSTATE_LOG_LEVEL="warning",
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LiveServer:
    """One `mailstate serve` process and helpers to drive it."""

    def __init__(self, root: Path, *, bcrypt_cost: int = 4) -> None:
        self.root = root
        self.bcrypt_cost = bcrypt_cost
        self.data = DataDir(root / "data")
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = clean_env(self.home)
        self.port = 0
        # The address it listens on (a multi-node test gives the bridge of its network namespaces).
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[str] | None = None
        self.admin_token = ""
        self.stdout = ""
        self.extra_args: list[str] = []
        # `--data` as given on the command line, and the cwd the commands run in: a test of
        # relative paths sets data_arg="./data" and cwd=root (default: the absolute path).
        self.data_arg: str | None = None
        self.cwd: Path | None = None
        self._log = (root / "server.log").open("w+")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        for _attempt in range(3):
            self.port = free_port(self.host)
            out = (self.root / "server.out").open("w+")
            self.proc = subprocess.Popen(
                [
                    *mailstate_cmd(),
                    "serve",
                    "--data",
                    self.data_arg or str(self.data.root),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--bcrypt-cost",
                    str(self.bcrypt_cost),
                    *self.extra_args,
                ],
                stdout=out,
                stderr=self._log,
                env=self.env,
                cwd=self.cwd,
                text=True,
            )
            if self._wait_healthy(timeout):
                self.stdout = (self.root / "server.out").read_text()
                match = TOKEN_LINE.search(self.stdout)
                if match and not self.admin_token:
                    self.admin_token = match.group(1)
                return
            self.stop()
        self._log.seek(0)
        raise RuntimeError(f"mailstate serve did not come up:\n{self._log.read()[-3000:]}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        self._log.flush()
        return (self.root / "server.log").read_text()

    # --- helpers ---------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*mailstate_cmd(), *args], capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"mailstate {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def create_token(self, *, project: int | None = None, name: str | None = None) -> str:
        """A new token via `mailstate token create`; the token is its output's last line."""
        args = ["token", "create", "--data", self.data_arg or str(self.data.root)]
        args += ["--admin"] if project is None else ["--project", str(project)]
        if name:
            args += ["--name", name]
        return self.cli(*args).stdout.strip().splitlines()[-1]

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.data.repo), *args], check=True, capture_output=True, text=True, env=self.env
        ).stdout

    def commit_count(self) -> int:
        return int(self.git("rev-list", "--count", "main").strip())

    def verify_commit(self, rev: str = "main") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "git",
                "-C",
                str(self.data.repo),
                "-c",
                f"gpg.ssh.allowedSignersFile={self.data.allowed_signers}",
                "verify-commit",
                rev,
            ],
            capture_output=True,
            text=True,
            env=self.env,
        )


@contextmanager
def live_server(root: Path | None = None, *, bcrypt_cost: int = 4) -> Iterator[LiveServer]:
    """A running server on a fresh, empty data dir; stopped (and its dir removed) afterwards."""
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="mailstate-live-")
        root = Path(tmp)
    server = LiveServer(root, bcrypt_cost=bcrypt_cost)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def assert_error(resp: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict[str, Any]:
    """The response is an error in THE one shape (never FastAPI's `detail`), with this status."""
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, f"{resp.request.method} {resp.request.url} -> {resp.status_code} {resp.text}"
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert SNAKE.match(err["code"]), err
    assert isinstance(err["message"], str) and err["message"], err
    assert set(err) <= {"code", "message", "field", "target", "problems", "limit", "max", "use"}, err
    if code is not None:
        assert err["code"] == code, err
    return err
