"""Constants and small helpers shared by every stage's tests: actors, a password, a fake clock,
and the git CLI read-backs. Fixtures live in the conftest.py files, never here."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pygit2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mailstate.state.datadir import DataDir
from mailstate.state.snapshot import Actor

ADMIN = Actor.admin("token:test-admin")
PROJECT_A = Actor.project(101, "token:project-a")
PROJECT_B = Actor.project(202, "token:project-b")
PASSWORD = "correct horse battery"


class FakeClock:
    """A clock that advances one second per reading: commit times are distinct and stable."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def make_key(path: Path, comment: str = "mailstate") -> str:
    """An ed25519 key pair at `path` (0600) and `path`.pub, the files `ssh-keygen -t ed25519 -N ''`
    writes, made in process (init_data_dir's ``keygen`` in the library tests); the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}"
    Path(f"{path}.pub").write_text(line + "\n")
    return line


def git_out(repo: Path, *args: str) -> str:
    """git's stdout in `repo` (raises on failure)."""
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _open(repo: Path | str) -> pygit2.Repository:
    return pygit2.Repository(str(repo))


def commit_count(repo: Path | str, rev: str = "main") -> int:
    """Commits reachable from `rev` (``git rev-list --count``), read in process."""
    r = _open(repo)
    return sum(1 for _ in r.walk(r.revparse_single(rev).id))


def rev_parse(repo: Path | str, rev: str = "main") -> str:
    """The commit id `rev` names (``git rev-parse``), read in process."""
    return str(_open(repo).revparse_single(rev).peel(pygit2.Commit).id)


def commit_ids(repo: Path | str, rev: str = "main") -> list[str]:
    """The commits reachable from `rev`, newest first (``git rev-list rev``); in process."""
    r = _open(repo)
    return [str(c.id) for c in r.walk(r.revparse_single(rev).peel(pygit2.Commit).id, pygit2.enums.SortMode.TOPOLOGICAL)]


def parent_ids(repo: Path | str, rev: str = "main") -> list[str]:
    """The parents of `rev`; in process."""
    return [str(p) for p in _open(repo).revparse_single(rev).peel(pygit2.Commit).parent_ids]


def tree_id(repo: Path | str, rev: str = "main") -> str:
    """The id of `rev`'s root tree: equal ids, equal trees (every path, mode and byte)."""
    return str(_open(repo).revparse_single(rev).peel(pygit2.Tree).id)


def changed_paths(repo: Path | str, old: str, new: str) -> list[str]:
    """The files that differ between two revisions, sorted (``git diff --name-only``); in process."""
    r = _open(repo)
    diff = r.diff(r.revparse_single(old).peel(pygit2.Tree), r.revparse_single(new).peel(pygit2.Tree))
    return sorted({path for d in diff.deltas for path in (d.old_file.path, d.new_file.path)})


def read_file(repo: Path | str, path: str, rev: str = "main") -> str | None:
    """The file `path` at `rev` (``git show rev:path``), None if absent; read in process."""
    tree = _open(repo).revparse_single(rev).peel(pygit2.Tree)
    try:
        entry = tree[path]
    except KeyError:
        return None
    obj = _open(repo)[entry.id]
    assert isinstance(obj, pygit2.Blob), f"{path} at {rev} is not a file"
    return obj.data.decode()


def tree_paths(repo: Path | str, rev: str = "main", under: str = "") -> list[str]:
    """Every file path at `rev`, sorted (``git ls-tree -r --name-only rev under``); in process."""
    r = _open(repo)
    out: list[str] = []

    def walk(tree: pygit2.Tree, prefix: str) -> None:
        for entry in tree:
            path = f"{prefix}{entry.name}"
            if entry.type_str == "tree":
                walk(r[entry.id].peel(pygit2.Tree), f"{path}/")
            else:
                out.append(path)

    walk(r.revparse_single(rev).peel(pygit2.Tree), "")
    top = under.rstrip("/")
    return sorted(p for p in out if not top or p == top or p.startswith(top + "/"))


def commit_message(repo: Path | str, rev: str = "main") -> str:
    """The full message of `rev` (``git log -1 --format=%B``, without git's trailing newline); in process."""
    return str(_open(repo).revparse_single(rev).peel(pygit2.Commit).message)


def history_text(repo: Path | str) -> str:
    """Every commit message and file of the history of every ref, concatenated (all that
    ``git log -p --all`` shows, whole files instead of diffs); in process."""
    r = _open(repo)
    seen: set[pygit2.Oid] = set()
    parts: list[str] = []

    def add_tree(tree: pygit2.Tree) -> None:
        for entry in tree:
            if entry.id in seen:
                continue
            seen.add(entry.id)
            obj = r[entry.id]
            if isinstance(obj, pygit2.Tree):
                add_tree(obj)
            elif isinstance(obj, pygit2.Blob):
                parts.append(obj.data.decode(errors="replace"))

    for name in r.references:
        target = r.references[name].peel()
        if not isinstance(target, pygit2.Commit):
            continue
        for commit in r.walk(target.id):
            if commit.id not in seen:
                seen.add(commit.id)
                parts.append(commit.message)
                add_tree(commit.tree)
    return "\n".join(parts)


def verify_commit(data: DataDir, rev: str = "main") -> subprocess.CompletedProcess[str]:
    """Real `git verify-commit` against the data dir's allowed_signers."""
    return subprocess.run(
        ["git", "-C", str(data.repo), "-c", f"gpg.ssh.allowedSignersFile={data.allowed_signers}", "verify-commit", rev],
        capture_output=True,
        text=True,
    )
