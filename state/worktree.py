"""Which domain files of a working tree differ from a revision, by content.

`mailstate plan` on a working tree must find the few domain files that changed without
parsing and validating every one (O(state): seconds at 100k mailboxes, most of it YAML and
pydantic). Telling whether a file changed needs no parse: its git blob id (`pygit2.hash` of
its bytes, in C) either equals the revision's blob at that path or not. So the checkout is
read and hashed (~15 MB at 100k mailboxes) and only the files that differ are parsed
(state.plan).

Why not ask git (`git diff --name-only REV`)? It answers from the index's stat data, which is
fast when the index is fresh, but on a fresh clone of a large state it takes minutes (every
entry re-checked); the content hash costs the same every time and needs no
index at all (a checkout without one, or a CI cache, works the same).

The files that hash the same are byte-identical to REV's blobs; they are REV's state, which
`plan` reads from the revision side for both sides. (A broken file that is committed and
untouched is `mailstate check`'s to report, as it is for a plan of two revisions.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pygit2

from mailstate.state import files
from mailstate.state.gitrepo import GitRepo


def _walk(root: str, rel: str) -> Iterator[tuple[str, bool]]:
    """(repo path, is a plain file) of the files below `root/rel`; symlinks are listed as not
    plain and never followed. The kind comes from the directory entry (no stat per file)."""
    try:
        entries = list(os.scandir(os.path.join(root, rel)))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        path = f"{rel}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, path)
        else:
            yield path, entry.is_file(follow_symlinks=False)


def _blob_id(path: str) -> str | None:
    try:
        # In C: open, read and hash (~10 µs a file; pathlib's read_bytes + hash took ~25).
        return str(pygit2.hashfile(path))
    except (OSError, pygit2.GitError):
        return None


def _scan(root: str, rel: str, committed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(files present, files changed) below `root/rel` (one bucket folder, or one stray file)."""
    present: list[str] = []
    changed: list[str] = []
    entries = (
        _walk(root, rel)
        if os.path.isdir(os.path.join(root, rel)) and not os.path.islink(os.path.join(root, rel))
        else [(rel, False)]
    )
    for path, plain in entries:
        present.append(path)
        if not plain or committed.get(path) is None or _blob_id(os.path.join(root, path)) != committed[path]:
            changed.append(path)
    return present, changed


def changed_domain_paths(repo: GitRepo, root: Path, base: str) -> list[str]:
    """Repo paths below `domains/` where the working tree at `root` differs from commit
    `base`: changed content, deleted, or new (anything that is not a plain file with the
    revision's bytes counts as changed, so the caller's parse reports it).

    The bucket folders are hashed by a few threads: pygit2.hashfile releases the GIL, and at
    1M mailboxes (200k files) hashing is most of a plan."""
    from concurrent.futures import ThreadPoolExecutor

    committed = dict(repo.walk_blobs(base, files.DOMAINS_DIR))
    top = str(root)
    try:
        buckets = sorted(entry.name for entry in os.scandir(os.path.join(top, files.DOMAINS_DIR)))
    except (FileNotFoundError, NotADirectoryError):
        buckets = []
    rels = [f"{files.DOMAINS_DIR}/{name}" for name in buckets]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda rel: _scan(top, rel, committed), rels))
    present = {path for found, _ in results for path in found}
    changed = {path for _, diff in results for path in diff}
    changed.update(path for path in committed if path not in present)
    return sorted(changed)
