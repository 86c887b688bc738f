"""OpenDKIM in the background from the bundle's opendkim.conf: the milter of the DKIM end-to-end
tests (tests/e2e/test_dkim_e2e.py) and of the Sieve replies' signing (test_owners_e2e.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from mailstate.compiler.node_bundle import opendkim_snippet
from tests.helpers.mailnode import wait_port


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
