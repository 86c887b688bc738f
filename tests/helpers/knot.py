"""A real authoritative DNS server for tests: Debian's Knot DNS (knotd) on a free loopback port,
with its own config, zone and control directories under a temp dir.

    with KnotServer(tmp, ["shop.test"]) as knot:
        knot.set_zone("shop.test", ["@ MX 10 mx1.platform.test.", '@ TXT "v=spf1 mx -all"'])
        knot.address            # "127.0.0.1:PORT", for MAILSTATE_DNS_RESOLVER
        knot.break_zone("shop.test")   # the zone is emptied: knot answers SERVFAIL for it
        knot.queries()          # queries answered so far (knot's mod-stats)

Names outside the zones are answered REFUSED (knot is authoritative only). Each `set_zone`
bumps the SOA serial, reloads the zone (`knotc zone-reload`) and waits until knot serves it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest


def require_knot() -> None:
    missing = [n for n in ("knotd", "knotc") if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]
    if missing:
        msg = f"missing programs: {', '.join(missing)} (apt-get install knot knot-dnsutils)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def free_udp_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (DNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


class KnotServer:
    """One knotd serving `zones` (names without the trailing dot) on 127.0.0.1."""

    def __init__(self, workdir: Path, zones: list[str], *, host: str = "127.0.0.1", port: int = 0) -> None:
        """``host``/``port``: where knot listens (port 0: a free one; 53 for a resolver such as libc's,
        which takes no port, on a loopback address of its own)."""
        require_knot()
        self.w = workdir
        self.zones = list(zones)
        self.host = host
        self.fixed_port = port
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.serials = dict.fromkeys(self.zones, 0)
        for sub in ("run", "db", "zones"):
            (self.w / sub).mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def conf(self) -> Path:
        return self.w / "knot.conf"

    def _write_conf(self) -> None:
        zones = "".join(f"  - domain: {z}\n    file: {z}.zone\n" for z in self.zones)
        self.conf.write_text(
            f"""server:
    rundir: "{self.w}/run"
    listen: {self.host}@{self.port}
log:
  - target: stderr
    any: warning
database:
    storage: "{self.w}/db"
mod-stats:
  - id: counts
template:
  - id: default
    storage: "{self.w}/zones"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off
    global-module: mod-stats/counts
zone:
{zones}"""
        )

    def start(self) -> None:
        for zone in self.zones:
            if not (self.w / "zones" / f"{zone}.zone").exists():
                self.write_zone(zone, [])
        for _attempt in range(3):
            self.port = self.fixed_port or free_udp_tcp_port()
            self._write_conf()
            log = (self.w / "knotd.log").open("ab")
            self.proc = subprocess.Popen(["knotd", "-c", str(self.conf)], stdout=log, stderr=log)
            if self._wait_serving(self.zones[0], self.serials[self.zones[0]], 10):
                return
            self.stop()
        raise RuntimeError(f"knotd did not come up: {(self.w / 'knotd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # ---- zones

    def write_zone(self, zone: str, records: list[str]) -> None:
        """Write `zone`'s file (the next serial) without reloading: before `start`, or with `set_zone`."""
        self.serials[zone] += 1
        text = (
            f"$ORIGIN {zone}.\n$TTL 60\n"
            f"@ SOA ns.{zone}. hostmaster.{zone}. {self.serials[zone]} 60 60 600 60\n"
            f"@ NS ns.{zone}.\nns A 127.0.0.1\n" + "".join(r + "\n" for r in records)
        )
        (self.w / "zones" / f"{zone}.zone").write_text(text)

    def set_zone(self, zone: str, records: list[str]) -> None:
        """Serve `zone` with `records` (zone-file lines relative to the zone) from now on."""
        self.write_zone(zone, records)
        self._reload(zone)
        if not self._wait_serving(zone, self.serials[zone], 10):
            raise RuntimeError(f"knot does not serve serial {self.serials[zone]} of {zone}")

    def break_zone(self, zone: str) -> None:
        """Take `zone`'s contents away (`knotc zone-purge`, its file too): knot stays configured
        for it, has nothing to serve and answers SERVFAIL for its names until `set_zone`."""
        subprocess.run(
            ["knotc", "-c", str(self.conf), "zone-purge", "-f", zone], check=True, capture_output=True, timeout=30
        )
        deadline = time.monotonic() + 10
        while self._rcode(zone) != dns.rcode.SERVFAIL:
            if time.monotonic() > deadline:
                raise RuntimeError(f"knot still serves {zone}")
            time.sleep(0.05)

    def _reload(self, zone: str) -> None:
        r = subprocess.run(["knotc", "-c", str(self.conf), "zone-reload", zone], capture_output=True, timeout=30)
        if r.returncode != 0:  # a purged zone has nothing to reload: the server's reload loads it anew
            subprocess.run(["knotc", "-c", str(self.conf), "reload"], check=True, capture_output=True, timeout=30)

    def _soa_answer(self, zone: str) -> dns.message.Message | None:
        query = dns.message.make_query(f"{zone}.", dns.rdatatype.SOA)
        try:
            return dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return None

    def _rcode(self, zone: str) -> int | None:
        answer = self._soa_answer(zone)
        return None if answer is None else answer.rcode()

    def _wait_serving(self, zone: str, serial: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            answer = self._soa_answer(zone)
            if answer is not None and answer.answer and answer.answer[0][0].serial == serial:
                return True
            time.sleep(0.05)
        return False

    # ---- what knot saw

    def queries(self) -> int:
        """Queries knot has answered since it started (mod-stats)."""
        out = subprocess.run(
            ["knotc", "-c", str(self.conf), "stats", "mod-stats"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            if line.startswith("mod-stats.server-operation[query]"):
                return int(line.rsplit("=", 1)[1])
        return 0
