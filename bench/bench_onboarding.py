"""Onboarding: client autoconfig, check-dns, and what the background DNS check costs writes.

    python -m bench.bench_onboarding [--mailboxes 10000] [--per-domain 5] [--reads 400]
                                     [--checks 100] [--writes 200] [--keep DIR] [--json]

In ONE run, on ONE seeded data dir (bench.seed, one commit, plus a commit adding a `dns:` block)
and ONE real authoritative DNS server (knotd on loopback, tests/helpers/knot.py) that serves every
domain's zone exactly as dns-records lists it:

1. two `mailstate serve` processes on byte-for-byte copies of the data dir, both resolving
   through knot: OFF with MAILSTATE_DNS_CHECK_INTERVAL=0 (no background check) and ON with the
   default (the background check sweeps every domain once after start: the busiest it gets);
2. on OFF, p50/p90 over one keep-alive stdlib connection of: Thunderbird autoconfig (target
   p50 <= 5 ms), Outlook autodiscover, the Apple profile, and check-dns of one domain against
   the local knot (target p50 <= 50 ms), cycling through the domains;
3. write p50: remove-user (soft, a distinct mailbox each call: one commit each) alternately on
   OFF and ON, so load from anything else on the machine hits both alike; ratio ON/OFF (target:
   unchanged). The queries knot answered and the domains ON checked during the writes show
   that the background check ran meanwhile.
"""

from __future__ import annotations

import os
import sys
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
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from bench.seed import SeedInfo, pack, seed_state  # noqa: E402
from mailstate.state.datadir import open_store  # noqa: E402
from mailstate.state.dns import records_for  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.models import DnsSettings  # noqa: E402
from mailstate.state.snapshot import Actor, Change  # noqa: E402
from mailstate.state.store import clean_request_id, commit_message  # noqa: E402
from tests.helpers.knot import KnotServer  # noqa: E402

API = "/v1/email-account"
REPO_ROOT = Path(__file__).resolve().parent.parent
DNS = DnsSettings(mx_hosts=["mx1.bench.test", "mx2.bench.test"])
WARMUP = 20
OUTLOOK = (
    '<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
    'outlook/requestschema/2006"><Request><EMailAddress>{email}</EMailAddress><AcceptableResponseSchema>'
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>"
    "</Request></Autodiscover>"
)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`mailstate serve` on a data dir, in a subprocess, with extra environment."""

    def __init__(self, root: Path, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("a")
        exe = shutil.which("mailstate")
        cmd = [exe] if exe else [sys.executable, "-m", "mailstate.api.cli"]
        self.proc = subprocess.Popen(
            [*cmd, "serve", "--data", str(root), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT), "MAILSTATE_LOG_LEVEL": "warning"} | env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailstate serve exited ({self.proc.returncode}); see {log_path}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
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


class Client:
    """One keep-alive stdlib connection (the client library adds as little as possible)."""

    def __init__(self, server: Server, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (path, resp.status, data[:300])
        return data

    def timed(self, method: str, path: str, body: bytes | None = None, auth: bool = False) -> float:
        headers = {**(self.auth if auth else {}), **({"Content-Type": "text/xml"} if body else {})}
        t = time.perf_counter()
        self.call(method, path, body, headers)
        return time.perf_counter() - t


def add_dns_settings(info: SeedInfo) -> None:
    """One signed commit that adds the `dns:` block (the server is not running yet)."""
    store = open_store(info.root)
    settings = store.snapshot.settings.model_copy(update={"dns": DNS})
    message = commit_message("set-dns", "mailstate", None, Actor.admin("bench:setup"), clean_request_id(None))
    store.commit_change(Change(settings=settings), message)


def zone_lines(domain: str) -> list[str]:
    """The domain's zone as dns-records lists it (no node keys in this state)."""
    out = []
    for r in records_for(domain, DNS, [], []):
        name, kind, value = r["name"] + ".", r["type"], r["value"]
        out.append(f'{name} TXT "{value}"' if kind == "TXT" else f"{name} {kind} {value}.")
    return out


def start_knot(workdir: Path, domains: list[str]) -> KnotServer:
    knot = KnotServer(workdir, domains)
    for name in domains:  # every zone file before knotd starts: one load, no reloads
        knot.write_zone(name, zone_lines(name))
    knot.start()
    return knot


def measure_reads(client: Client, info: SeedInfo, reads: int, checks: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"autoconfig": [], "autodiscover": [], "mobileconfig": [], "check_dns": []}
    domains = info.domains
    for i in range(WARMUP + reads):
        email = f"user{i}@{domains[(i * 7919) % len(domains)]}"
        samples = (
            ("autoconfig", client.timed("GET", f"/mail/config-v1.1.xml?emailaddress={email}")),
            (
                "autodiscover",
                client.timed("POST", "/autodiscover/autodiscover.xml", OUTLOOK.format(email=email).encode()),
            ),
            ("mobileconfig", client.timed("GET", f"{API}/mobileconfig?email={email}")),
        )
        if i >= WARMUP:
            for key, took in samples:
                out[key].append(took)
    for i in range(5 + checks):
        took = client.timed("GET", f"{API}/check-dns?domain={domains[(i * 31) % len(domains)]}", auth=True)
        if i >= 5:
            out["check_dns"].append(took)
    body = json.loads(client.call("GET", f"{API}/check-dns?domain={domains[0]}", headers=client.auth))
    assert body["ok"] is True, [r for r in body["records"] if r["status"] != "ok"]  # the zones are right
    return out


def measure_writes(off: Client, on: Client, info: SeedInfo, writes: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"off": [], "on": []}
    emails = iter(info.emails)
    for i in range(WARMUP + writes):
        email = next(emails)
        body = json.dumps({"email": email}).encode()
        order = (("off", off), ("on", on)) if i % 2 else (("on", on), ("off", off))
        for side, client in order:
            headers = {**client.auth, "Content-Type": "application/json"}
            t = time.perf_counter()
            client.call("POST", f"{API}/remove-user", body, headers)
            if i >= WARMUP:
                out[side].append(time.perf_counter() - t)
    return out


def checked_domains(server: Server, token: str) -> int:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        return sum(d["dns_checked_at"] is not None for d in c.get(f"{API}/list-domains").json()["domains"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", type=int, default=10000)
    ap.add_argument("--per-domain", type=int, default=5)
    ap.add_argument("--reads", type=int, default=400, help="measured autoconfig/autodiscover/profile requests each")
    ap.add_argument("--checks", type=int, default=100, help="measured check-dns calls")
    ap.add_argument("--writes", type=int, default=200, help="measured writes on each server")
    ap.add_argument("--keep", type=Path, help="keep the data dirs here")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="mailstate-bench-onboarding-"))
    base.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    knot: KnotServer | None = None
    try:
        log(f"seeding {args.mailboxes} mailboxes ...")
        info = seed_state(base / "off", args.mailboxes, args.per_domain)
        add_dns_settings(info)
        pack(info)
        db = LocalDB(info.root / "mailstate.db")
        _t, token = db.create_token(project_id=None, name="bench-admin")
        db.close()
        shutil.copytree(info.root, base / "on", symlinks=True)
        log(f"knotd with {len(info.domains)} zones ...")
        knot = start_knot(base / "knot", info.domains)
        env = {"MAILSTATE_DNS_RESOLVER": knot.address}
        off = Server(base / "off", base / "off.log", env | {"MAILSTATE_DNS_CHECK_INTERVAL": "0"})
        servers.append(off)
        on = Server(base / "on", base / "on.log", env)
        servers.append(on)
        c_off, c_on = Client(off, token), Client(on, token)
        log("reads on OFF ...")
        reads = measure_reads(c_off, info, args.reads, args.checks)
        log("writes, OFF and ON alternately ...")
        q0, checked0 = knot.queries(), checked_domains(on, token)
        writes = measure_writes(c_off, c_on, info, args.writes)
        q1, checked1 = knot.queries(), checked_domains(on, token)
    finally:
        for s in servers:
            s.stop()
        if knot is not None:
            knot.stop()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    figures: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()[0]},
        "mailboxes": args.mailboxes,
        "domains": len(info.domains),
        **{f"{k}_p50_ms": float(ms(p50(v))) for k, v in reads.items()},
        **{f"{k}_p90_ms": float(ms(p90(v))) for k, v in reads.items()},
        "write_off_p50_ms": float(ms(p50(writes["off"]))),
        "write_on_p50_ms": float(ms(p50(writes["on"]))),
        "write_off_p90_ms": float(ms(p90(writes["off"]))),
        "write_on_p90_ms": float(ms(p90(writes["on"]))),
        "write_ratio_on_off": round(p50(writes["on"]) / p50(writes["off"]), 3),
        "knot_queries_during_writes": q1 - q0,
        "domains_checked_by_on_during_writes": checked1 - checked0,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"onboarding bench: {args.mailboxes} mailboxes, {len(info.domains)} domains, load {figures['machine']['load']:.2f}"
    )
    print("| measure | p50 ms | p90 ms | target |")
    print("|---|---|---|---|")
    for key, target in (
        ("autoconfig", "p50 <= 5"),
        ("autodiscover", ""),
        ("mobileconfig", ""),
        ("check_dns", "p50 <= 50"),
    ):
        print(f"| {key} | {figures[f'{key}_p50_ms']} | {figures[f'{key}_p90_ms']} | {target} |")
    print(f"| write, no background check | {figures['write_off_p50_ms']} | {figures['write_off_p90_ms']} | |")
    print(
        f"| write, background check running | {figures['write_on_p50_ms']} | {figures['write_on_p90_ms']} | unchanged |"
    )
    print(
        f"write ratio ON/OFF {figures['write_ratio_on_off']}; during the writes knot answered "
        f"{figures['knot_queries_during_writes']} queries and ON checked {figures['domains_checked_by_on_during_writes']} domains"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
