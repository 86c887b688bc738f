"""A real rspamd for tests, configured with the bundle's ``local.d`` files (the node's defaults).

    with Rspamd(workdir, dns=knot.address) as rs:
        rs.milter        # "inet:127.0.0.1:PORT": Postfix's smtpd_milters (running_mailnode(spam_milter=...))
        rs.controller    # "127.0.0.1:PORT": `rspamc -h` (stat, learn)
        rs.stop()        # the filter is down: port 25 tempfails

Debian's /etc/rspamd/rspamd.conf is the top-level file, as on a node; ``--var`` points its
LOCAL_CONFDIR at a temp dir holding the bundle's ``local.d`` (compiler/node_bundle.py
``rspamd_snippets``) and, in ``override.d``, what only a test changes: DNS goes to the test's
own server (knot, tests/helpers/knot.py) with short timeouts, so no lookup leaves the machine or
hangs a test. rspamd runs as its own user (``_rspamd``), in the foreground, logging to a file.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from mailstate.compiler.node_bundle import rspamd_snippets
from tests.helpers.mailnode import free_ports, make_public_tmpdir

# The first start compiles rspamd's regexps (hyperscan) and its TLD list: a minute on a busy machine.
START_TIMEOUT = 180.0


def require_rspamd() -> None:
    missing = [n for n in ("rspamd", "rspamc", "rspamadm") if shutil.which(n) is None]
    if missing:
        msg = f"missing programs: {', '.join(missing)} (apt-get install rspamd)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


class Rspamd:
    """One rspamd (proxy worker as the milter, controller) on free loopback ports."""

    def __init__(self, workdir: Path, dns: str) -> None:
        require_rspamd()
        self.w = workdir
        self.dns = dns
        milter_port, controller_port = free_ports(2)
        self.milter = f"inet:127.0.0.1:{milter_port}"
        self.controller = f"127.0.0.1:{controller_port}"
        self.milter_port, self.controller_port = milter_port, controller_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.w / "conf"
        for sub in ("conf/local.d", "conf/override.d", "run", "log"):
            (self.w / sub).mkdir(parents=True, exist_ok=True)
        # The database directory (Bayes' SQLite files, opened by the workers as _rspamd) must be
        # reachable by that user: pytest's own temp dirs are root's alone.
        self.db = make_public_tmpdir("rspamd-db-")
        atexit.register(shutil.rmtree, self.db, True)
        self.write_local_d(rspamd_snippets(self.milter, self.controller))
        (self.conf / "override.d" / "options.inc").write_text(
            f'dns {{\n  nameserver = ["{dns}"];\n  timeout = 0.5s;\n  retransmits = 1;\n}}\n'
        )
        (self.conf / "override.d" / "logging.inc").write_text(
            f'type = "file";\nfilename = "{self.w}/log/rspamd.log";\nlevel = "info";\n'
        )
        user = pwd.getpwnam("_rspamd")
        for path in (self.db, self.w / "run", self.w / "log"):
            os.chown(path, user.pw_uid, user.pw_gid)

    def use_spam_dir(self, spam_dir: Path) -> None:
        """Read the state's policies where the node's pi-pull writes them (``<root>/spam``), as a node does."""
        self.write_local_d(rspamd_snippets(self.milter, self.controller, spam_dir=str(spam_dir)))

    def add_milter_socket(self, path: Path) -> None:
        """Also listen as the milter on the UNIX socket ``path`` (before ``start``; after ``use_spam_dir``)."""
        proxy = self.conf / "local.d" / "worker-proxy.inc"
        proxy.write_text(proxy.read_text() + f'bind_socket = "{path} mode=0666";\n')

    @property
    def reload_command(self) -> str:
        """What systemd's ExecReload does (SIGHUP to the main process): [spam] reload for the test's pi-pull."""
        assert self.proc is not None
        return f"kill -HUP {self.proc.pid}"

    def wait_reloaded(self, config_id: object, timeout: float = 120.0) -> None:
        """Until the controller answers with a config_id other than ``config_id`` (a reload done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stat = self.stat()
            if stat is not None and stat.get("config_id") != config_id and _listening(self.milter_port):
                return
            time.sleep(0.3)
        raise RuntimeError(f"rspamd did not reload in {timeout:.0f}s: {self.log()[-3000:]}")

    def write_local_d(self, files: dict[str, str]) -> None:
        for name, content in files.items():
            (self.conf / "local.d" / name).write_text(content)

    @property
    def vars(self) -> list[str]:
        return [
            f"--var=LOCAL_CONFDIR={self.conf}",
            f"--var=DBDIR={self.db}",
            f"--var=RUNDIR={self.w / 'run'}",
            f"--var=LOGDIR={self.w / 'log'}",
        ]

    def start(self) -> None:
        log = (self.w / "rspamd.out").open("ab")
        self.proc = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf", *self.vars],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log()[-3000:]}")
            if self.stat() is not None and _listening(self.milter_port):
                return
            time.sleep(0.5)
        raise RuntimeError(f"rspamd did not come up in {START_TIMEOUT:.0f}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(self.milter_port):
            time.sleep(0.1)

    def rspamc(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["rspamc", "-h", self.controller, *args], input=input, capture_output=True, timeout=60, check=False
        )

    def stat(self) -> dict[str, object] | None:
        """``rspamc -j stat`` as JSON; None while the controller does not answer."""
        r = self.rspamc("-j", "stat")
        if r.returncode != 0:
            return None
        with contextlib.suppress(ValueError):
            data = json.loads(r.stdout)
            return data if isinstance(data, dict) else None
        return None

    def log(self) -> str:
        out = []
        for path in (self.w / "rspamd.out", self.w / "log" / "rspamd.log"):
            with contextlib.suppress(OSError):
                out.append(path.read_text(errors="replace"))
        return "\n".join(out)

    def __enter__(self) -> Rspamd:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
