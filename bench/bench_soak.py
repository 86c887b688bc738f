"""Does the server's memory stay flat over many writes?

    python -m bench.bench_soak [--mailboxes 10000] [--writes 10000] [--chunk 1000] [--writers 2]
                               [--trace] [--json]

One seeded data dir (bench.seed, one commit, packed) and one server on it; load clients in
separate processes (bench/load_client.py, one keep-alive connection each), `--writers` of them,
each sending soft remove-user / restore-user calls (every call one signed commit) as fast as
they are answered. The writes go in chunks of `--chunk`; after each chunk the server's RSS is
read, and the table shows it against the RSS after the first chunk (the warm-up: caches,
interned strings, the first pack). Target (issue "fast under load"): RSS after all writes
<= 1.2x RSS after the first 1k. Each sample also splits the RSS into RssAnon (the process's own
memory: what a leak grows) and RssFile (mapped file pages: libraries, and the pack windows
libgit2 maps, capped by GitRepo; page cache the kernel can take back), each with its own ratio.

Default: `mailstate serve` in a subprocess, RSS from /proc. `--trace`: the same app (create_app,
uvicorn) in a thread of this process with tracemalloc on, so the report also lists the source
lines whose live allocations grew most between the end of the first chunk and the end (what to
fix when the RSS climbs); tracemalloc slows every allocation and its snapshots take memory of
their own, so neither its throughput nor its RSS is the server's.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env

_HOME = isolate_env()  # before anything imports pygit2 (libgit2 reads HOME once, at init)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from bench.bench_http import Server, free_port  # noqa: E402
from bench.bench_load import admin_token, proc_cpu_s, proc_rss_mb  # noqa: E402
from bench.seed import pack, seed_state  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP = 12  # source lines shown by --trace


@dataclass
class Sample:
    writes: int
    rss_mb: float
    anon_mb: float
    file_mb: float
    seconds: float
    errors: int


class InProcessServer:
    """create_app under uvicorn in a thread of this process (for tracemalloc)."""

    def __init__(self, root: Path) -> None:
        import uvicorn

        from mailstate.api.server import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(root), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="soak-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the in-process server did not come up")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def rss_split_mb(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of `pid` in MB: the process's own memory, and the file pages it maps
    (pack files, libraries); file pages are page cache the kernel can take back."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", float("nan")), fields.get("RssFile", float("nan"))


def chunk(port: int, token: str, work: Path, targets: Path, writers: int, count: int) -> tuple[int, int]:
    """`count` writes by `writers` client processes; (writes answered, non-2xx answers)."""
    jobs = []
    for i in range(writers):
        out = work / f"soak-w{i}.json"
        cmd = [sys.executable, "-m", "bench.load_client", "--port", str(port), "--token", token, "--kind", "soft"]
        cmd += ["--targets", str(targets), "--start", "0", "--duration", "3600", "--out", str(out)]
        cmd += ["--slot", str(i), "--slots", str(writers), "--requests", str(count // writers)]
        jobs.append((out, subprocess.Popen(cmd, cwd=REPO_ROOT)))
    done = errors = 0
    for out, proc in jobs:
        if proc.wait() != 0:
            raise RuntimeError("a load client failed")
        data = json.loads(out.read_text())
        done += len(data["latencies"])
        errors += sum(data["errors"].values())
    return done, errors


def soak(args: argparse.Namespace, root: Path, work: Path, token: str, targets: Path) -> dict[str, Any]:
    server: Server | InProcessServer = InProcessServer(root) if args.trace else Server(root, work / "serve.log")
    pid = os.getpid() if args.trace else server.proc.pid  # type: ignore[union-attr]
    samples: list[Sample] = []
    first: tracemalloc.Snapshot | None = None
    try:
        cpu0, t0, total = proc_cpu_s(pid), time.perf_counter(), 0
        while total < args.writes:
            done, errors = chunk(server.port, token, work, targets, args.writers, args.chunk)
            total += done
            if args.trace:
                gc.collect()
            anon, file = rss_split_mb(pid)
            samples.append(Sample(total, proc_rss_mb(pid), anon, file, time.perf_counter() - t0, errors))
            print(
                f"  {total:>7} writes  RSS {samples[-1].rss_mb:7.1f} MB  (anon {anon:6.1f}, file {file:6.1f})"
                f"  ({errors} non-2xx)",
                flush=True,
            )
            if args.trace and first is None:
                first = tracemalloc.take_snapshot()
        cpu = proc_cpu_s(pid) - cpu0
        last = tracemalloc.take_snapshot() if args.trace else None
    finally:
        server.stop()
    base = samples[0].rss_mb
    figures: dict[str, Any] = {
        "samples": [s.__dict__ for s in samples],
        "rss_first_chunk_mb": round(base, 1),
        "rss_end_mb": round(samples[-1].rss_mb, 1),
        "rss_ratio": round(samples[-1].rss_mb / base, 3),
        "anon_ratio": round(samples[-1].anon_mb / samples[0].anon_mb, 3),
        "file_ratio": round(samples[-1].file_mb / samples[0].file_mb, 3),
        "writes_per_s": round(total / samples[-1].seconds, 1),
        "server_cpu_ms_per_write": round(cpu / total * 1000, 2),
    }
    print(
        f"\nRSS after {total} writes / after the first {samples[0].writes}: {samples[-1].rss_mb:.1f} / {base:.1f} MB "
        f"= {figures['rss_ratio']}x (target <= 1.2); {figures['writes_per_s']} writes/s, "
        f"{figures['server_cpu_ms_per_write']} ms of server CPU per write"
    )
    print(
        f"  of which anon {samples[-1].anon_mb:.1f} / {samples[0].anon_mb:.1f} MB = {figures['anon_ratio']}x, "
        f"file-backed {samples[-1].file_mb:.1f} / {samples[0].file_mb:.1f} MB = {figures['file_ratio']}x"
    )
    if first is not None and last is not None:
        figures["growth"] = growth(first, last)
    return figures


def growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    """The source lines whose live allocations grew most between the two snapshots."""
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    stats = last.filter_traces(keep).compare_to(first.filter_traces(keep), "lineno")
    top = [s for s in stats if s.size_diff > 0][:TOP]
    total = sum(s.size_diff for s in stats)
    print(f"\nlive Python allocations grew {total / 1024:.0f} KiB in all; the top lines:")
    rows = []
    for stat in top:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / 1024:9.1f} KiB  {stat.count_diff:+7d} blocks  {frame.filename}:{frame.lineno}")
        rows.append(
            {
                "kib": round(stat.size_diff / 1024, 1),
                "blocks": stat.count_diff,
                "at": f"{frame.filename}:{frame.lineno}",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--writes", type=int, default=10_000, help="writes in all (default 10000)")
    ap.add_argument("--chunk", type=int, default=1_000, help="writes between RSS samples (default 1000)")
    ap.add_argument("--writers", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--trace", action="store_true", help="run the server in this process under tracemalloc")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    if args.trace:
        tracemalloc.start(1)
    work = Path(tempfile.mkdtemp(prefix="mailstate-bench-soak-"))
    root = work / "data"
    try:
        print(f"seeding {args.mailboxes} mailboxes ...", flush=True)
        info = seed_state(root, args.mailboxes)
        pack(info)
        targets = work / "emails.json"
        targets.write_text(json.dumps(info.emails[: 20 * args.writers]))
        figures = soak(args, root, work, admin_token(root), targets)
        figures["cores"], figures["load_avg"] = os.cpu_count(), os.getloadavg()
        print(f"load average at the end: {figures['load_avg'][0]:.2f} ({figures['cores']} cores)")
        if args.json:
            print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
