"""Reads and writes at the same time against `mailstate serve`: does a read wait for a write?

    python -m bench.bench_load [--mailboxes 100000] [--duration 10] [--readers 10] [--writers 5]
                               [--no-add] [--keep DIR] [--json]

One seeded data dir (bench.seed, one commit), one `mailstate serve` on it, and load clients in
separate processes (bench/load_client.py, one keep-alive connection each, stdlib http.client),
each sending its next request as soon as the last is answered. Phases, in this order, each
`--duration` seconds, all in the same run so every ratio compares like with like:

    1r        1 reader alone                      (list-users of one domain, cycling)
    1r+5w     1 reader + 5 soft remove/restore writers
    10r       10 readers alone
    10r+5w    10 readers + 5 soft remove/restore writers
    5w        5 soft remove/restore writers alone
    10r+5a    10 readers + 5 add-user writers (bcrypt cost 4, as seeded)

Reported per phase: reads/s and read p50/p90/p99, writes/s and write p50/p99, non-2xx
answers, and the CPU seconds the server and the clients used, so a client bottleneck shows.
The server's RSS is printed after every phase. Targets (issue "fast under load"):
read p99 at 10r+5w <= 3x 10r; reads/s at 1r+5w >= 0.5x 1r; writes/s at 5w >= 100.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, p50

_HOME = isolate_env()  # before anything imports pygit2 (libgit2 reads HOME once, at init)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from bench.bench_http import Server  # noqa: E402
from bench.seed import SeedInfo, pack, seed_state  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PHASES = ("1r", "1r+5w", "10r", "10r+5w", "5w", "10r+5a")


@dataclass
class Phase:
    name: str
    seconds: float
    reads: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    rss_mb: float = 0.0

    def rate(self, values: list[float]) -> float:
        return len(values) / self.seconds

    def row(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "reads_per_s": round(self.rate(self.reads), 1),
            "read_p50_ms": _ms(self.reads, 50),
            "read_p90_ms": _ms(self.reads, 90),
            "read_p99_ms": _ms(self.reads, 99),
            "writes_per_s": round(self.rate(self.writes), 1),
            "write_p50_ms": _ms(self.writes, 50),
            "write_p99_ms": _ms(self.writes, 99),
            "errors": self.errors,
            "server_cpu_s": round(self.server_cpu_s, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "server_rss_mb": round(self.rss_mb, 1),
        }


def _ms(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    if pct == 50:
        return round(p50(values) * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000, 2)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Load:
    server: Server
    token: str
    work: Path
    duration: float
    targets: dict[str, Path]

    def client(self, kind: str, slot: int, slots: int, start: float, out: Path) -> subprocess.Popen[bytes]:
        target = self.targets["emails" if kind == "soft" else "domains"]
        cmd = [sys.executable, "-m", "bench.load_client", "--port", str(self.server.port), "--token", self.token]
        cmd += ["--kind", kind, "--targets", str(target), "--start", str(start), "--duration", str(self.duration)]
        cmd += ["--out", str(out), "--slot", str(slot), "--slots", str(slots)]
        return subprocess.Popen(cmd, cwd=REPO_ROOT)

    def phase(self, name: str, readers: int, writers: int, write_kind: str) -> Phase:
        start = time.time() + 1.5  # every client is up and connected before the clock starts
        jobs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for i in range(readers):
            out = self.work / f"{name}-r{i}.json"
            jobs.append(("read", out, self.client("read", i, readers, start, out)))
        for i in range(writers):
            out = self.work / f"{name}-w{i}.json"
            jobs.append(("write", out, self.client(write_kind, i, writers, start, out)))
        time.sleep(max(0.0, start - time.time()))
        cpu0 = proc_cpu_s(self.server.proc.pid)
        for _, _, proc in jobs:
            if proc.wait() != 0:
                raise RuntimeError(f"a load client of phase {name} failed")
        result = Phase(name, self.duration, server_cpu_s=proc_cpu_s(self.server.proc.pid) - cpu0)
        for role, out, _ in jobs:
            data = json.loads(out.read_text())
            (result.reads if role == "read" else result.writes).extend(data["latencies"])
            result.client_cpu_s += data["cpu_s"]
            for status, count in data["errors"].items():
                result.errors[status] = result.errors.get(status, 0) + count
        result.rss_mb = proc_rss_mb(self.server.proc.pid)
        return result


def admin_token(root: Path) -> str:
    exe = shutil.which("mailstate")
    cmd = [exe] if exe else [sys.executable, "-m", "mailstate.api.cli"]
    out = subprocess.run([*cmd, "token", "create", "--data", str(root), "--admin"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout.strip().splitlines()[-1]


def run_phases(load: Load, readers: int, writers: int, add: bool) -> list[Phase]:
    plan = [
        ("1r", 1, 0, "soft"),
        ("1r+5w", 1, writers, "soft"),
        (f"{readers}r", readers, 0, "soft"),
        (f"{readers}r+5w", readers, writers, "soft"),
        ("5w", 0, writers, "soft"),
    ]
    if add:
        plan.append((f"{readers}r+5a", readers, writers, "add"))
    phases = []
    for name, r, w, kind in plan:
        phases.append(load.phase(name, r, w, kind))
        print(f"  {name:<10} done; server RSS {phases[-1].rss_mb:.0f} MB", flush=True)
    return phases


def report(phases: list[Phase], readers: int) -> dict[str, Any]:
    by = {p.name: p for p in phases}
    rows = [p.row() for p in phases]
    print(
        f"\n{'phase':<10} {'reads/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'writes/s':>9} {'w p50':>7} "
        f"{'w p99':>7} {'srv cpu':>8} {'cli cpu':>8} errors"
    )
    for r in rows:
        print(
            f"{r['phase']:<10} {r['reads_per_s']:>8} {r['read_p50_ms'] or '':>7} {r['read_p90_ms'] or '':>7} "
            f"{r['read_p99_ms'] or '':>7} {r['writes_per_s']:>9} {r['write_p50_ms'] or '':>7} "
            f"{r['write_p99_ms'] or '':>7} {r['server_cpu_s']:>8} {r['client_cpu_s']:>8} {r['errors'] or ''}"
        )
    alone, mixed = by[f"{readers}r"], by[f"{readers}r+5w"]
    ratios = {
        "read_p99_mixed_over_alone": round(_ms(mixed.reads, 99) / _ms(alone.reads, 99), 2),  # type: ignore[operator]
        "reads_1r_5w_over_1r": round(by["1r+5w"].rate(by["1r+5w"].reads) / by["1r"].rate(by["1r"].reads), 2),
        "writes_per_s_5w": round(by["5w"].rate(by["5w"].writes), 1),
    }
    print(
        f"\nread p99 {readers}r+5w / {readers}r: {ratios['read_p99_mixed_over_alone']}x (target <= 3)\n"
        f"reads/s 1r+5w / 1r: {ratios['reads_1r_5w_over_1r']}x (target >= 0.5)\n"
        f"writes/s, 5 writers: {ratios['writes_per_s_5w']} (target >= 100)"
    )
    return {"phases": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    ap.add_argument("--readers", type=int, default=10)
    ap.add_argument("--writers", type=int, default=5)
    ap.add_argument("--no-add", action="store_true", help="skip the add-user phase")
    ap.add_argument("--keep", type=Path, help="keep the data dir here (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailstate-bench-load-"))
    root = args.keep or work / "data"
    try:
        print(f"seeding {args.mailboxes} mailboxes ...", flush=True)
        info: SeedInfo = seed_state(root, args.mailboxes)
        pack(info)
        (work / "domains.json").write_text(json.dumps(info.domains))
        (work / "emails.json").write_text(json.dumps(info.emails[: 20 * args.writers]))
        token = admin_token(root)
        server = Server(root, work / "serve.log")
        try:
            print(f"server up in {server.start_s:.2f} s; phases of {args.duration:g} s", flush=True)
            targets = {"domains": work / "domains.json", "emails": work / "emails.json"}
            load = Load(server, token, work, args.duration, targets)
            figures = report(run_phases(load, args.readers, args.writers, not args.no_add), args.readers)
        finally:
            server.stop()
        figures["cores"] = os.cpu_count()
        figures["load_avg"] = os.getloadavg()
        print(f"load average at the end: {figures['load_avg'][0]:.2f} ({figures['cores']} cores)")
        if args.json:
            print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
