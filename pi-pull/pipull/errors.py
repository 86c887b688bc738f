"""Exit codes and the four exceptions a tick can end in."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_LOCKED = 4
EXIT_STALE = 5

EXIT_CODES_HELP = """exit codes:
  0  applied a new commit, or already up to date
  1  error (fetch/postmap/reload failed; on reload failure the previous release is kept)
  2  usage or configuration error
  3  refused (no or bad accepted-head statement, unsigned or untrusted commit, rollback,
     invalid rendered content, over a [limits] size)
  4  another pi-pull run holds the lock
  5  stale: the newest verified accepted-head statement (fetched now, or the last one kept
     when the fetch failed) is older than [freshness] max_staleness; the node keeps serving
     its last good release and reports status "stale"
"""


class ConfigError(Exception):
    """Bad configuration or usage (exit 2)."""


class TickError(Exception):
    """An operational failure; the node keeps its last good release (exit 1)."""


class Refused(Exception):
    """The fetched commit must not be applied (exit 3)."""


class Stale(Exception):
    """The node's newest verified statement is older than max_staleness (exit 5, keeps serving)."""


class Locked(Exception):
    """Another run holds the lock (exit 4)."""
