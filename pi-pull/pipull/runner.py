"""The subprocess seam: every command a tick runs goes through a Runner (tests pass their own)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

_DROP_ENV_PREFIXES = ("GIT_",)
_KEEP_ENV = ("GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "GIT_PROXY_COMMAND")


class Runner:
    """Runs subprocesses for a tick. Tests or embedders may pass their own."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        base = dict(os.environ if env is None else env)
        for k in list(base):
            if k.startswith(_DROP_ENV_PREFIXES) and k not in _KEEP_ENV:
                del base[k]
        base["GIT_TERMINAL_PROMPT"] = "0"
        base["LC_ALL"] = "C"
        self.env = base

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(self.env)
        if extra:
            env.update(extra)
        return env

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(list(argv), input=input, capture_output=True, env=self._env(env), timeout=timeout, cwd=cwd,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            return subprocess.CompletedProcess(list(argv), 127, b"", (f"{argv[0]}: command not found").encode())
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(list(argv), 124, b"",
                                               (f"{argv[0]}: timed out after {timeout}s").encode())

    def shell(self, command: str, *, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a configured shell command (reloads). Output goes to an unnamed temp file, not a
        pipe, so a command that leaves a daemon behind cannot make us wait for it."""
        with tempfile.TemporaryFile() as out:
            try:
                r = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=self._env(None), timeout=timeout)
                code = r.returncode
            except subprocess.TimeoutExpired:
                code = 124
            out.seek(0)
            text = out.read(65536)
        if code == 124 and not text:
            text = f"timed out after {timeout}s".encode()
        return subprocess.CompletedProcess(command, code, b"", text)


def short(out: bytes, limit: int = 300) -> str:
    text = " ".join(out.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + "..."
