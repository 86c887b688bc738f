"""The e2e rule, enforced: a test that starts a process or a server is marked ``e2e``.

``python -m pytest -m "not e2e"`` is the quick loop; it stays quick only while nothing in it
starts ``mailstate serve``, Postfix, git, ssh-keygen or any other program, or listens on a
port. An audit hook (``sys.addaudithook``, PEP 578) sees every process Python starts
(subprocess, os.system, os.posix_spawn, os.exec*, os.fork) and every bind of an internet
socket. While a test without the marker runs, its fixtures included, each one is recorded and
the test fails naming them. A test that uses a fixture which started one (a module-scoped
server that an earlier test brought up, say) fails the same way. Threads that were already
running when a test began (an earlier test's background work) are not held against it, and
processes a C library starts behind Python's back are not seen.

Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork", "os.forkpty"}
)
INET = (socket.AF_INET, socket.AF_INET6)
MARKER = "e2e"


class SpawnWatch:
    """Every process start and server socket seen (``seen``) outside the ``background``
    threads; what the running non-e2e test started (``started``; ``armed`` is its node id)."""

    def __init__(self) -> None:
        self.armed: str | None = None
        self.started: list[str] = []
        self.seen = 0
        self.background: frozenset[threading.Thread] = frozenset()

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        # Called for every audit event of the process: return fast for the others.
        if event in SPAWN_EVENTS or (event == "socket.bind" and getattr(args[0], "family", None) in INET):
            if threading.current_thread() in self.background:
                return
            self.seen += 1
            if self.armed is not None:
                self.started.append(describe(event, args))

    def begin(self, nodeid: str | None) -> None:
        """A test starts: watch for it if `nodeid` (unmarked), ignoring the threads running now."""
        # Thread objects, not idents: a new thread may get the ident of one that has ended.
        me = threading.current_thread()
        self.background = frozenset(t for t in threading.enumerate() if t is not me)
        self.armed = nodeid
        self.started = []

    def check(self, phase: str) -> None:
        if self.started:
            started, self.started = self.started, []
            self.fail(f"started {len(started)} process(es) or server(s) in {phase}", started)

    def fail(self, what: str, details: list[str]) -> None:
        shown = "\n  ".join(dict.fromkeys(details))
        pytest.fail(
            f"{self.armed} {what} but is not marked {MARKER}:\n  {shown}\n"
            f"Mark it (@pytest.mark.{MARKER}, or pytestmark = pytest.mark.{MARKER} for the module) or keep "
            f'processes and servers out of it: `pytest -m "not {MARKER}"` is the quick loop.',
            pytrace=False,
        )


def describe(event: str, args: tuple[Any, ...]) -> str:
    """The program and its first arguments (or the address bound), short."""
    if event == "subprocess.Popen":  # (executable, args, cwd, env)
        argv = args[1]
        words = [argv] if isinstance(argv, str | bytes) else list(argv)
        return f"{event}: {' '.join(str(w) for w in words[:6])[:160]}"
    if event == "socket.bind":
        return f"{event}: {args[1]!r}"
    if event in ("os.system", "os.exec", "os.posix_spawn", "os.spawn"):
        return f"{event}: {str(args[:2])[:160]}"
    return event


WATCH = SpawnWatch()
sys.addaudithook(WATCH)
# The fixture definitions whose setup started a process or a server (by id of the FixtureDef).
SPAWNING_FIXTURES: dict[int, str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    before = WATCH.seen
    result = yield
    if WATCH.seen != before:
        SPAWNING_FIXTURES[id(fixturedef)] = fixturedef.argname
    return result


def spawning_fixtures_of(item: pytest.Item) -> list[str]:
    """The fixtures `item` uses that started a process or a server, for it or an earlier test."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs if info is not None else {}
    return sorted({SPAWNING_FIXTURES[id(d)] for chain in defs.values() for d in chain if id(d) in SPAWNING_FIXTURES})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    WATCH.begin(None if item.get_closest_marker(MARKER) else item.nodeid)
    result = yield
    WATCH.check("setup")
    if WATCH.armed is not None and (names := spawning_fixtures_of(item)):
        WATCH.fail("uses fixtures that started processes or servers", names)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    WATCH.check("the test")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    try:
        result = yield
        WATCH.check("teardown")
        return result
    finally:
        WATCH.armed = None
        WATCH.started = []
