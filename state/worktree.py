"""Which state files of a working tree differ from a revision, as git's index knows it.

`mailstate plan` on a working tree used to parse every domain file of the checkout to find the
few that changed: O(state), ~6 s at 100k mailboxes. Git already knows: its index holds each
tracked file's stat data, so `git diff --name-only REV -- domains` answers from one lstat per
file (re-reading only files whose stat data moved), and `git ls-files --others` names the
files git does not track. Only those files are parsed and validated (state.plan).

The files git reports as unchanged are byte-identical to REV's blobs; they are REV's state,
which `plan` reads from the revision side for both sides. (A broken file that is committed and
untouched is `mailstate check`'s to report, as it is for a plan of two revisions.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mailstate.state import files

GIT_TIMEOUT_S = 120


def _git(root: Path, *args: str) -> bytes | None:
    # Only the repository at `root`: no pager, no external diff or textconv driver, no prompts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, env=env, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def changed_domain_paths(root: Path, base: str) -> list[str] | None:
    """Repo paths below `domains/` where the working tree at `root` differs from commit
    `base`: modified, deleted, added or untracked. None when git cannot tell (no git, a
    broken index): the caller then reads the whole working tree."""
    spec = ["--", files.DOMAINS_DIR]
    tracked = _git(root, "diff", "--name-only", "-z", "--no-renames", "--no-ext-diff", "--no-textconv", base, *spec)
    untracked = _git(root, "ls-files", "-z", "--others", *spec) if tracked is not None else None
    if tracked is None or untracked is None:
        return None
    paths = {p.decode("utf-8", "surrogateescape") for p in (tracked + b"\0" + untracked).split(b"\0") if p}
    return sorted(paths)
