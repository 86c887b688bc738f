"""Reads never wait for writers, and writers queue first come first served.

Each Store stands for one process on the shared data dir; no trusted signers, so adopting
another store's commit needs no `git verify-commit` and the tests stay in process. The store's
`on_write_lock` seam runs code while a writer holds the lock: no patching, no timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pygit2

from mailstate.state import gitrepo
from mailstate.state.datadir import DataDir
from mailstate.state.errors import Conflict
from mailstate.state.fifolock import FifoLock
from mailstate.state.keyrotation import DataDirSigner
from mailstate.state.store import Store
from tests.helpers.common import PASSWORD, PROJECT_A
from tests.helpers.store import linked

# How long a test waits for something that must happen at once before calling it stuck.
STUCK = 60.0


def _store(data_dir: DataDir, on_write_lock: Callable[[], None] | None = None) -> Store:
    return Store(data_dir.repo, DataDirSigner(data_dir.root), on_write_lock=on_write_lock)


def _users(store: Store) -> set[str]:
    return {u["email"] for u in store.execute("list-users", PROJECT_A).result["users"]}


def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STUCK
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.005)


def test_a_read_answers_from_the_published_snapshot_while_a_writer_holds_the_lock(data_dir: DataDir) -> None:
    seen: list[set[str]] = []
    answered: list[bool] = []
    readers: list[threading.Thread] = []

    def during_write() -> None:
        # A read from another thread, while this writer holds the lock and main on disk is
        # newer than the store's snapshot (the case that used to take the lock): it must answer
        # now, from the snapshot published before, not after the write.
        if answered:
            return
        other.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
        done = threading.Event()
        reader = threading.Thread(target=lambda: (seen.append(_users(store)), done.set()))
        reader.start()
        answered.append(done.wait(STUCK))
        readers.append(reader)  # joined after the write: one stuck on the lock finishes then

    other = _store(data_dir)
    linked(other)
    store = _store(data_dir, on_write_lock=during_write)
    store.execute("add-user", PROJECT_A, {"email": "two@example.com", "password": PASSWORD})
    readers[0].join()
    assert answered == [True]
    assert seen == [set()]  # the published snapshot: neither the other process's write nor ours
    assert _users(store) == {"one@example.com", "two@example.com"}  # the writer adopted it first


def test_a_read_adopts_another_process_commit_when_no_writer_holds_the_lock(data_dir: DataDir) -> None:
    other = _store(data_dir)
    linked(other)
    store = _store(data_dir)
    other.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
    assert _users(store) == {"one@example.com"}
    assert store.head == other.head


def test_writers_are_served_in_the_order_they_queued(data_dir: DataDir) -> None:
    store = _store(data_dir)
    linked(store)
    emails = [f"u{i}@example.com" for i in range(5)]
    threads = []
    store.write_lock.acquire()  # hold the writers back until all of them queue
    try:
        for n, email in enumerate(emails, start=1):
            thread = threading.Thread(
                target=store.execute, args=("add-user", PROJECT_A, {"email": email, "password": PASSWORD})
            )
            thread.start()
            threads.append(thread)
            _until(lambda n=n: store.write_lock.waiting == n)  # type: ignore[misc]
        assert _users(store) == set()  # a read while five writers queue answers at once
    finally:
        store.write_lock.release()
    for thread in threads:
        thread.join()
    assert store.write_lock.waiting == 0
    repo = pygit2.Repository(str(data_dir.repo))
    walker = repo.walk(repo.references["refs/heads/main"].target, pygit2.enums.SortMode.TOPOLOGICAL)
    subjects = [c.message.splitlines()[0] for c in walker][: len(emails)]
    assert subjects[::-1] == [f"add-user {email}" for email in emails]


def test_fifo_lock_hands_over_in_arrival_order_and_try_acquire_never_jumps_the_queue() -> None:
    lock = FifoLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(6):
        thread = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        thread.start()
        threads.append(thread)
        _until(lambda i=i: lock.waiting == i + 1)  # type: ignore[misc]
    assert not lock.try_acquire()  # held, and six queue
    lock.release()
    for thread in threads:
        thread.join()
    assert order == list(range(6))
    assert lock.waiting == 0 and not lock.held
    assert lock.try_acquire() and lock.held
    lock.release()


def test_a_store_caps_libgit2s_object_cache(data_dir: DataDir) -> None:
    # libgit2's default cap is 256 MB, and every write adds to the cache: a server's RSS grew
    # with its writes until then (bench/bench_soak.py).
    pygit2.settings.cache_max_size(256 * 1024 * 1024)
    _store(data_dir)
    assert pygit2.settings.cached_memory[1] == gitrepo.OBJECT_CACHE_BYTES


def test_a_store_caps_libgit2s_pack_mappings(data_dir: DataDir) -> None:
    # libgit2's 64-bit defaults map packs in 1 GB windows and keep up to 8 GB mapped: a server's
    # RSS carried every pack page it had read (bench/bench_soak.py, RssFile).
    pygit2.settings.mwindow_size = 1024 * 1024 * 1024
    pygit2.settings.mwindow_mapped_limit = 8 * 1024 * 1024 * 1024
    _store(data_dir)
    assert pygit2.settings.mwindow_size == gitrepo.PACK_WINDOW_BYTES
    assert pygit2.settings.mwindow_mapped_limit == gitrepo.PACK_MAPPED_LIMIT_BYTES


def _queue_writes(
    store: Store, writes: list[tuple[str, dict[str, str]]], answered: Callable[[str], None] | None = None
) -> list[object]:
    """Run `writes` from as many threads, queued behind the held writers' lock in this order,
    then let them go; each thread's result (its outcome's result, or the error it raised).
    `answered(commit)` runs in the writer's thread the moment its write is answered."""
    results: list[object] = [None] * len(writes)

    def run(i: int, name: str, data: dict[str, str]) -> None:
        try:
            results[i] = store.execute(name, PROJECT_A, data).result
        except Exception as exc:
            results[i] = exc
            return
        if answered is not None:
            answered(results[i]["commit"])  # type: ignore[index]

    threads = []
    store.write_lock.acquire()
    try:
        for n, (name, data) in enumerate(writes, start=1):
            thread = threading.Thread(target=run, args=(n - 1, name, data))
            thread.start()
            threads.append(thread)
            _until(lambda n=n: store.write_lock.waiting == n)  # type: ignore[misc]
    finally:
        store.write_lock.release()
    for thread in threads:
        thread.join()
    return results


def test_queued_writes_land_as_one_group_of_signed_commits_answered_once_on_disk(data_dir: DataDir) -> None:
    store = _store(data_dir)
    linked(store)
    answered_on_disk: list[bool] = []
    repo = pygit2.Repository(str(data_dir.repo))

    def on_disk(commit: str) -> bool:
        # A fresh look at main on disk: the answered commit is there (or under a later one).
        tip = str(pygit2.Repository(str(data_dir.repo)).references["refs/heads/main"].target)
        return tip == commit or bool(repo.descendant_of(tip, commit))

    emails = [f"g{i}@example.com" for i in range(5)]
    groups = store.landed_groups
    results = _queue_writes(
        store,
        [("add-user", {"email": e, "password": PASSWORD}) for e in emails],
        answered=lambda commit: answered_on_disk.append(on_disk(commit)),
    )
    assert store.landed_groups == groups + 1  # five writes, one branch move
    assert answered_on_disk == [True] * 5
    commits = [r["commit"] for r in results]  # type: ignore[index]
    tip = repo.references["refs/heads/main"].target
    walked = [c for c in repo.walk(tip, pygit2.enums.SortMode.TOPOLOGICAL)][:5][::-1]
    assert [str(c.id) for c in walked] == commits  # one commit per write, in queue order
    for commit, email in zip(walked, emails, strict=True):
        assert commit.message.splitlines()[0] == f"add-user {email}"
        assert commit.gpg_signature[0] is not None  # each commit signed on its own
    assert _users(store) == set(emails)


def test_a_write_that_fails_in_a_group_gets_its_own_error_and_the_others_land(data_dir: DataDir) -> None:
    store = _store(data_dir)
    linked(store)
    groups = store.landed_groups
    add = {"email": "twice@example.com", "password": PASSWORD}
    results = _queue_writes(
        store,
        [("add-user", add), ("add-user", add), ("add-user", {"email": "other@example.com", "password": PASSWORD})],
    )
    assert store.landed_groups == groups + 1
    first, second, third = results
    # The second runs on the state the first left, in the same group: the user exists by then.
    assert isinstance(second, Conflict), second
    assert isinstance(first, dict) and isinstance(third, dict)
    repo = pygit2.Repository(str(data_dir.repo))
    last = repo[third["commit"]]
    assert [str(p) for p in last.parent_ids] == [first["commit"]]  # the failed write left no commit
    assert str(repo.references["refs/heads/main"].target) == third["commit"]
    assert _users(store) == {"twice@example.com", "other@example.com"}
