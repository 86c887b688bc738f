"""GitRepo.build_tree reuses the tree entries of earlier writes (state.gitrepo._take_entries);
any sequence of changes must give the same trees as building each one from a fresh repo
object that has kept nothing, and every tree must be the one libgit2 writes for its entries.
Property-based, against real pygit2 repos."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pygit2
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstate.state import gitrepo
from mailstate.state.gitrepo import GitRepo

PATHS = ["a.yaml", "d/x", "d/y", "d/e/z", "r/b1/d1/f", "r/b1/d1/g", "r/b1/d2/f", "r/b2/d3/f"]
# git sorts a folder as if its name ended in "/": "a-b", "a.b", "a/", "a0"; "a" is a file or a folder.
PATHS += ["a", "a/x", "a.b", "a-b", "a0", "\u00e9t\u00e9", "d/\u65e5\u672c"]
FOLDERS = ["d", "d/e", "r/b1", "r/b1/d1", "r/b2"]  # ("a": None removes a file or a folder)

step = st.dictionaries(
    st.sampled_from(PATHS + FOLDERS),
    st.one_of(st.none(), st.sampled_from([b"1\n", b"2\n", b"3\n"])),
    min_size=1,
    max_size=4,
).map(lambda d: {k: v for k, v in d.items() if not (k in FOLDERS and v is not None)})
# A step never names a folder and a path inside it (the store never does; the order would matter).
step = step.filter(lambda d: bool(d) and not any(a != b and b.startswith(a + "/") for a in d for b in d))


def _commit(repo: GitRepo, tree: str, parent: str | None) -> str:
    sig = pygit2.Signature("t", "t@example.org", 0, 0)
    return str(
        repo.repo.create_commit(None, sig, sig, "t", pygit2.Oid(hex=tree), [pygit2.Oid(hex=parent)] if parent else [])
    )


@given(steps=st.lists(step, min_size=1, max_size=10))
@settings(max_examples=60, deadline=None)
def test_kept_builders_give_the_trees_a_fresh_build_gives(
    tmp_path_factory: object, steps: list[dict[str, bytes | None]]
) -> None:
    path = Path(tmp_path_factory.mktemp("repo"))  # type: ignore[attr-defined]
    pygit2.init_repository(str(path), bare=True)
    kept = GitRepo(path)
    head: str | None = None
    for change in steps:
        tree = kept.build_tree(head, change)
        fresh = GitRepo(path).build_tree(head, change)  # a new object: no builders kept
        assert tree == fresh
        head = _commit(kept, tree, head)
        kept.flush_objects()  # into the repo: a new GitRepo reads only that, not kept's staged objects
    # And the final tree is what the changes say, read back through git.
    files = {}
    state: dict[str, bytes] = {}
    for change in steps:
        for p, data in change.items():
            if data is None:
                state = {k: v for k, v in state.items() if k != p and not k.startswith(p + "/")}
            else:
                state = {k: v for k, v in state.items() if not k.startswith(p + "/") and not p.startswith(k + "/")}
                state[p] = data
    root = kept.tree(head)
    _assert_libgit2_writes(kept, root)
    stack = [("", root)]
    while stack:
        base, t = stack.pop()
        for item in t:
            name = f"{base}{item.name}"
            obj = kept.repo[item.id]
            if isinstance(obj, pygit2.Tree):
                stack.append((name + "/", obj))
            else:
                files[name] = obj.data
    assert files == state


def _assert_libgit2_writes(repo: GitRepo, tree: pygit2.Tree) -> None:
    """`tree` and every tree below it are byte for byte what libgit2's TreeBuilder writes for
    their entries."""
    builder = repo.repo.TreeBuilder()
    for item in tree:
        builder.insert(item.name, item.id, item.filemode)
        sub = repo.repo[item.id]
        if isinstance(sub, pygit2.Tree):
            _assert_libgit2_writes(repo, sub)
    assert builder.write() == tree.id


def _fresh(text: str) -> str:
    """An equal string that is a new object (never the interned one)."""
    return "".join(list(text))


def test_a_read_does_not_keep_the_path_it_was_given(tmp_path: Path) -> None:
    # pygit2 keeps a reference to the str a tree lookup is given; GitRepo hands it the interned
    # copy instead, so the caller's string (one per write in the store) is never kept alive.
    repo = GitRepo.init_bare(tmp_path / "r.git")
    commit = _commit(repo, repo.build_tree(None, {"d/x": b"1\n"}), None)
    kept = sys.intern(_fresh("d/x"))  # the interned copy exists before the caller's string is made
    mine = _fresh("d/x")
    before = sys.getrefcount(mine)
    for _ in range(50):
        assert repo.read(commit, mine) == b"1\n"
    assert sys.getrefcount(mine) == before and kept == mine


def test_writes_keep_no_memory_per_write_in_the_tree_builder(tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "r.git")
    head = None

    def writes(n: int) -> None:
        nonlocal head
        for i in range(n):
            paths = [_fresh(p) for p in ("d/e/z", "r/b1/d1/f", "r/b2/d3/f")]
            head = _commit(repo, repo.build_tree(head, {p: f"{i}\n".encode() for p in paths}), head)
            repo.flush_objects()  # as the store does after each write

    writes(60)  # the kept builders fill up (BUILDERS_KEPT) and every name is seen
    tracemalloc.start()
    try:
        writes(20)
        first = tracemalloc.take_snapshot()
        writes(200)
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    mine = tracemalloc.Filter(True, gitrepo.__file__)
    grown = sum(s.size_diff for s in last.filter_traces([mine]).compare_to(first.filter_traces([mine]), "filename"))
    # 200 writes of three paths: the leak kept ~9 strings a write (~40 KB); fixed, nothing a write.
    assert grown < 16 * 1024, grown
