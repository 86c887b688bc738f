"""The upstream remote: a bare repo on a git host (or a path) that several writers share.

Pushing is the compare-and-swap: the server pushes a commit whose parent is the upstream tip
it last saw, with a plain (non-forced) `git push`. If anyone else moved the branch, git
rejects it as non-fast-forward; the store then fetches, validates and re-runs the operation.
Credentials come from git's own configuration (ssh keys, credential helpers), never from
mailstate.

The accepted-head statement (state/statement.py) travels at the same ref on upstream,
`refs/mailstate/accepted`, so that nodes following the git host get it there. Its push is forced
(a new tag object is never a fast-forward of the old one) but leased: it replaces only the
statement the server last saw there, and the store looks before it replaces another one.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pygit2

from mailstate.state.errors import UpstreamUnavailable
from mailstate.state.gitrepo import BRANCH, REF
from mailstate.state.statement import REF as STATEMENT_REF
from mailstate.state.statement import read_statement

TRACKING_REF = "refs/mailstate/upstream"
STATEMENT_TRACKING_REF = "refs/mailstate/upstream-accepted"
REJECTED_PREFIX = "refs/mailstate/rejected/"


@dataclass(frozen=True)
class PushResult:
    ok: bool
    rejected: bool
    detail: str
    statement: bool = False  # the statement went up with the commit (push(..., statement=))


class Upstream:
    """git fetch/push between the server's local bare repo and one upstream URL."""

    def __init__(self, url: str, local: Path, *, timeout: float = 30.0) -> None:
        self.url = url
        self.local = Path(local)
        self.timeout = timeout

    def _git(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["git", "-C", str(self.local), *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                # Never block on a password prompt: a server has nobody to answer it.
                env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin", **_passthrough_env()},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpstreamUnavailable(
                "The upstream state repo could not be reached.", code="upstream_unavailable"
            ) from exc

    def fetch(self) -> str | None:
        """Fetch upstream `main` into a private ref; its sha, or None when upstream has no main yet."""
        proc = self._git("fetch", "--quiet", "--no-tags", self.url, f"+{REF}:{TRACKING_REF}")
        if proc.returncode != 0:
            if "couldn't find remote ref" in proc.stderr.lower():
                return None
            raise UpstreamUnavailable(
                f"Fetching the upstream state repo failed: {_last_line(proc.stderr)}", code="upstream_unavailable"
            )
        rev = self._git("rev-parse", "--verify", "--quiet", TRACKING_REF)
        return rev.stdout.strip() or None

    def push(self, commit: str, *, expect: str | None = None, statement: str | None = None) -> PushResult:
        """Push `commit` to upstream main; non-fast-forward → rejected.

        With `expect`, the push replaces exactly that upstream commit (force-with-lease): used
        only to put a valid state back over a commit the fleet refused.

        With `statement` (the tag stating `commit`), both go in ONE atomic push: main moves and
        the statement follows it, or neither moves. The statement is forced without a lease:
        when main fast-forwards to `commit`, a statement of `commit` is the newest there can be.
        If only the statement sank the push (a hook refusing refs/mailstate/*, say), main is
        pushed alone, and `statement` in the result is False (the caller pushes it later).
        """
        args = ["push", "--porcelain"]
        if expect is not None:
            args.append(f"--force-with-lease={REF}:{expect}")
        refspecs = [f"{commit}:{REF}"]
        if statement is not None:
            args.append("--atomic")
            refspecs.append(f"+{statement}:{STATEMENT_REF}")
        proc = self._git(*args, self.url, *refspecs)
        if proc.returncode == 0:
            return PushResult(True, False, "", statement=statement is not None)
        if statement is not None and _statement_sank(proc.stdout):
            return self.push(commit, expect=expect)
        text = proc.stdout + proc.stderr
        rejected = any(
            marker in text
            for marker in ("[rejected]", "non-fast-forward", "fetch first", "stale info", "[remote rejected]")
        )
        if rejected:
            return PushResult(False, True, _last_line(text))
        raise UpstreamUnavailable(
            f"Pushing to the upstream state repo failed: {_last_line(text)}", code="upstream_unavailable"
        )

    def push_statement(self, tag: str, *, expect: str | None) -> PushResult:
        """Force-push the statement tag object `tag` to upstream's statement ref, leased: it
        lands only while that ref holds `expect` (None: while it does not exist)."""
        proc = self._git(
            "push",
            "--porcelain",
            f"--force-with-lease={STATEMENT_REF}:{expect or ''}",
            self.url,
            f"{tag}:{STATEMENT_REF}",
        )
        if proc.returncode == 0:
            return PushResult(True, False, "")
        text = proc.stdout + proc.stderr
        if "stale info" in text:  # the lease failed: another statement is there now
            return PushResult(False, True, _last_line(text))
        raise UpstreamUnavailable(
            f"Pushing the accepted-head statement upstream failed: {_last_line(text)}", code="upstream_unavailable"
        )

    def fetch_statement(self) -> tuple[str, bytes] | None:
        """Fetch upstream's statement into a private ref: (tag id, raw tag), or None when absent."""
        proc = self._git("fetch", "--quiet", "--no-tags", self.url, f"+{STATEMENT_REF}:{STATEMENT_TRACKING_REF}")
        if proc.returncode != 0:
            if "couldn't find remote ref" in proc.stderr.lower():
                return None
            raise UpstreamUnavailable(
                f"Fetching the upstream accepted-head statement failed: {_last_line(proc.stderr)}",
                code="upstream_unavailable",
            )
        return read_statement(pygit2.Repository(str(self.local)), STATEMENT_TRACKING_REF)


def _statement_sank(porcelain: str) -> bool:
    """True when an atomic push failed because of the statement's ref, not main's."""
    for line in porcelain.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].endswith(f":{REF}"):
            return "atomic push fail" in parts[2]
    return False


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _passthrough_env() -> dict[str, str]:
    import os

    keep = ("HOME", "SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "GIT_SSH", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM")
    return {k: v for k, v in os.environ.items() if k in keep}


__all__ = ["BRANCH", "REJECTED_PREFIX", "STATEMENT_TRACKING_REF", "TRACKING_REF", "PushResult", "Upstream"]
