"""Many small new files written by a helper process: a first apply's passwd-files, off the main thread.

A first apply at 1M mailboxes creates 200k passwd-files. Each is an inode (open, write, fchmod,
fchown, close: ~40 us on a quiet disk, ~1 ms on a busy one), ~1/3 of the build when done in line
with the validation, which is pure Python and keeps one core busy. A thread would not help (it
would wait for the GIL after every syscall), so a second ``python3`` process does the file system
work on the other core while this one validates: each file is sent down a pipe as
``<size> <path>\\n<content>`` once its content was validated.

Paths are built by the caller from validated names (a domain never holds a space or a newline);
every file is created with O_EXCL (never an existing one) with exactly ``mode`` and ``gid``.
The files land in the build's private directories: if anything fails the whole build is
discarded, as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import IO

# The helper: stdlib only, no site (-I -S), reads until EOF, exits 1 with the error on stderr.
_HELPER = r"""
import os, sys
mode, uid, gid = int(sys.argv[1], 8), int(sys.argv[2]), int(sys.argv[3])
inp = sys.stdin.buffer
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
while True:
    head = inp.readline()
    if not head:
        break
    size, path = head[:-1].split(b" ", 1)
    data = inp.read(int(size))
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        if gid >= 0:
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
"""


class FileWriter:
    """``put(path, data)`` creates ``path`` (new) with ``data``; ``close()`` waits and raises OSError on a failure.

    Falls back to writing in this process when no interpreter can be started.
    """

    def __init__(self, mode: int, gid: int) -> None:
        self.mode = mode
        self.gid = gid
        self.uid = 0 if os.geteuid() == 0 else -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._err: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        if sys.executable:
            import tempfile

            self._err = tempfile.TemporaryFile()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _HELPER, f"{mode:o}", str(self.uid), str(gid)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=self._err,
                    env={"LC_ALL": "C"},
                )
            except OSError:
                self._proc = None

    def put(self, path: str, data: bytes) -> None:
        if self._proc is None:
            self._write_here(path, data)
            return
        self._pending += [b"%d %s\n" % (len(data), os.fsencode(path)), data]
        self._pending_bytes += len(data) + len(path) + 16
        if self._pending_bytes >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(b"".join(self._pending))
        except (BrokenPipeError, ValueError):
            self._fail()
        self._pending, self._pending_bytes = [], 0

    def _write_here(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, self.mode)
            if self.gid >= 0:
                os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)

    def _fail(self) -> None:
        assert self._proc is not None and self._err is not None
        self._proc.wait()
        self._err.seek(0)
        lines = self._err.read().decode("utf-8", "replace").strip().splitlines()
        raise OSError(
            f"writing passwd-files failed: {lines[-1] if lines else f'helper exited {self._proc.returncode}'}"
        )

    def close(self) -> None:
        """Every file written (raises OSError if one was not)."""
        if self._proc is None:
            return
        try:
            if self._pending:
                self._flush()
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            if self._proc.wait() != 0:
                self._fail()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the helper (a refused build: its files are discarded with the build)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()
        if self._err is not None:
            self._err.close()
