"""GitRepo writes blobs and the branch ref from Python (state.gitrepo: the GIL is let go
during their file system calls); what it writes is exactly what git writes, read back by
the git CLI and by libgit2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pygit2
import pytest

from mailstate.state.errors import StoreError
from mailstate.state.gitrepo import REF, GitRepo

pytestmark = pytest.mark.e2e  # the git CLI reads what was written


def _git(repo: Path, *args: str, data: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True, check=True).stdout.decode()


@pytest.mark.parametrize("data", [b"", b"hello\n", bytes(range(256)) * 300])
def test_a_blob_written_from_python_is_the_blob_git_writes(tmp_path: Path, data: bytes) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    oid = repo._write_blob(data)
    assert str(oid) == _git(repo.path, "hash-object", "--stdin", data=data).strip()
    assert repo.blob(str(oid)) == data  # libgit2 reads it
    assert (
        subprocess.run(["git", "-C", str(repo.path), "cat-file", "blob", str(oid)], capture_output=True).stdout == data
    )
    assert repo._write_blob(data) == oid  # written again: the same object, no error
    assert not [p.name for p in (repo.path / "objects").rglob("tmp_*")]  # no temp file left


def test_the_branch_written_from_python_is_read_by_git_and_libgit2(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    tree = repo.build_tree(None, {"a": b"1\n"})
    sig = pygit2.Signature("t", "t@example.com", 1, 0)
    first = repo.repo.create_commit(None, sig, sig, "one", pygit2.Oid(hex=tree), [])
    second = repo.repo.create_commit(None, sig, sig, "two", pygit2.Oid(hex=tree), [first])
    repo.move_branch(str(first), None)
    repo.move_branch(str(second), str(first))
    assert repo.head() == str(second)
    assert _git(repo.path, "rev-parse", "main").strip() == str(second)
    assert (repo.path / REF).read_text() == f"{second}\n"
    assert not (repo.path / f"{REF}.lock").exists()
    with pytest.raises(StoreError):
        repo.move_branch(str(first), str(first))  # compare-and-swap: main is not at `first`
    assert repo.head() == str(second)
