"""The subprocess seam: every command a tick runs goes through a Runner (tests pass their own)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO

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

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
        limit_dir: str | None = None,
        limit_bytes: int = 0,
        stdin_file: BinaryIO | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv``; with ``limit_dir``, kill it (rc 125) once that directory weighs more than
        ``limit_bytes`` (a fetch from an untrusted remote must not fill the disk). ``stdin_file``: an
        open file as its stdin (large input: ``input`` goes through a pipe 512 bytes per poll)."""
        if limit_dir is not None:
            return self._run_watched(list(argv), env, timeout, limit_dir, limit_bytes)
        try:
            return subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                env=self._env(env),
                timeout=timeout,
                cwd=cwd,
                stdin=stdin_file if stdin_file is not None else None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            return subprocess.CompletedProcess(list(argv), 127, b"", (f"{argv[0]}: command not found").encode())
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(
                list(argv), 124, b"", (f"{argv[0]}: timed out after {timeout}s").encode()
            )

    def _run_watched(
        self, argv: list[str], env: Mapping[str, str] | None, timeout: float | None, limit_dir: str, limit_bytes: int
    ) -> subprocess.CompletedProcess[bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # Its own session: the kill reaches git's helpers (index-pack, remote-https) too.
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self._env(env), start_new_session=True
                )
            except FileNotFoundError:
                return subprocess.CompletedProcess(argv, 127, b"", (f"{argv[0]}: command not found").encode())
            code: int | None = None
            reason = b""
            while code is None:
                try:
                    code = proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if dir_size(limit_dir) > limit_bytes:
                    code, reason = (
                        125,
                        f"{argv[0]}: stopped, it wrote more than {limit_bytes // (1024 * 1024)} MiB".encode(),
                    )
                elif deadline is not None and time.monotonic() > deadline:
                    code, reason = 124, f"{argv[0]}: timed out after {timeout}s".encode()
                else:
                    continue
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, code, out.read(1 << 20), reason or err.read(1 << 16))

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A long-lived child with pipes on stdin/stdout (``git cat-file --batch``); stderr is discarded."""
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self._env(env)
        )

    def shell(self, command: str, *, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a configured shell command (reloads). Output goes to an unnamed temp file, not a
        pipe, so a command that leaves a daemon behind cannot make us wait for it."""
        with tempfile.TemporaryFile() as out:
            try:
                r = subprocess.run(
                    command,
                    shell=True,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._env(None),
                    timeout=timeout,
                )
                code = r.returncode
            except subprocess.TimeoutExpired:
                code = 124
            out.seek(0)
            text = out.read(65536)
        if code == 124 and not text:
            text = f"timed out after {timeout}s".encode()
        return subprocess.CompletedProcess(command, code, b"", text)


def dir_size(path: str) -> int:
    """Bytes under ``path`` (files only, symlinks not followed); 0 when it does not exist."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def short(out: bytes, limit: int = 300) -> str:
    text = " ".join(out.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + "..."
