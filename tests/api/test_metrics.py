"""`/metrics` on a real `mailstate serve`, parsed with prometheus_client's own parser: writes
by operation and result (HTTP and MCP), their latency histogram, refused commits, node lag and
status from real node reports, and the waiting-nodes gauge."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.mcp import http_session
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("metrics")) as server:
        yield server


def scrape(srv: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {srv.admin_token}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_need_an_admin_token(srv: LiveServer) -> None:
    assert_error(httpx.get(f"{srv.url}/metrics"), 401, "unauthenticated")
    project = srv.create_token(project=5, name="metrics-project")
    assert_error(httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {project}"}), 403, "admin_required")


def test_writes_latency_refusals_and_nodes(srv: LiveServer, tmp_path: Path) -> None:
    with srv.client(srv.admin_token) as admin:
        before = scrape(srv)
        assert value(before, "mailstate_nodes_waiting") == 0
        assert value(before, "mailstate_writers_waiting") == 0
        assert value(before, "mailstate_refused_commit") == 0
        assert admin.post(f"{API}/link-domain", json={"domain": "m.example", "project_id": 5}).status_code == 201
        assert (
            admin.post(f"{API}/link-domain", json={"domain": "m.example", "project_id": 5}).status_code == 200
        )  # no change
        assert admin.post(f"{API}/enable-email", json={"domain": "m.example"}).status_code == 200
        for local in ("a", "b"):
            assert (
                admin.post(f"{API}/add-user", json={"email": f"{local}@m.example", "password": PASSWORD}).status_code
                == 201
            )
        assert admin.post(f"{API}/add-user", json={"email": "a@m.example", "password": PASSWORD}).status_code == 409
        assert admin.get(f"{API}/list-users").status_code == 200  # a read is not a write
        node = admin.post(f"{API}/add-node", json={"name": "mx1"}).json()
        assert admin.post(f"{API}/add-node", json={"name": "mx2"}).status_code == 201
        # mx1 reports that it serves the commit before the newest: 1 behind
        behind_commit = srv.git("rev-parse", "main^").strip()
        r = httpx.post(
            f"{srv.url}/v1/nodes/report",
            json={"applied_commit": behind_commit, "status": "ok"},
            auth=("mx1", node["sync_key"]),
        )
        assert r.status_code == 200, r.text

    async def mcp_write() -> None:
        async with http_session(srv, srv.admin_token) as s:
            assert (await s.call_tool("email_account_add_domain", {"domain": "via-mcp.example"})).is_error is False

    anyio.run(mcp_write)

    after = scrape(srv)
    assert value(after, "mailstate_writes_total", operation="add-user", result="committed") == 2
    assert value(after, "mailstate_writes_total", operation="add-user", result="rejected") == 1
    assert value(after, "mailstate_writes_total", operation="link-domain", result="committed") == 1
    assert value(after, "mailstate_writes_total", operation="link-domain", result="no_change") == 1
    assert value(after, "mailstate_writes_total", operation="add-domain", result="committed") == 1  # over MCP
    assert not any(k[0] == "mailstate_writes_total" and ("operation", "list-users") in k[1] for k in after)
    assert value(after, "mailstate_write_duration_seconds_count", operation="add-user") == 3
    assert (value(after, "mailstate_write_duration_seconds_sum", operation="add-user") or 0) > 0
    assert value(after, "mailstate_write_duration_seconds_bucket", operation="add-user", le="+Inf") == 3

    assert value(after, "mailstate_node_status", node="mx1", status="ok") == 1
    assert value(after, "mailstate_node_status", node="mx2", status="never_synced") == 1
    behind = value(after, "mailstate_node_commits_behind", node="mx1")
    assert behind is not None and behind >= 2  # add-node mx2 and add-domain came after
    age = value(after, "mailstate_node_last_sync_age_seconds", node="mx1")
    assert age is not None and 0 <= age < 120
    assert value(after, "mailstate_node_last_sync_age_seconds", node="mx2") is None
    # list-nodes' lag_s and stale, by the same rule: mx1 reported, is behind and not stale;
    # mx2 never reported (no lag known).
    lag = value(after, "mailstate_node_lag_seconds", node="mx1")
    assert lag is not None and 0 <= lag < 120
    assert value(after, "mailstate_node_lag_seconds", node="mx2") is None
    assert (
        value(after, "mailstate_node_stale", node="mx1") == 0 and value(after, "mailstate_node_stale", node="mx2") == 0
    )

    # A follow-mode node in a long poll is counted while it waits, and not once it answered.
    with srv.client(srv.admin_token) as admin:
        head = admin.get("/v1/health").json()["statement"]["head"]
    answered: list[int] = []

    def wait() -> None:
        r = httpx.get(
            f"{srv.url}/v1/nodes/wait", params={"head": head, "timeout": 20}, auth=("mx1", node["sync_key"]), timeout=30
        )
        answered.append(r.status_code)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while value(scrape(srv), "mailstate_nodes_waiting") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(scrape(srv), "mailstate_nodes_waiting") == 1
    with srv.client(srv.admin_token) as admin:
        assert (
            admin.post(f"{API}/add-domain", json={"domain": "wake.example"}).status_code == 201
        )  # moves the statement
    waiter.join(timeout=15)
    assert answered == [200]
    assert value(scrape(srv), "mailstate_nodes_waiting") == 0

    # A hand-pushed unsigned commit is refused: the gauge shows it; the next write replaces it
    # and the refused commit is kept (and counted).
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(srv.data.repo), str(work)], check=True, env=srv.env, capture_output=True)
    (work / "sneaky.txt").write_text("x\n")
    for args in (
        ("add", "-A"),
        ("-c", "user.name=x", "-c", "user.email=x@example.org", "commit", "-qm", "unsigned"),
        ("push", "-q", "origin", "main"),
    ):
        subprocess.run(["git", "-C", str(work), *args], check=True, env=srv.env, capture_output=True)
    with srv.client(srv.admin_token) as admin:
        deadline = time.monotonic() + 15
        while value(scrape(srv), "mailstate_refused_commit") != 1 and time.monotonic() < deadline:
            admin.get(f"{API}/list-domains")  # a request notices it too, if the watcher has not yet
            time.sleep(0.2)
        assert value(scrape(srv), "mailstate_refused_commit") == 1
        assert admin.post(f"{API}/add-domain", json={"domain": "after.example"}).status_code == 201
    final = scrape(srv)
    assert value(final, "mailstate_refused_commit") == 0
    assert value(final, "mailstate_refused_commits") == 1
