"""GitRepo writes trees from Python (state.gitrepo: tree_entry, in_git_order, _write_loose); each
one is exactly the tree git writes for the same entries, read back by the git CLI."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pygit2
import pytest

from mailstate.state import gitrepo
from mailstate.state.gitrepo import GitRepo, parse_tree

pytestmark = pytest.mark.e2e  # the git CLI writes the trees to compare with and checks the repo

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

# git sorts a folder as if its name ended in "/": a-b, a.b, a/, a0 (a plain sort of the names
# puts the folder first). Unicode names sort by their UTF-8 bytes.
EDGES: dict[str, bytes | None] = {
    "a/x": b"1\n",
    "a.b": b"2\n",
    "a-b": b"3\n",
    "a0": b"4\n",
    "a.yaml": b"5\n",
    "Z": b"6\n",
    "\u00e9t\u00e9": b"7\n",
    "e\u0301t\u00e9": b"8\n",  # the same word decomposed: another name
    "\u65e5\u672c/\u00fc": b"9\n",
    "z\u00fc/a": b"10\n",
    "z\u00fc.": b"11\n",
}


def _git(repo: Path, *args: str, data: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True, check=True).stdout.decode()


def _mktree(repo: GitRepo, tree: str) -> str:
    """The id `git mktree` gives the entries of `tree` (listed by libgit2, fed in reverse)."""
    obj = repo.repo[tree]
    assert isinstance(obj, pygit2.Tree)
    lines = [f"{item.filemode:o} {item.type_str} {item.id}\t{item.name}\n" for item in obj]
    return _git(
        repo.path, "mktree", "--missing", "-z", data="".join(reversed(lines)).replace("\n", "\0").encode()
    ).strip()


def _trees(repo: GitRepo, tree: str) -> list[str]:
    """`tree` and every tree below it."""
    out, stack = [], [tree]
    while stack:
        oid = stack.pop()
        out.append(oid)
        obj = repo.repo[oid]
        assert isinstance(obj, pygit2.Tree)
        stack.extend(str(item.id) for item in obj if item.type_str == "tree")
    return out


def _commit(repo: GitRepo, tree: str, parent: str | None) -> str:
    sig = pygit2.Signature("t", "t@example.org", 0, 0)
    parents = [pygit2.Oid(hex=parent)] if parent else []
    return str(repo.repo.create_commit(None, sig, sig, "t", pygit2.Oid(hex=tree), parents))


def test_a_tree_written_from_python_is_the_tree_git_mktree_writes(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    root = repo.build_tree(None, EDGES)
    names = [item.name for item in repo.repo[root]]  # type: ignore[attr-defined]
    assert names[:6] == ["Z", "a-b", "a.b", "a.yaml", "a", "a0"]  # the folder "a" as if "a/"
    for tree in _trees(repo, root):
        assert _mktree(repo, tree) == tree


def test_git_fsck_strict_accepts_the_trees_after_a_flush(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    head = None
    for change in (EDGES, {"a/x": None, "a/y": b"12\n", "\u00e9t\u00e9": None}, {"z\u00fc": None}, {"a": b"13\n"}):
        head = _commit(repo, repo.build_tree(head, change), head)
        repo.move_branch(head, repo.head())
    _git(repo.path, "fsck", "--strict", "--no-dangling")  # entry order, modes, names
    assert _git(repo.path, "ls-tree", "--name-only", "main").split("\n")[:5] == ["Z", "a", "a-b", "a.b", "a.yaml"]


def test_staged_objects_are_stored_uncompressed_and_read_by_git_once_flushed(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    assert repo._stage is not None
    data = b"hello hello hello hello\n" * 40
    oid = repo._write_blob(data)
    staged = (repo._stage / str(oid)[:2] / str(oid)[2:]).read_bytes()
    assert staged == zlib.compress(b"blob %d\0" % len(data) + data, gitrepo.STAGED_ZLIB_LEVEL)
    assert len(staged) > len(data)  # stored, not deflated
    repo.flush_objects()
    assert _git(repo.path, "cat-file", "blob", str(oid)) == data.decode()


def test_an_empty_root_is_git_s_empty_tree(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    assert repo.build_tree(None, {}) == EMPTY_TREE
    first = repo.build_tree(None, {"d/e/f": b"1\n"})
    assert repo.build_tree(_commit(repo, first, None), {"d/e/f": None}) == EMPTY_TREE  # every folder left empty
    repo.flush_objects()
    assert _git(repo.path, "cat-file", "-t", EMPTY_TREE).strip() == "tree"


def test_removing_the_last_file_of_a_folder_removes_the_folder(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    base = _commit(repo, repo.build_tree(None, {"d/e/z": b"1\n", "d/y": b"2\n", "a": b"3\n"}), None)
    assert repo.build_tree(base, {"d/e/z": None}) == repo.build_tree(None, {"d/y": b"2\n", "a": b"3\n"})
    assert repo.build_tree(base, {"d/e/z": None, "d/y": None}) == repo.build_tree(None, {"a": b"3\n"})
    assert repo.build_tree(base, {"d": None}) == repo.build_tree(None, {"a": b"3\n"})  # a whole folder
    assert repo.build_tree(base, {"a/x": None}) == repo.build_tree(base, {})  # nothing below a file: it stays


def test_a_kept_tree_and_the_tree_read_back_from_libgit2_are_the_same(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    head = None
    for change in (EDGES, {"a": b"file now\n", "a0/b": b"folder now\n"}, {"\u65e5\u672c/\u00fc": b"x\n"}):
        tree = repo.build_tree(head, change)
        head = _commit(repo, tree, head)
        kept = repo._trees[bytes.fromhex(tree)]
        assert list(kept.items()) == list(parse_tree(repo.repo[tree].read_raw()).items())  # in order too
    repo.flush_objects()
    again = GitRepo(repo.path)  # keeps nothing: reads every base from the repo
    change = {"a-b": None, "\u65e5\u672c/new": b"y\n", "z\u00fc/a": None}
    assert again.build_tree(head, change) == repo.build_tree(head, change)


def test_other_modes_in_a_base_tree_are_kept(tmp_path: Path) -> None:
    # A tree git wrote with an executable, a symlink and a submodule: entries the store never
    # writes, kept as they are when it changes another one.
    repo = GitRepo.init_bare(tmp_path / "r.git")
    blob = str(repo._write_blob(b"#!/bin/sh\n"))
    repo.flush_objects()
    sub = "1" * 40  # a submodule's commit is not in the repo
    lines = f"100755 blob {blob}\trun\n120000 blob {blob}\tlink\n160000 commit {sub}\tsub\n100644 blob {blob}\tf\n"
    base_tree = _git(repo.path, "mktree", data=lines.encode()).strip()
    base = _commit(repo, base_tree, None)
    tree = repo.build_tree(base, {"f": b"new\n"})
    assert _mktree(repo, tree) == tree
    modes = {item.name: item.filemode for item in repo.repo[tree]}  # type: ignore[attr-defined]
    assert modes == {"run": 0o100755, "link": 0o120000, "sub": 0o160000, "f": 0o100644}


def test_a_repo_with_alternates_gets_compressed_loose_objects_git_accepts(tmp_path: Path) -> None:
    # A repo that borrows objects has no staging folder: the trees and blobs are written as
    # loose objects in the repo, where they stay, so they are compressed as git would.
    GitRepo.init_bare(tmp_path / "lender.git")
    pygit2.init_repository(str(tmp_path / "r.git"), bare=True, initial_head="main")
    (tmp_path / "r.git" / "objects" / "info" / "alternates").write_text(f"{tmp_path / 'lender.git' / 'objects'}\n")
    repo = GitRepo(tmp_path / "r.git")
    assert repo._stage is None
    data = b"hello hello hello hello\n" * 40
    tree = repo.build_tree(None, {**EDGES, "big": data})
    repo.move_branch(_commit(repo, tree, None), None)
    loose = repo.path / "objects" / tree[:2] / tree[2:]
    assert zlib.decompress(loose.read_bytes()).startswith(b"tree ")
    blob = str(repo.repo[tree]["big"].id)  # type: ignore[index]
    assert len((repo.path / "objects" / blob[:2] / blob[2:]).read_bytes()) < len(data) / 4
    _git(repo.path, "fsck", "--strict", "--no-dangling")
    assert _mktree(repo, tree) == tree


def test_a_base_tree_out_of_git_s_order_is_written_in_order(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    blob = repo._write_blob(b"1\n").raw
    body = b"".join(b"100644 " + name + b"\0" + blob for name in (b"b", b"a0", b"a"))
    base_tree = repo.repo.odb.write(pygit2.enums.ObjectType.TREE, body)
    base = _commit(repo, str(base_tree), None)
    repo.flush_objects()
    for change, names in (({"a": b"2\n"}, ["a", "a0", "b"]), ({"a.b": b"2\n"}, ["a", "a.b", "a0", "b"])):
        fresh = GitRepo(repo.path)  # keeps nothing: reads the base from libgit2
        tree = fresh.build_tree(base, change)
        assert [item.name for item in fresh.repo[tree]] == names  # type: ignore[attr-defined]
        assert _mktree(fresh, tree) == tree
