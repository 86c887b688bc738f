"""``<root>/state.json`` (last applied commit, previous good, pending reports) and ``<root>/.lock``."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any

from .errors import Locked, TickError
from .fsutil import atomic_write

STATE_FORMAT = 1


class Lock:
    """A non-blocking ``flock`` on ``<root>/.lock``: two runs never overlap."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Locked(f"another pi-pull run holds {self.path}; exiting") from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StateFile:
    """Read once per tick, written only when something changed (a no-op tick writes nothing)."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "state.json")

    def load(self) -> tuple[dict[str, Any], str]:
        """Return (state, raw file text); the raw text lets save() skip identical writes."""
        raw = ""
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = fh.read()
            st = json.loads(raw)
            if not isinstance(st, dict):
                raise ValueError("not an object")
        except FileNotFoundError:
            st = {}
        except (OSError, ValueError) as e:
            raise TickError(f"cannot read {self.path}: {e} (fix or remove it)") from None
        st.setdefault("format", STATE_FORMAT)
        st.setdefault("applied_commit", None)
        st.setdefault("previous_commit", None)
        st.setdefault("history", [])
        st.setdefault("pending_reports", [])
        return st, raw

    def save(self, st: dict[str, Any], original: str) -> None:
        data = json.dumps(st, indent=2, sort_keys=True) + "\n"
        if data == original:
            return
        atomic_write(self.path, data.encode(), 0o600)
