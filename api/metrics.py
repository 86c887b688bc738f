"""`/metrics`: the server's figures in the Prometheus text format (prometheus_client).

    mailstate_writes_total{operation,result}          writes by operation: committed, no_change
                                                      (commit null), rejected (4xx), failed (5xx)
    mailstate_write_duration_seconds{operation}       their latency (HTTP and MCP alike)
    mailstate_refused_commit                          1 while a commit at the tip is refused
    mailstate_refused_commits                         refused commits kept for the admins
    mailstate_node_last_sync_age_seconds{node}        seconds since each node's last report
    mailstate_node_commits_behind{node}               commits between its applied commit and HEAD
    mailstate_node_status{node,status}                1 for the node's last reported status
    mailstate_node_lag_seconds{node}                  list-nodes' lag_s: seconds behind the oldest
                                                      accepted commit it lacks (absent when unknown)
    mailstate_node_stale{node}                        1 when list-nodes says stale (its statement is
                                                      too old, or it has been silent too long)
    mailstate_replication_lag_seconds{node,peer}      list-nodes' replication lag_s: seconds the oldest
                                                      change on the home `node` not yet on its replica
                                                      `peer` had waited at the node's last report
    mailstate_replication_ok{node,peer}               1 when the home's last sync with the replica went
                                                      well, 0 when it failed
    mailstate_node_spam_filter_up{node}               1 while the node's rspamd answers (0: port 25 tempfails)
    mailstate_node_spam_messages{node,result}         scanned, rejected, junked: rspamd's counters since it
                                                      started, as the node last reported them
    mailstate_node_postscreen_rejected{node,test}     dnsbl, pregreet: clients port 25's postscreen refused,
                                                      as the node last counted them from its log
    mailstate_nodes_waiting                           follow-mode nodes in a long poll right now
    mailstate_writers_waiting                         writes queued for the writers' lock right now (first
                                                      come first served; reads never wait for it)
    mailstate_webhook_deliveries_total{result}        webhook tries since start: delivered, failed (a
                                                      try that will be retried or was the last), given_up
    mailstate_webhook_backlog                         deliveries waiting in the outbox (first try or retry)
    mailstate_mailboxes_sending{state}                limited: mailboxes the nodes last reported refusing
                                                      for a limit (reports of the last day); suspended:
                                                      mailboxes the state suspends (state/events.py keeps count)

The node figures come from the node status database and the state repo at scrape time, so
they are true even for reports another process recorded. Each app has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailstate.api.http_errors import status_for
from mailstate.state.delivery import Counters
from mailstate.state.errors import MailstateError
from mailstate.state.ops import node_freshness, replication_of
from mailstate.state.store import Store
from mailstate.state.upstream import REJECTED_PREFIX

# Write latency: bcrypt at cost 12 alone is ~0.25 s, an fsynced commit a few ms.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Replication:
    """mailstate_replication_lag_seconds and mailstate_replication_ok, from the homes' last reports."""

    def __init__(self) -> None:
        self.lag = GaugeMetricFamily(
            "mailstate_replication_lag_seconds",
            "Seconds the oldest change on the home not yet on its replica had waited, as the home last reported "
            "(list-nodes' replication lag_s).",
            labels=["node", "peer"],
        )
        self.ok = GaugeMetricFamily(
            "mailstate_replication_ok",
            "1 when the home's last sync with the replica succeeded, 0 when it failed.",
            labels=["node", "peer"],
        )

    def add(self, name: str, report: dict[str, Any]) -> None:
        for row in replication_of(report):
            if isinstance(row["lag_s"], int | float):
                self.lag.add_metric([name, str(row["peer"])], float(row["lag_s"]))
            self.ok.add_metric([name, str(row["peer"])], 0.0 if row["error"] else 1.0)

    def families(self) -> Iterator[Metric]:
        yield self.lag
        yield self.ok


class Metrics:
    """The app's registry and the write instruments the edges update."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = _StateCollector(store)
        self.writes = Counter(
            "mailstate_writes",
            "Write operations (HTTP and MCP), by operation and result: committed, no_change (commit null), rejected (4xx), failed (5xx).",
            ["operation", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mailstate_write_duration_seconds",
            "Time to run one write operation (validation, bcrypt, signed commit), by operation.",
            ["operation"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self.collector)

    def count_waiting(self, waiting: Callable[[], int]) -> None:
        """Where mailstate_nodes_waiting reads the open long polls (api.nodes_http.WaitHub)."""
        self.collector.waiting = waiting

    def count_controls(
        self,
        counters: Counters,
        backlog: Callable[[], int],
        sending: Callable[[datetime], dict[str, int]],
        suspended: Callable[[], int],
    ) -> None:
        """Where the webhook and sending figures come from (state/delivery.py, state/webhooks.py, state/localdb.py)."""
        self.collector.controls = Controls(counters, backlog, sending, suspended)

    def observe(
        self, operation: str, started: float, result: dict[str, Any] | None = None, error: BaseException | None = None
    ) -> None:
        """Count one write that began at `started` (time.perf_counter()) and ended in `result` or `error`."""
        self.latency.labels(operation).observe(time.perf_counter() - started)
        if error is not None:
            failed = not isinstance(error, MailstateError) or status_for(error) >= 500
            self.writes.labels(operation, "failed" if failed else "rejected").inc()
        else:
            self.writes.labels(operation, "committed" if result and result.get("commit") else "no_change").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Controls:
    counters: Counters
    backlog: Callable[[], int]
    sending: Callable[[datetime], dict[str, int]]
    suspended: Callable[[], int]


class _StateCollector(Collector):
    """Figures read at scrape time: refused commits and the nodes' last reports."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.waiting: Callable[[], int] = lambda: 0
        self.controls: Controls | None = None

    def describe(self) -> list[Metric]:
        return []  # collected fresh on every scrape

    def collect(self) -> Iterator[Metric]:
        store = self.store
        yield from _refused_commits(store)

        age = GaugeMetricFamily(
            "mailstate_node_last_sync_age_seconds",
            "Seconds since the node last reported (absent for a node that never reported).",
            labels=["node"],
        )
        behind = GaugeMetricFamily(
            "mailstate_node_commits_behind",
            "Commits between the node's applied commit and the server's head (absent when unknown).",
            labels=["node"],
        )
        status = GaugeMetricFamily(
            "mailstate_node_status",
            "1 for the status of the node's last report (ok, error, refused, ...; never_synced before one).",
            labels=["node", "status"],
        )
        lag = GaugeMetricFamily(
            "mailstate_node_lag_seconds",
            "Seconds the node is behind: since the oldest accepted commit it lacks was stated (0 when current; absent when unknown), as list-nodes' lag_s.",
            labels=["node"],
        )
        stale = GaugeMetricFamily(
            "mailstate_node_stale",
            "1 when list-nodes shows the node stale (its newest statement too old, or silent too long), else 0.",
            labels=["node"],
        )
        replication = _Replication()
        inbound = _Inbound()
        now = datetime.now(UTC)
        for name in sorted(store.snapshot.nodes.nodes):
            report = store.node_status(name) or {}
            status.add_metric([name, str(report.get("status") or "never_synced")], 1.0)
            last = _parse_time(report.get("last_sync_at"))
            if last is not None:
                age.add_metric([name], max(0.0, (now - last).total_seconds()))
            if isinstance(report.get("commits_behind"), int):
                behind.add_metric([name], float(report["commits_behind"]))
            fresh = node_freshness(report, int(now.timestamp()))  # the same rule list-nodes uses
            if isinstance(fresh["lag_s"], int):
                lag.add_metric([name], float(fresh["lag_s"]))
            stale.add_metric([name], 1.0 if fresh["stale"] else 0.0)
            replication.add(name, report)
            inbound.add(name, report)
        yield from replication.families()
        yield age
        yield behind
        yield status
        yield lag
        yield stale
        yield from inbound.families()
        waiting = GaugeMetricFamily(
            "mailstate_nodes_waiting", "Follow-mode nodes holding a long poll (GET /v1/nodes/wait) right now."
        )
        waiting.add_metric([], float(self.waiting()))
        yield waiting
        writers = GaugeMetricFamily(
            "mailstate_writers_waiting",
            "Writes queued for the writers' lock right now, served first come first served (reads never wait for it).",
        )
        writers.add_metric([], float(store.write_lock.waiting))
        yield writers
        if self.controls is not None:
            yield from self._controls(self.controls, now)

    @staticmethod
    def _controls(c: Controls, now: datetime) -> Iterator[Metric]:
        tries = CounterMetricFamily(
            "mailstate_webhook_deliveries",
            "Webhook delivery tries since the server started, by result: delivered (2xx), failed (will be retried, or "
            "was the last try), given_up (24 hours of retries passed).",
            labels=["result"],
        )
        for result in ("delivered", "failed", "given_up"):
            tries.add_metric([result], float(getattr(c.counters, result)))
        yield tries
        waiting = GaugeMetricFamily(
            "mailstate_webhook_backlog", "Webhook deliveries waiting in the outbox (a first try or a retry)."
        )
        waiting.add_metric([], float(c.backlog()))
        yield waiting
        boxes = GaugeMetricFamily(
            "mailstate_mailboxes_sending",
            "Mailboxes that may not send: limited (a node refuses their submissions for a limit, in reports of the "
            "last day) and suspended (suspend-sending, or a node past auto_suspend_factor).",
            labels=["state"],
        )
        boxes.add_metric(["limited"], float(c.sending(now - timedelta(days=1)).get("limited", 0)))
        boxes.add_metric(["suspended"], float(c.suspended()))
        yield boxes


class _Inbound:
    """Port 25's protection per node, as it last reported: rspamd (spam_filter) and postscreen."""

    def __init__(self) -> None:
        self.spam_up = GaugeMetricFamily(
            "mailstate_node_spam_filter_up",
            "1 while the node's inbound filter (rspamd) answers, 0 while port 25 tempfails for want of it (absent for "
            "a node that does not filter).",
            labels=["node"],
        )
        self.spam = GaugeMetricFamily(
            "mailstate_node_spam_messages",
            "Messages the node's rspamd scanned, rejected and junked since it started, as the node last reported.",
            labels=["node", "result"],
        )
        self.screened = GaugeMetricFamily(
            "mailstate_node_postscreen_rejected",
            "Clients port 25's postscreen refused, by test: dnsbl (the DNS blocklists, 521 at connect) and pregreet "
            "(talked before their turn), as the node last counted them from its log.",
            labels=["node", "test"],
        )

    def add(self, name: str, report: dict[str, Any]) -> None:
        _spam_filter(name, report.get("spam_filter"), self.spam_up, self.spam)
        _postscreen(name, report.get("postscreen"), self.screened)

    def families(self) -> Iterator[Metric]:
        yield self.spam_up
        yield self.spam
        yield self.screened


def _spam_filter(name: str, entry: object, up: GaugeMetricFamily, counts: GaugeMetricFamily) -> None:
    if not isinstance(entry, dict):
        return
    up.add_metric([name], 1.0 if entry.get("running") else 0.0)
    for result in ("scanned", "rejected", "junked"):
        if isinstance(entry.get(result), int):
            counts.add_metric([name, result], float(entry[result]))


def _postscreen(name: str, entry: object, counts: GaugeMetricFamily) -> None:
    if not isinstance(entry, dict):
        return
    for test in ("dnsbl", "pregreet"):
        if isinstance(entry.get(f"{test}_rejected"), int):
            counts.add_metric([name, test], float(entry[f"{test}_rejected"]))


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _refused_commits(store: Store) -> Iterator[Metric]:
    """Whether the server refuses a commit at its tip now, and how many refused commits it keeps."""
    pending = GaugeMetricFamily(
        "mailstate_refused_commit",
        "1 while the server refuses a commit at the tip of its branch or upstream (see /v1/health with an admin token).",
    )
    pending.add_metric([], 1.0 if getattr(store, "upstream_problem", None) else 0.0)
    yield pending
    kept = GaugeMetricFamily(
        "mailstate_refused_commits",
        "Refused commits the server replaced and keeps under refs/mailstate/rejected/ for the admins.",
    )
    kept.add_metric([], float(sum(1 for name in store.git.repo.references if name.startswith(REJECTED_PREFIX))))
    yield kept
