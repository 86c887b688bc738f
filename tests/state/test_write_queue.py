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
