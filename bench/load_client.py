"""One load client of bench_load: a separate process with one keep-alive connection.

    python -m bench.load_client --port P --token T --kind read|soft|add --targets FILE
                                --start WALLTIME --duration S --out FILE [--slot N --slots M]
                                [--requests N]

It waits until the wall-clock time `--start` (so every client of a phase starts together), then
sends its next request as soon as the last one is answered, until `--duration` seconds have
passed (or, with `--requests`, N requests were answered). It writes {"latencies": [s...], "errors": {status: count}, "cpu_s": ...} to `--out`.

Kinds:
- read: list-users for one domain, cycling through the targets (domains);
- soft: remove-user (soft) then restore-user, alternately, on this slot's share of the
  targets (emails), so every call is one commit;
- add: add-user of a new address on this slot's share of the targets (domains).
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from pathlib import Path
from typing import Any

API = "/v1/email-account"


class Client:
    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        headers = {**self.auth, "Content-Type": "application/json"} if body is not None else self.auth
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = self.conn.getresponse()
        resp.read()
        return resp.status


def requests(kind: str, targets: list[str], slot: int, slots: int) -> Any:
    """An endless iterator of (method, path, body) for this client."""
    mine = targets[slot::slots] or targets
    n = 0
    while True:
        target = mine[n % len(mine)]
        if kind == "read":
            yield "GET", f"{API}/list-users?domain={target}", None
        elif kind == "soft":
            yield "POST", f"{API}/remove-user", {"email": target}
            yield "POST", f"{API}/restore-user", {"email": target}
        else:
            yield "POST", f"{API}/add-user", {"email": f"load{slot}x{n}@{target}", "password": "load-test-password"}
        n += 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets: list[str] = json.loads(Path(args.targets).read_text())
    client = Client(args.port, args.token)
    stream = requests(args.kind, targets, args.slot, args.slots)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    delay = args.start - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0 = time.process_time()
    end = time.perf_counter() + args.duration
    limit = args.requests or float("inf")
    while time.perf_counter() < end and len(latencies) < limit:
        method, path, body = next(stream)
        t0 = time.perf_counter()
        status = client.call(method, path, body)
        latencies.append(time.perf_counter() - t0)
        if status >= 300:
            errors[str(status)] = errors.get(str(status), 0) + 1
    return {"latencies": latencies, "errors": errors, "cpu_s": time.process_time() - cpu0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--kind", choices=("read", "soft", "add"), required=True)
    ap.add_argument("--targets", required=True, help="a JSON file: a list of domains (read, add) or emails (soft)")
    ap.add_argument("--start", type=float, required=True, help="wall-clock time (time.time()) to start at")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slot", type=int, default=0)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--requests", type=int, default=0, help="stop after this many requests (0: no limit)")
    args = ap.parse_args()
    Path(args.out).write_text(json.dumps(run(args)))


if __name__ == "__main__":
    main()
