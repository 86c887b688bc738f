"""The follow-mode long poll `GET /v1/nodes/wait` against a real server (uvicorn over TCP):
the node's HTTP Basic sync key and ip whitelist like the report, bad input answered with 400
and nothing held, an answer at timeout, and waiters woken by a write made through the API and
by a commit pushed into state.git by hand (the background watch adopts it). Also the store's
statement listener on its own."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mailstate.api.nodes_http import MAX_WAITERS_PER_NODE, WAIT_MAX_S
from mailstate.state.store import Store
from tests.helpers.common import ADMIN
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
WAIT = "/v1/nodes/wait"


@dataclass
class Srv:
    srv: LiveServer
    admin: httpx.Client
    key: str  # fw01, no ip_address
    locked_key: str  # fwlocked, ip_address 10.9.9.9

    def head(self) -> str:
        return self.admin.get("/v1/health").json()["statement"]["head"]

    def wait(
        self, head: str, timeout: float | str = 5, *, name: str = "fw01", key: str | None = None, **params: str
    ) -> httpx.Response:
        auth = basic(name, key if key is not None else self.key)
        return httpx.get(
            f"{self.srv.url}{WAIT}", params={"head": head, "timeout": str(timeout), **params}, headers=auth, timeout=30
        )


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    with live_server(tmp_path_factory.mktemp("wait")) as srv, srv.client(srv.admin_token) as admin:
        key = admin.post(f"{API}/add-node", json={"name": "fw01"}).json()["sync_key"]
        locked = admin.post(f"{API}/add-node", json={"name": "fwlocked", "ip_address": "10.9.9.9"}).json()["sync_key"]
        yield Srv(srv, admin, key, locked)


def test_a_head_that_differs_answers_at_once(s: Srv) -> None:
    head = s.head()
    assert len(head) == 40
    t0 = time.monotonic()
    r = s.wait("0" * 40, timeout=WAIT_MAX_S)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is True and r.json()["head"] == head and isinstance(r.json()["issued_at"], int)
    assert r.headers["cache-control"] == "no-store"
    # No head (a node that knows none yet): the current one at once.
    r = httpx.get(f"{s.srv.url}{WAIT}", headers=basic("fw01", s.key), timeout=30)
    assert r.status_code == 200 and r.json()["head"] == head and r.json()["changed"] is True
    assert time.monotonic() - t0 < WAIT_MAX_S  # neither waited


def test_the_same_head_answers_unchanged_at_timeout(s: Srv) -> None:
    head = s.head()
    t0 = time.monotonic()
    r = s.wait(head, timeout=0.5)
    assert r.status_code == 200 and r.json() == {"changed": False, "head": head, "issued_at": r.json()["issued_at"]}
    assert time.monotonic() - t0 >= 0.4
    assert s.wait(head.upper(), timeout=0).json()["changed"] is False  # a sha is a sha, whatever its case


def test_a_write_wakes_the_waiters(s: Srv) -> None:
    head = s.head()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waits = [pool.submit(s.wait, head, 50) for _ in range(3)]
        time.sleep(0.5)  # they are waiting
        assert not any(w.done() for w in waits)
        t0 = time.monotonic()
        added = s.admin.post(f"{API}/add-domain", json={"domain": "wake.example"})
        assert added.status_code == 201, added.text
        answers = [w.result(timeout=20) for w in waits]
        woke = time.monotonic() - t0
    assert {(a.status_code, a.json()["changed"], a.json()["head"]) for a in answers} == {
        (200, True, added.json()["commit"])
    }
    assert woke < 20  # woken by the write, not by the 50 s timeout


def test_a_commit_pushed_into_state_git_wakes_after_adoption(s: Srv, tmp_path: Path) -> None:
    """Another writer (here `mailstate call`, a separate process on the same data dir) moves
    main; the server's background watch adopts it, moves the statement, and wakes the waiter."""
    head = s.head()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(s.wait, head, 50)
        time.sleep(0.3)
        s.srv.cli("call", "--data", str(s.srv.data.root), "add-domain", "domain=other-process.example")
        r = waiting.result(timeout=30)
    main = s.srv.git("rev-parse", "main").strip()
    assert r.status_code == 200 and r.json()["changed"] is True and r.json()["head"] == main != head


def test_auth_like_the_report(s: Srv) -> None:
    head = s.head()
    r = httpx.get(f"{s.srv.url}{WAIT}", params={"head": head, "timeout": "0"})
    assert_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"].startswith("Basic")
    assert_error(s.wait(head, 0, key="mss_wrong"), 401, "unauthenticated")
    assert_error(s.wait(head, 0, name="nosuch"), 401, "unauthenticated")
    r = httpx.get(f"{s.srv.url}{WAIT}", params={"head": head}, headers={"Authorization": "Basic !!notbase64"})
    assert_error(r, 401, "unauthenticated")
    # The whitelist: fwlocked may only come from 10.9.9.9.
    assert_error(s.wait(head, 0, name="fwlocked", key=s.locked_key), 403, "ip_not_allowed")
    # A key never shows up in an answer.
    assert s.key not in s.wait(head, 0, key=s.key + "x").text


@pytest.mark.parametrize(
    "params",
    [
        {"head": "abc"},
        {"head": "g" * 40},
        {"head": "0" * 41},
        {"timeout": "soon"},
        {"timeout": "-1"},
        {"timeout": "nan"},
        {"timeout": "inf"},
        {"timeout": str(WAIT_MAX_S + 1)},
        {"since": "x"},
    ],
)
def test_bad_input_is_a_clear_400(s: Srv, params: dict[str, str]) -> None:
    query = {"head": s.head(), "timeout": "0", **params}
    r = httpx.get(f"{s.srv.url}{WAIT}", params=query, headers=basic("fw01", s.key), timeout=10)
    err = assert_error(r, 400, "invalid_request")
    assert "traceback" not in err["message"].lower()


def test_a_repeated_parameter_is_refused(s: Srv) -> None:
    head = s.head()
    r = httpx.get(f"{s.srv.url}{WAIT}?head={head}&head={head}", headers=basic("fw01", s.key), timeout=10)
    assert "more than once" in assert_error(r, 400, "invalid_request")["message"]


def test_only_get(s: Srv) -> None:
    assert_error(httpx.post(f"{s.srv.url}{WAIT}", headers=basic("fw01", s.key)), 405)


def test_waiters_per_node_are_capped_and_freed_when_clients_leave(s: Srv) -> None:
    head = s.head()
    clients = [
        httpx.Client(base_url=s.srv.url, headers=basic("fw01", s.key), timeout=60) for _ in range(MAX_WAITERS_PER_NODE)
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(MAX_WAITERS_PER_NODE) as pool:
            held = [pool.submit(c.get, WAIT, params={"head": head, "timeout": "3"}) for c in clients]
            deadline = time.monotonic() + 2.5
            over = None
            while time.monotonic() < deadline:
                over = s.wait(head, 0.2)
                if over.status_code == 429:
                    break
                time.sleep(0.05)
            assert over is not None
            err = assert_error(over, 429, "too_many_waiters")
            assert "fw01" in err["message"] and over.headers["retry-after"]
            assert all(h.result(timeout=20).json()["changed"] is False for h in held)
    finally:
        for c in clients:
            c.close()
    # Clients that hang up free their places long before their timeout.
    for _ in range(MAX_WAITERS_PER_NODE):
        with (
            httpx.Client(base_url=s.srv.url, headers=basic("fw01", s.key), timeout=0.3) as c,
            pytest.raises(httpx.ReadTimeout),
        ):
            c.get(WAIT, params={"head": head, "timeout": "50"})
    deadline = time.monotonic() + 10
    while s.wait(head, 0.1).status_code == 429:
        assert time.monotonic() < deadline, "waiters of closed connections were never freed"
        time.sleep(0.1)


def test_the_route_is_documented(s: Srv) -> None:
    spec = httpx.get(f"{s.srv.url}/openapi.json").json()
    op = spec["paths"][WAIT]["get"]
    assert op["operationId"] == "node_wait" and op["security"] == [{"NodeBasic": []}]
    assert {p["name"] for p in op["parameters"]} == {"head", "timeout"}
    assert set(op["responses"]) == {"200", "400", "401", "403", "405", "429", "503"}
    assert spec["components"]["schemas"]["NodeWaitResponse"]["required"] == ["changed", "head", "issued_at"]


# --- the store's seam ---------------------------------------------------------------------------


def test_store_statement_listener_fires_once_per_new_head(store: Store) -> None:
    heads: list[str] = []
    store.add_statement_listener(heads.append)
    out = store.execute("link-domain", ADMIN, {"domain": "listen.example", "project_id": 7})
    assert heads == [out.result["commit"]]
    store.refresh_statement()  # the same head re-issued: nothing to wake
    again = store.execute("link-domain", ADMIN, {"domain": "listen.example", "project_id": 7})  # a no-op write
    assert again.result["commit"] is None and heads == [out.result["commit"]]
    store.remove_statement_listener(heads.append)
    store.execute("add-domain", ADMIN, {"domain": "listen2.example"})
    assert len(heads) == 1


def test_a_failing_listener_never_fails_a_write(store: Store) -> None:
    def boom(_head: str) -> None:
        raise RuntimeError("listener bug")

    store.add_statement_listener(boom)
    out = store.execute("add-domain", ADMIN, {"domain": "boom.example"})
    assert out.result["commit"] and store.statement and store.statement["head"] == out.result["commit"]


def test_a_shutdown_answers_the_open_waits(tmp_path: Path) -> None:
    """SIGTERM to a server holding long polls: each gets its answer (the head as it is, unchanged)
    before the connections drain, instead of being cut off when uvicorn's graceful shutdown
    timeout expires, and the server exits cleanly."""
    with live_server(tmp_path) as srv, srv.client(srv.admin_token) as admin:
        key = admin.post(f"{API}/add-node", json={"name": "fw01"}).json()["sync_key"]
        head = admin.get("/v1/health").json()["statement"]["head"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waits = [
                pool.submit(
                    httpx.get,
                    f"{srv.url}{WAIT}",
                    params={"head": head, "timeout": "50"},
                    headers=basic("fw01", key),
                    timeout=60,
                )
                for _ in range(2)
            ]
            time.sleep(0.5)
            assert not any(w.done() for w in waits)
            assert srv.proc is not None
            proc = srv.proc
            srv.stop()
            answers = [w.result(timeout=30) for w in waits]
        assert [(a.status_code, a.json()["changed"], a.json()["head"]) for a in answers] == [(200, False, head)] * 2
        assert proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled, once it is done
        assert "timeout graceful shutdown exceeded" not in srv.log_text()
