"""A real rspamd for tests, configured with the bundle's ``local.d`` files (the node's defaults).

    rs = Rspamd(workdir, dns=knot.address)
    with running_mailnode(spam_milter=rs.milter, spam_controller=rs.controller) as node:
        rs.use_node(node)  # the milter socket in node's queue directory, its policies from node's root
        rs.start()
        rs.milter        # the bundle's "unix:rspamd/milter.sock": Postfix's smtpd_milters
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
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from mailstate.compiler.node_bundle import SPAM_MILTER, rspamd_snippets, spam_milter_socket
from tests.helpers.mailnode import MailNode, free_ports, make_public_tmpdir

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
    """One rspamd: the proxy worker as the milter on the bundle's UNIX socket in a node's Postfix
    queue directory (``use_node``), the controller on a free loopback port."""

    def __init__(self, workdir: Path, dns: str) -> None:
        require_rspamd()
        self.w = workdir
        self.dns = dns
        milter_port, controller_port = free_ports(2)
        self.milter = SPAM_MILTER
        self.socket: Path | None = None  # where the milter socket is (use_node)
        self.tcp_milter = ""  # add_milter_tcp
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
        (self.conf / "override.d" / "options.inc").write_text(
            f'dns {{\n  nameserver = ["{dns}"];\n  timeout = 0.5s;\n  retransmits = 1;\n}}\n'
        )
        (self.conf / "override.d" / "logging.inc").write_text(
            f'type = "file";\nfilename = "{self.w}/log/rspamd.log";\nlevel = "info";\n'
        )
        user = pwd.getpwnam("_rspamd")
        for path in (self.db, self.w / "run", self.w / "log"):
            os.chown(path, user.pw_uid, user.pw_gid)

    def use_node(self, node: MailNode) -> None:
        """Be ``node``'s milter, as on a node: the socket in its Postfix queue directory (which
        running_mailnode made as install does) and the policies its pi-pull writes (``<root>/spam``)."""
        queue = node.workdir / "postfix" / "queue"
        self.socket = Path(spam_milter_socket(self.milter, str(queue)) or "")
        self.write_local_d(rspamd_snippets(self.milter, self.controller, spam_dir=str(node.root / "spam"), postfix_queue_dir=str(queue)))  # fmt: skip

    def add_milter_tcp(self) -> str:
        """Also listen as the milter on loopback TCP (before ``start``; after ``use_node``): Postfix's address."""
        proxy = self.conf / "local.d" / "worker-proxy.inc"
        proxy.write_text(proxy.read_text() + f'bind_socket = "127.0.0.1:{self.milter_port}";\n')
        self.tcp_milter = f"inet:127.0.0.1:{self.milter_port}"
        return self.tcp_milter

    def milter_up(self) -> bool:
        """The milter accepts connections (its socket, and its TCP port if any)."""
        if self.socket is None or not _unix_listening(self.socket):
            return False
        return not self.tcp_milter or _listening(self.milter_port)

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
            if stat is not None and stat.get("config_id") != config_id and self.milter_up():
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
        if self.socket is None:
            raise RuntimeError("Rspamd.use_node(node) first: the milter socket lives in the node's queue directory")
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
            if self.stat() is not None and self.milter_up():
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
        while time.monotonic() < deadline and (self.milter_up() or _listening(self.milter_port)):
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _unix_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(str(path)) == 0
