"""Upstream-mode write latency, the cost of one retry, and two servers' throughput.

    python -m bench.bench_upstream [--writes 100] [--domains 200]

All in one run, against a bare upstream repo on the local disk:
* local mode: p50 of a non-bcrypt write (soft remove-user) with no upstream;
* upstream mode: the same write, which also pushes (a `git push` to a loopback bare repo);
* one retry: the same write when another writer moved upstream first, so the first push is
  rejected, and the store fetches, validates the foreign commit and re-runs the operation;
* two servers: two processes writing concurrently to the same upstream; writes/s in total
  beside one server alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import isolate_env, p50, p90

isolate_env()  # before state (and so pygit2) is imported

from mailstate.state.datadir import DataDir, init_data_dir, open_store  # noqa: E402
from mailstate.state.models import Settings  # noqa: E402
from mailstate.state.snapshot import Actor  # noqa: E402
from mailstate.state.store import Store  # noqa: E402

ADMIN = Actor.admin("bench")
PASSWORD = "benchmark-password"


def _seed(store: Store, domains: int) -> list[str]:
    """`domains` domains with 5 mailboxes each; returns the addresses."""
    addresses = []
    for d in range(domains):
        name = f"d{d:05d}-bench.example"
        store.execute("add-domain", ADMIN, {"domain": name, "project_id": 1 + d % 20})
        for u in range(5):
            store.execute("add-user", ADMIN, {"email": f"u{u}@{name}", "password": PASSWORD})
            addresses.append(f"u{u}@{name}")
    return addresses


def _p50_ms(samples: list[float]) -> float:
    return p50(samples) * 1000


def _p90_ms(samples: list[float]) -> float:
    return p90(samples) * 1000


def _timed_removes(store: Store, addresses: list[str]) -> list[float]:
    out = []
    for email in addresses:
        t0 = time.perf_counter()
        store.execute("remove-user", ADMIN, {"email": email})
        out.append(time.perf_counter() - t0)
    return out


def _trust_each_other(*dirs: DataDir) -> None:
    lines = "".join(d.allowed_signers.read_text() for d in dirs)
    for d in dirs:
        d.allowed_signers.write_text(lines)


def _writer(root: str, upstream: str, prefix: str, count: int, start: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    store = open_store(Path(root), upstream=upstream)
    while time.time() < start:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for i in range(count):
        store.execute("link-domain", ADMIN, {"domain": f"{prefix}{i}.throughput.example", "project_id": 7})
    queue.put(time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=100, help="measured writes per mode (default 100)")
    parser.add_argument("--domains", type=int, default=200, help="seeded domains, 5 mailboxes each (default 200)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mailstate-bench-up-"))
    settings = Settings(bcrypt_cost=4)

    # Local mode.
    local = init_data_dir(tmp / "local", settings)
    store = open_store(local.root)
    addrs = _seed(store, args.domains)
    local_samples = _timed_removes(store, addrs[: args.writes])

    # Upstream mode: same seed, pushed to a bare upstream.
    up = tmp / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    a_dir = init_data_dir(tmp / "a", settings)
    b_dir = init_data_dir(tmp / "b", settings)
    _trust_each_other(a_dir, b_dir)
    a = open_store(a_dir.root, upstream=str(up))
    addrs = _seed(a, args.domains)
    up_samples = _timed_removes(a, addrs[: args.writes])

    # One retry each: b moves upstream, then a writes (its first push is rejected).
    b = open_store(b_dir.root, upstream=str(up))
    retry_samples = []
    for i, email in enumerate(addrs[args.writes : 2 * args.writes]):
        b.execute("link-domain", ADMIN, {"domain": f"r{i}.retry.example", "project_id": 3})
        t0 = time.perf_counter()
        a.execute("remove-user", ADMIN, {"email": email})
        retry_samples.append(time.perf_counter() - t0)

    # Throughput: one server alone, then two processes at once.
    n = args.writes
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    solo = ctx.Process(target=_writer, args=(str(a_dir.root), str(up), "solo", n, time.time() + 2, queue))
    solo.start()
    solo.join()
    solo_rate = n / queue.get()
    start = time.time() + 3
    procs = [
        ctx.Process(target=_writer, args=(str(d.root), str(up), p, n, start, queue))
        for d, p in ((a_dir, "pa"), (b_dir, "pb"))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    durations = [queue.get(), queue.get()]
    pair_rate = 2 * n / max(durations)
    total = int(
        subprocess.run(["git", "-C", str(up), "rev-list", "--count", "main"], capture_output=True, text=True).stdout
    )

    print(
        f"upstream-mode benchmark: {args.domains * 5} mailboxes, {args.writes} writes per mode, loopback bare upstream"
    )
    print(f"{'mode':<34}{'p50 ms':>10}{'p90 ms':>10}")
    print(f"{'local (no upstream)':<34}{_p50_ms(local_samples):>10.2f}{_p90_ms(local_samples):>10.2f}")
    print(f"{'upstream (commit + push)':<34}{_p50_ms(up_samples):>10.2f}{_p90_ms(up_samples):>10.2f}")
    print(f"{'upstream, first push rejected':<34}{_p50_ms(retry_samples):>10.2f}{_p90_ms(retry_samples):>10.2f}")
    print(
        f"push overhead vs local: {_p50_ms(up_samples) - _p50_ms(local_samples):.2f} ms; ratio {_p50_ms(up_samples) / _p50_ms(local_samples):.1f}x"
    )
    print(
        f"cost of one retry (fetch + validate + re-run + push): {_p50_ms(retry_samples) - _p50_ms(up_samples):.2f} ms"
    )
    print(
        f"throughput: one server {solo_rate:.1f} writes/s; two servers together {pair_rate:.1f} writes/s ({pair_rate / solo_rate:.2f}x)"
    )
    print(f"upstream commits after the run: {total} (seed + measured writes; nothing lost if it equals the sum)")


if __name__ == "__main__":
    main()
