"""HTTP overhead and add-user throughput of `mailstate serve`, at 10k mailboxes.

    python -m bench.bench_http [--mailboxes 10000] [--per-domain 5] [--writes 200] [--reads 400]
                               [--clients 8] [--adds 64] [--cost 12] [--keep DIR] [--json]

In ONE run, against ONE seeded data dir (bench.seed: ~2k domains x 5 mailboxes, one commit):

1. bare: `Store.execute` in this process, on a copy of the (repacked) data dir, p50/p90 of
   - a write: remove-user (soft; a distinct mailbox each time, so every call is one commit),
   - a read: list-users for one domain (cycling through domains);
2. HTTP: the same operations through a real `mailstate serve` subprocess (uvicorn, default
   settings, access log on) on the original data dir, one keep-alive stdlib http.client
   connection, round trip measured at the client. Bare and HTTP calls alternate, on the same
   mailboxes of identical states, so load from anything else on the machine hits both alike.
   Overhead = HTTP p50 - bare p50 (target <= 2 ms). The server also reports its own time for
   the operation (`Server-Timing`), which splits the overhead into thread hop and HTTP edge;
3. throughput: bcrypt cost set to `--cost` (12) by one signed settings commit, server
   restarted, then `--clients` (8) threads each with its own connection run add-user calls
   (`--adds` in all). bcrypt_time = median single-thread hash at that cost, measured in this
   run; the limit is cores / bcrypt_time; the figure is throughput / limit (target >= 0.8).

The server is a separate process and the only writer of its data dir while it runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2 (libgit2 reads HOME once, at init)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import bcrypt  # noqa: E402
import httpx  # noqa: E402

from bench.seed import SeedInfo, pack, seed_state  # noqa: E402
from mailstate.state.datadir import open_store  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.snapshot import Actor, Change  # noqa: E402
from mailstate.state.store import clean_request_id, commit_message  # noqa: E402

API = "/v1/email-account"
REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# --- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`mailstate serve` on the data dir, in a subprocess."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("a")
        exe = shutil.which("mailstate")
        cmd = [exe] if exe else [sys.executable, "-m", "mailstate.api.cli"]
        self.proc = subprocess.Popen(
            [*cmd, "serve", "--data", str(root), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        )
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailstate serve exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("mailstate serve did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# --- phases ----------------------------------------------------------------------------------


class Bare:
    """Store.execute in this process, on a byte-for-byte copy of the server's data dir."""

    def __init__(self, root: Path, admin: Actor) -> None:
        self.db = LocalDB(root / "mailstate.db")
        self.store = open_store(root, db=self.db)
        self.admin = admin

    def write(self, email: str) -> None:
        out = self.store.execute("remove-user", self.admin, {"email": email})
        assert out.result["commit"], out.result

    def read(self, domain: str) -> None:
        self.store.execute("list-users", self.admin, {"domain": domain})


class Remote:
    """The same operations through the server on one keep-alive connection (stdlib http.client,
    so the client library adds as little as possible). The server's own time for the
    operation comes back in `Server-Timing: op;dur=<ms>`."""

    def __init__(self, server: Server, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.auth = {"Authorization": f"Bearer {token}"}
        self.server_s = 0.0

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {**self.auth, "Content-Type": "application/json"} if body is not None else self.auth
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = self.conn.getresponse()
        data: dict[str, Any] = json.loads(resp.read())
        assert resp.status == 200, data
        self.server_s = float((resp.getheader("server-timing") or "op;dur=nan").rsplit("=", 1)[1]) / 1000
        return data

    def write(self, email: str) -> None:
        assert self._call("POST", f"{API}/remove-user", {"email": email})["commit"]

    def read(self, domain: str) -> None:
        self._call("GET", f"{API}/list-users?domain={domain}")


def interleaved(bare: Bare, remote: Remote, info: SeedInfo, writes: int, reads: int) -> dict[str, list[float]]:
    """Alternate bare and HTTP calls of the same operation on identical states, so that load
    from anything else on the machine hits both sides alike."""
    out: dict[str, list[float]] = {
        k: [] for k in ("bare_write", "http_write", "server_write", "bare_read", "http_read", "server_read")
    }
    emails = iter(info.emails)
    domains = info.domains
    for i in range(WARMUP + writes):
        email = next(emails)
        for side, fn in (
            (("bare", bare.write), ("http", remote.write)) if i % 2 else (("http", remote.write), ("bare", bare.write))
        ):
            t = time.perf_counter()
            fn(email)
            took = time.perf_counter() - t
            if i >= WARMUP:
                out[f"{side}_write"].append(took)
                if side == "http":
                    out["server_write"].append(remote.server_s)
    for i in range(WARMUP + reads):
        domain = domains[(i * 7919) % len(domains)]
        for side, get in (
            (("bare", bare.read), ("http", remote.read)) if i % 2 else (("http", remote.read), ("bare", bare.read))
        ):
            t = time.perf_counter()
            get(domain)
            took = time.perf_counter() - t
            if i >= WARMUP:
                out[f"{side}_read"].append(took)
                if side == "http":
                    out["server_read"].append(remote.server_s)
    return out


def set_cost(info: SeedInfo, cost: int) -> None:
    """One signed commit that sets bcrypt_cost in mailstate.yaml (the server is stopped)."""
    store = open_store(info.root)
    settings = store.snapshot.settings.model_copy(update={"bcrypt_cost": cost})
    message = commit_message("set-bcrypt-cost", str(cost), None, Actor.admin("bench:setup"), clean_request_id(None))
    store.commit_change(Change(settings=settings), message)


def bcrypt_time(cost: int, n: int = 5) -> float:
    salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
    return p50(timed(lambda: bcrypt.hashpw(b"bench password 1", salt), n))


def parallel_bcrypt_rate(cost: int, threads: int, per_thread: int = 4) -> float:
    """Hashes per second with `threads` threads hashing flat out: what the machine gives now
    (bcrypt releases the GIL), for reading the ratio on a machine with other load."""
    salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
    workers = [
        threading.Thread(target=lambda: [bcrypt.hashpw(b"bench password 1", salt) for _ in range(per_thread)])
        for _ in range(threads)
    ]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - t)


def throughput(server: Server, token: str, info: SeedInfo, clients: int, adds: int) -> tuple[float, float]:
    """(adds per second, wall seconds) for `adds` add-user calls from `clients` threads."""
    domains = info.domains
    jobs = [f"tp{i}@{domains[(i * 7) % len(domains)]}" for i in range(adds + clients)]
    warm, jobs = jobs[:clients], jobs[clients:]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    errors: list[str] = []

    def worker(k: int) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
            r = c.post(
                f"{API}/add-user", json={"email": warm[k], "password": "bench password 1"}
            )  # warm the connection
            if r.status_code != 201:
                errors.append(r.text)
            start.wait()
            while True:
                with lock:
                    if not jobs:
                        return
                    email = jobs.pop()
                r = c.post(f"{API}/add-user", json={"email": email, "password": "bench password 1"})
                if r.status_code != 201:
                    errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} add-user calls failed: {errors[:3]}")
    return adds / wall, wall


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_http", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--per-domain", type=int, default=5)
    ap.add_argument("--writes", type=int, default=200, help="timed writes per side (default 200)")
    ap.add_argument("--reads", type=int, default=400, help="timed reads per side (default 400)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent add-user clients (default 8)")
    ap.add_argument("--adds", type=int, default=64, help="timed add-user calls in all (default 64)")
    ap.add_argument("--cost", type=int, default=12, help="bcrypt cost for the throughput phase (default 12)")
    ap.add_argument("--keep", help="seed into this (empty) dir and keep it")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mailstate-bench-http-")) / "data"
    log = root.parent / "bench_http.server.log"
    cores = os.cpu_count() or 1
    print(
        f"# bench_http: {args.mailboxes} mailboxes ({args.per_domain}/domain), {cores} cores, {platform.python_implementation()} {platform.python_version()}"
    )
    try:
        info = seed_state(root, args.mailboxes, args.per_domain)
        need = args.writes + WARMUP
        assert len(info.emails) >= need, f"need at least {need} mailboxes"
        print(f"seeded {len(info.domains)} domains / {info.mailboxes} mailboxes in {info.seconds:.1f}s")
        db = LocalDB(info.data_dir.db)
        _tinfo, token = db.create_token(project_id=None, name="bench-admin")
        db.close()
        admin = Actor.admin("token:bench-admin")

        pack(info)  # as a long-lived repo would be
        copy = root.parent / "bare-copy"
        shutil.copytree(root, copy)
        os.sync()  # the seed and the copy are on disk before anything is timed
        bare = Bare(copy, admin)
        server = Server(root, log)
        try:
            r = interleaved(bare, Remote(server, token), info, args.writes, args.reads)
        finally:
            server.stop()
            bare.db.close()

        set_cost(info, args.cost)
        bt = bcrypt_time(args.cost)
        server = Server(root, log)
        try:
            rate, wall = throughput(server, token, info, args.clients, args.adds)
        finally:
            server.stop()
        bt_after = bcrypt_time(args.cost)
        machine_rate = parallel_bcrypt_rate(args.cost, cores)
    finally:
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)

    limit = cores / bt
    fig: dict[str, float] = {}
    for kind in ("write", "read"):
        fig[f"bare_{kind}_p50_ms"] = p50(r[f"bare_{kind}"]) * 1000
        fig[f"http_{kind}_p50_ms"] = p50(r[f"http_{kind}"]) * 1000
        fig[f"{kind}_overhead_p50_ms"] = fig[f"http_{kind}_p50_ms"] - fig[f"bare_{kind}_p50_ms"]
        fig[f"server_{kind}_op_p50_ms"] = p50(r[f"server_{kind}"]) * 1000
        fig[f"{kind}_http_minus_server_op_p50_ms"] = (
            p50([a - o for a, o in zip(r[f"http_{kind}"], r[f"server_{kind}"], strict=True)]) * 1000
        )
    figures: dict[str, Any] = {
        "mailboxes": info.mailboxes,
        "domains": len(info.domains),
        "cores": cores,
        "write_op": "remove-user (soft)",
        "read_op": "list-users?domain=",
        **fig,
        "bcrypt_cost": args.cost,
        "bcrypt_time_ms": bt * 1000,
        "bcrypt_time_after_ms": bt_after * 1000,
        "add_user_clients": args.clients,
        "add_user_calls": args.adds,
        "add_user_wall_s": wall,
        "add_user_per_s": rate,
        "limit_per_s": limit,
        "ratio": rate / limit,
        "parallel_bcrypt_per_s": machine_rate,
        "ratio_to_parallel_bcrypt": rate / machine_rate,
    }
    print()
    print(
        f"{'':28}{'bare p50':>9}{'bare p90':>9}{'HTTP p50':>9}{'HTTP p90':>9}{'overhead':>10}{'in-server op':>14}{'HTTP-op':>9}"
    )
    for kind, label in (("write", "write: remove-user (soft)"), ("read", "read: list-users?domain=")):
        b, h = r[f"bare_{kind}"], r[f"http_{kind}"]
        row = f"{ms(p50(b)):>9}{ms(p90(b)):>9}{ms(p50(h)):>9}{ms(p90(h)):>9}"
        row += f"{fig[f'{kind}_overhead_p50_ms']:>10.2f}{fig[f'server_{kind}_op_p50_ms']:>14.2f}{fig[f'{kind}_http_minus_server_op_p50_ms']:>9.2f}"
        print(f"{label:28}{row}")
    print(
        f"(ms; {args.writes} writes / {args.reads} reads per side after {WARMUP} warm-up calls, bare and HTTP calls alternating)"
    )
    print("overhead = HTTP p50 - bare p50 (target <= 2 ms). bare runs on a copy of the data dir in this process;")
    print("in-server op = Store.execute inside the server incl. the thread hop (Server-Timing); HTTP-op = per request,")
    print("client round trip minus that: what the HTTP edge alone adds.")
    print()
    print(
        f"add-user throughput, {args.clients} clients, bcrypt cost {args.cost}: {args.adds} calls in {wall:.2f}s = {rate:.2f}/s"
    )
    print(
        f"bcrypt time (1 thread, median of 5): {ms(bt)} ms before, {ms(bt_after)} ms after; limit = {cores} cores / {ms(bt)} ms = {limit:.2f}/s"
    )
    print(f"ratio = {rate:.2f} / {limit:.2f} = {rate / limit:.2f}   (target >= 0.8)")
    print(
        f"(for reference: {cores} threads doing nothing but bcrypt reach {machine_rate:.2f}/s on this machine right now;"
    )
    print(f" add-user throughput is {rate / machine_rate:.2f} of that)")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
