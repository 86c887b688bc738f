"""GitRepo writes blobs and the branch ref from Python (state.gitrepo: the GIL is let go
during their file system calls); what it writes is exactly what git writes, read back by
the git CLI and by libgit2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pygit2
import pytest

from mailstate.state import gitrepo
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
    assert repo.blob(str(oid)) == data  # libgit2 reads it from the staging folder
    assert repo._write_blob(data) == oid  # written again: the same object, no error
    cat = ["git", "-C", str(repo.path), "cat-file", "blob", str(oid)]
    if data:  # (git knows the empty blob without looking)
        assert subprocess.run(cat, capture_output=True).returncode != 0  # staged: not in the repo yet
    repo.flush_objects()
    assert subprocess.run(cat, capture_output=True, check=True).stdout == data  # in the repo's new pack
    assert repo.blob(str(oid)) == data  # libgit2 now reads it from the pack
    packs = list((repo.path / "objects" / "pack").glob("pack-*.idx"))
    assert len(packs) == 1
    _git(repo.path, "verify-pack", "-v", str(packs[0]))  # git checks every object and both checksums
    assert not [p.name for p in (repo.path / "objects").rglob("tmp_*")]  # no temp file left


@pytest.mark.parametrize(
    "signature",
    [
        "-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQ\nAAAA==\n-----END SSH SIGNATURE-----\n",
        "-----BEGIN SSH SIGNATURE-----\nabc\n-----END SSH SIGNATURE-----",
        "one line",
    ],
)
def test_a_signed_commit_written_from_python_is_the_commit_libgit2_writes(tmp_path: Path, signature: str) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    tree = repo.build_tree(None, {"a": b"1\n"})
    person = pygit2.Signature("mailstate", "mailstate@localhost", 1700000000, 60)
    text = str(
        repo.repo.create_commit_string(person, person, "subject\n\nbody\n\nTrailer: x\n", pygit2.Oid(hex=tree), [])
    )
    theirs = repo.repo.create_commit_with_signature(text, signature)
    assert gitrepo.signed_commit(text, signature) == repo.repo.odb.read(theirs)[1]
    ours = repo.write_object(b"commit", gitrepo.signed_commit(text, signature))
    assert ours == str(theirs)


def test_a_store_commit_and_statement_are_written_from_python_and_verify(tmp_path: Path) -> None:
    """The store's commits and statement tags no longer go through libgit2's writer (which
    looks for an existing copy in every pack first): still git's objects, signed, fsck-clean."""
    from mailstate.state.datadir import init_data_dir, open_store
    from mailstate.state.statement import REF as STATEMENT_REF
    from tests.helpers.common import ADMIN

    dd = init_data_dir(tmp_path / "data")
    store = open_store(dd.root)
    out = store.execute("add-domain", ADMIN, {"domain": "py.example", "project_id": 1})
    commit = out.result["commit"]
    assert _git(dd.repo, "cat-file", "-t", commit).strip() == "commit"
    raw = _git(dd.repo, "cat-file", "commit", commit)
    assert "\ngpgsig -----BEGIN SSH SIGNATURE-----\n " in raw
    tag = _git(dd.repo, "rev-parse", STATEMENT_REF).strip()
    assert _git(dd.repo, "cat-file", "-t", tag).strip() == "tag"
    assert f"Accepted-Head: {commit}" in _git(dd.repo, "cat-file", "tag", tag)
    _git(dd.repo, "fsck", "--strict", "--no-dangling")


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


def test_a_group_of_store_writes_lands_in_one_pack_that_git_fsck_accepts(tmp_path: Path) -> None:
    from mailstate.state.datadir import init_data_dir
    from mailstate.state.keyrotation import DataDirSigner
    from mailstate.state.store import Store
    from tests.helpers.common import ADMIN

    data = init_data_dir(tmp_path / "data")
    store = Store(data.repo, DataDirSigner(data.root), gc_every=0)
    before = set((data.repo / "objects" / "pack").glob("pack-*.pack"))
    for i in range(3):
        store.execute("add-domain", ADMIN, {"domain": f"d{i}.example"})
    packs = set((data.repo / "objects" / "pack").glob("pack-*.pack")) - before
    assert len(packs) == 3  # one pack a write (each its own group here)
    _git(data.repo, "fsck", "--strict", "--no-dangling")  # every object there and sound
    assert _git(data.repo, "rev-parse", "main").strip() == store.head
    log = _git(data.repo, "log", "--format=%s", "-3", "main").splitlines()
    assert log == [f"add-domain d{i}.example" for i in (2, 1, 0)]


def test_a_dead_process_staging_folder_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    root = Path(gitrepo.STAGE_ROOTS[0])
    dead = root / f"{gitrepo.STAGE_PREFIX}{2**22 + 12345}-test"  # above pid_max's default: never alive
    live = root / f"{gitrepo.STAGE_PREFIX}1-test"  # pid 1 is always alive
    for folder in (dead, live):
        (folder / "ab").mkdir(parents=True, exist_ok=True)
    try:
        GitRepo.init_bare(tmp_path / "r.git")
        assert not dead.exists()
        assert live.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def _open_deleted(repo: Path) -> list[str]:
    """The files under `repo` this process holds open although they were deleted."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(repo)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_packs_a_roll_up_deleted_are_let_go_of(tmp_path: Path) -> None:
    # libgit2 keeps every pack it has opened open, deleted or not; a server writes a pack per
    # write group and rolls them up all day, so the repo's object database is renewed.
    repo = GitRepo.init_bare(tmp_path / "r.git")
    blobs = []
    for i in range(gitrepo.ODB_REOPEN_EVERY):
        blobs.append(repo._write_blob(f"{i}\n".encode()))
        repo.flush_objects()
        assert repo.blob(str(blobs[-1])) == f"{i}\n".encode()  # read from its pack: opens it
        if i == 2:
            _git(repo.path, "repack", "-d", "-q", "--geometric=2")  # the roll-up deletes the first packs
            assert _open_deleted(repo.path)  # ... and still held open
    assert repo.flushes == gitrepo.ODB_REOPEN_EVERY
    assert _open_deleted(repo.path) == []
    assert [repo.blob(str(b)) for b in blobs] == [f"{i}\n".encode() for i in range(len(blobs))]
