"""A first-come-first-served lock for the store's writers.

`threading.Lock` wakes an arbitrary waiter on release, so under steady write load one writer can
be passed over again and again (and a latecomer can barge in ahead of a queue). FifoLock hands the
lock to the oldest waiter on release: each waiter gets its own Event, queued in arrival order, and
the releasing thread passes ownership to the head of the queue without ever letting it go free.

`waiting` is the queue length (mailstate_writers_waiting in /metrics); `try_acquire` takes the
lock only when it is free and nobody queues, so it never jumps the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FifoLock:
    """A non-reentrant lock granted in arrival order."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards _held and _queue, held only for a few instructions
        self._queue: deque[threading.Event] = deque()
        self._held = False

    def acquire(self) -> None:
        """Wait for our turn: after every thread that asked before us has released."""
        with self._mutex:
            if not self._held and not self._queue:
                self._held = True
                return
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # release() hands the lock over: _held stays True for us

    def try_acquire(self) -> bool:
        """Take the lock if it is free and nobody waits for it; never blocks."""
        with self._mutex:
            if self._held or self._queue:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FifoLock")
            if self._queue:
                self._queue.popleft().set()
            else:
                self._held = False

    @property
    def waiting(self) -> int:
        """How many threads queue for the lock right now (not counting its holder)."""
        return len(self._queue)

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> FifoLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
