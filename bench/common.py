"""What every bench shares: an isolated environment, and percentiles.

Import this module, and call `isolate_env()`, before anything imports pygit2: libgit2 reads
HOME once, at init, and the machine's git config must reach neither the store nor the
baselines it is compared with.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence

_DROP = {"XDG_CONFIG_HOME", "GNUPGHOME", "SSH_AUTH_SOCK", "MAILSTATE_TOKEN", "MAILSTATE_UPSTREAM"}


def isolate_env() -> str:
    """Drop GIT_* and friends, point HOME at a temp dir (removed at exit); returns that HOME."""
    home = tempfile.mkdtemp(prefix="mailstate-bench-home-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    for name in list(os.environ):
        if name.startswith("GIT_") or name in _DROP:
            del os.environ[name]
    os.environ["HOME"] = home
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    return home


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1000:.{digits}f}"
