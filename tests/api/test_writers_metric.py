"""mailstate_writers_waiting: the writes queued for the writers' lock, read at scrape time.

In process (the app's Metrics on a real store); tests/api/test_metrics.py scrapes a live server."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from mailstate.api.metrics import Metrics
from mailstate.state.store import Store
from tests.helpers.common import PASSWORD, PROJECT_A
from tests.helpers.store import linked


def _waiting(metrics: Metrics) -> float | None:
    body, _ctype = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "mailstate_writers_waiting":
                return sample.value
    return None


def test_the_writers_queue_length_is_in_the_metrics(store: Store) -> None:
    linked(store)
    metrics = Metrics(store)
    assert _waiting(metrics) == 0
    store.write_lock.acquire()
    try:
        writer = threading.Thread(
            target=store.execute, args=("add-user", PROJECT_A, {"email": "q@example.com", "password": PASSWORD})
        )
        writer.start()
        deadline = time.monotonic() + 60
        while store.write_lock.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _waiting(metrics) == 1
    finally:
        store.write_lock.release()
    writer.join()
    assert _waiting(metrics) == 0
