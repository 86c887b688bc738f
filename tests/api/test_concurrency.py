"""Concurrency against a real server: concurrent writes are serialised without losing any (one
commit each), and bcrypt runs off the event loop, so reads are answered while hashes run."""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers.server import LiveServer, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"


def setup_domains(srv: LiveServer, token: str, domains: list[str], project: int) -> None:
    with srv.client(srv.admin_token) as admin, srv.client(token) as c:
        for d in domains:
            assert admin.post(f"{API}/link-domain", json={"domain": d, "project_id": project}).status_code == 201
            assert c.post(f"{API}/enable-email", json={"domain": d}).status_code == 200


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("concurrency")) as server:
        yield server


def test_twenty_concurrent_writes_make_twenty_commits(srv: LiveServer) -> None:
    token = srv.create_token(project=7, name="burst")
    setup_domains(srv, token, ["burst.example", "side.example"], 7)
    before = srv.commit_count()
    start = threading.Barrier(20)

    def add(i: int) -> httpx.Response:
        domain = "burst.example" if i % 2 else "side.example"
        with srv.client(token) as c:
            start.wait()
            return c.post(
                f"{API}/add-user",
                json={"email": f"u{i}@{domain}", "password": PASSWORD},
                headers={"X-Request-Id": f"burst-{i}"},
            )

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(add, range(20)))
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    commits = {r.json()["commit"] for r in responses}
    assert len(commits) == 20
    assert srv.commit_count() == before + 20
    # A straight line: every commit the API reported is on main, none was overwritten.
    on_main = set(srv.git("rev-list", f"-{20}", "main").split())
    assert on_main == commits
    request_ids = srv.git("log", "-20", "--format=%(trailers:key=Request-Id,valueonly)").split()
    assert sorted(request_ids) == sorted(f"burst-{i}" for i in range(20))
    with srv.client(token) as c:
        users = {u["email"] for u in c.get(f"{API}/list-users").json()["users"]}
    assert users == {f"u{i}@{'burst' if i % 2 else 'side'}.example" for i in range(20)}
    for rev in on_main:
        assert srv.verify_commit(rev).returncode == 0


def test_concurrent_conflicting_writes_lose_nothing(srv: LiveServer) -> None:
    """Ten racing add-user calls for ONE address: exactly one wins (201), nine get 409."""
    token = srv.create_token(project=8, name="race")
    setup_domains(srv, token, ["race.example"], 8)
    before = srv.commit_count()
    start = threading.Barrier(10)

    def add(_: int) -> int:
        with srv.client(token) as c:
            start.wait()
            return c.post(f"{API}/add-user", json={"email": "same@race.example", "password": PASSWORD}).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = sorted(pool.map(add, range(10)))
    assert statuses == [201] + [409] * 9
    assert srv.commit_count() == before + 1


def test_reads_are_answered_while_bcrypt_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ten parallel add-user calls at bcrypt cost 12 (about a quarter second each): a read sent
    after them is answered before the first of them completes, so hashing neither blocks the
    event loop nor holds anything a read needs. All ten land, one commit each."""
    with live_server(tmp_path_factory.mktemp("bcrypt12"), bcrypt_cost=12) as srv:
        token = srv.create_token(project=9, name="hasher")
        setup_domains(srv, token, ["hash.example"], 9)
        before = srv.commit_count()
        done: list[tuple[str, float]] = []
        lock = threading.Lock()
        sent = threading.Barrier(11)

        def add(i: int) -> int:
            with srv.client(token) as c:
                sent.wait()
                r = c.post(f"{API}/add-user", json={"email": f"h{i}@hash.example", "password": PASSWORD})
            with lock:
                done.append(("write", time.monotonic()))
            return r.status_code

        def read() -> int:
            with srv.client(token) as c:
                sent.wait()
                time.sleep(0.02)  # let the writes reach the server first
                r = c.get(f"{API}/list-domains")
            with lock:
                done.append(("read", time.monotonic()))
            return r.status_code

        with ThreadPoolExecutor(11) as pool:
            writes = [pool.submit(add, i) for i in range(10)]
            reader = pool.submit(read)
            assert reader.result() == 200
            assert [w.result() for w in writes] == [201] * 10
        order = [kind for kind, _ in sorted(done, key=lambda d: d[1])]
        assert order[0] == "read", order
        assert srv.commit_count() == before + 10
        with srv.client(token) as c:
            assert len(c.get(f"{API}/list-users").json()["users"]) == 10


def test_a_listing_is_answered_while_queued_writes_hold_every_worker_thread(srv: LiveServer) -> None:
    """More writes than the server has worker threads (40), all stuck behind the branch's lock
    (this test holds the flock a write takes to move main): a listing is still answered at once,
    since listings run on the event loop (Operation.inline), not in a worker thread a queued
    write holds. Then the lock goes and every write lands."""
    token = srv.create_token(project=11, name="crowd")
    setup_domains(srv, token, ["crowd.example"], 11)
    before = srv.commit_count()
    writers = 48
    with open(srv.data.repo / "mailstate.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with ThreadPoolExecutor(writers) as pool:

            def add(i: int) -> int:
                with srv.client(token, timeout=120) as c:
                    return c.post(
                        f"{API}/add-user", json={"email": f"c{i}@crowd.example", "password": PASSWORD}
                    ).status_code

            writes = [pool.submit(add, i) for i in range(writers)]
            time.sleep(2)  # every write reaches the server and takes (or waits for) a thread
            try:
                with srv.client(token, timeout=5) as c:
                    listed = c.get(f"{API}/list-domains")
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)
            assert listed.status_code == 200, listed.text
            assert [d["domain"] for d in listed.json()["domains"]] == ["crowd.example"]
            assert not any(w.done() for w in writes)  # the lock held them all
            assert [w.result() for w in writes] == [201] * writers
    assert srv.commit_count() == before + writers
