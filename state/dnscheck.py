"""Live DNS checks: each record of dns-records looked up with a real resolver (dnspython).

    DnsChecker.check(domain, records)   check-dns's answer; the verdict is kept (state.localdb)
    BackgroundDnsCheck.run(stop)        checks every email-enabled domain, at most once an interval
    check_failed(...)                   the one place a failed check is announced

Resolver: $MAILSTATE_DNS_RESOLVER, one or more servers separated by commas or spaces, each
`IP` or `IP:PORT` (IPv6 in brackets when a port is given: `[::1]:5353`), e.g.
`127.0.0.1:5353` or `10.0.0.2, 10.0.0.3`. Unset or empty: the system's resolver
(/etc/resolv.conf). $MAILSTATE_DNS_TIMEOUT: seconds one lookup may take in all (default 2).

Verdicts, per record (`status`; `found` holds what DNS answered, in the record's value form):
- ok: published as dns-records says. MX: present, and every MX of the name is one of ours (a
  leftover MX of an old provider takes mail away). TXT: exactly one record of the same kind
  (v=spf1, v=DKIM1, ...) at the name, equal tag by tag (whitespace is not significant; two SPF or
  DMARC records are an error for receivers, so they are `wrong`).
- missing: no such name, or no record of that kind at it.
- wrong: records of that kind, none (or not only) the expected one; a CNAME expected where the
  name has addresses instead.
- error: the lookup failed: `timeout`, `servfail`, `refused` or `no_answer_from_servers`.

A check whose every lookup timed out says nothing about the domain (the resolver is away): it
is answered, but not kept and not announced.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailstate.state import placement
from mailstate.state.dns import effective_dns
from mailstate.state.errors import InvalidInput, MailstateError, Unavailable
from mailstate.state.snapshot import Actor

log = logging.getLogger("mailstate.dnscheck")

ENV_RESOLVER = "MAILSTATE_DNS_RESOLVER"
ENV_TIMEOUT = "MAILSTATE_DNS_TIMEOUT"
ENV_INTERVAL = "MAILSTATE_DNS_CHECK_INTERVAL"
DEFAULT_TIMEOUT = 2.0
# The contract: the background check looks at a domain at most once an hour.
MIN_INTERVAL = 3600
LOOKUP_THREADS = 8  # lookups of one check run side by side: a check takes its slowest lookup, not their sum


@dataclass(frozen=True)
class ResolverSpec:
    """Where lookups go: `servers` ((ip, port), ...) or, empty, the system's resolver."""

    servers: tuple[tuple[str, int], ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    def describe(self) -> str:
        if not self.servers:
            return "system"
        return ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in self.servers)


def _server(item: str) -> tuple[str, int] | None:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` as (ip, port); None when it is none of them."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    elif item.count(":") == 1:
        host, _, port = item.partition(":")
    else:  # an IPv4 address, or a bare IPv6 one (no port)
        host, port = item, ""
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return ip, int(port or 53)


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """$MAILSTATE_DNS_RESOLVER's servers; InvalidInput (code invalid_dns_resolver) for a bad one."""
    out = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        server = _server(item)
        if server is None:
            raise InvalidInput(
                f"{ENV_RESOLVER} must list servers as IP or IP:PORT ([IPv6]:PORT), separated by commas; "
                f"{item[:60]!r} is not one.",
                code="invalid_dns_resolver",
            )
        out.append(server)
    return tuple(out)


def resolver_from_env(env: Mapping[str, str] | None = None) -> ResolverSpec:
    """The resolver $MAILSTATE_DNS_RESOLVER and $MAILSTATE_DNS_TIMEOUT describe (InvalidInput if bad)."""
    env = os.environ if env is None else env
    try:
        timeout = float(env.get(ENV_TIMEOUT, "") or DEFAULT_TIMEOUT)
    except ValueError:
        timeout = -1.0
    if not 0.05 <= timeout <= 30:
        raise InvalidInput(f"{ENV_TIMEOUT} must be a number of seconds, 0.05-30.", code="invalid_dns_resolver")
    return ResolverSpec(parse_servers(env.get(ENV_RESOLVER, "")), timeout)


def check_interval(env: Mapping[str, str] | None = None) -> float:
    """Seconds between two background checks of one domain: $MAILSTATE_DNS_CHECK_INTERVAL, default
    3600, never less (the contract's at most once an hour); 0 turns the background check off."""
    raw = (os.environ if env is None else env).get(ENV_INTERVAL, "")
    try:
        value = float(raw) if raw.strip() else MIN_INTERVAL
    except ValueError:
        return MIN_INTERVAL
    return 0.0 if value == 0 else max(MIN_INTERVAL, value)


# --- lookups ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """What DNS answered for one (name, type): values in dns-records' form, or an error."""

    found: tuple[str, ...] = ()
    error: str | None = None


def _host(name: object) -> str:
    return str(name).rstrip(".").lower()


def _value(rdata: Any) -> str:
    kind = rdata.rdtype
    if kind == dns.rdatatype.MX:
        return f"{rdata.preference} {_host(rdata.exchange)}"
    if kind == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if kind == dns.rdatatype.CNAME:
        return _host(rdata.target)
    if kind == dns.rdatatype.SRV:
        return f"{rdata.priority} {rdata.weight} {rdata.port} {_host(rdata.target)}"
    if kind in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return f"{dns.rdatatype.to_text(kind)} {rdata.address}"
    return str(rdata.to_text())


def _server_error(exc: dns.resolver.NoNameservers) -> str:
    said = {str(e[3]) for e in exc.kwargs.get("errors") or [] if len(e) > 3}
    if "SERVFAIL" in said:
        return "servfail"
    if "REFUSED" in said:
        return "refused"
    return "no_answer_from_servers"


def lookup(resolver: dns.resolver.Resolver, name: str, rtype: str) -> Lookup:
    """One lookup; an expected CNAME found as addresses comes back as `A <ip>` values."""
    try:
        answer = resolver.resolve(name, rtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return Lookup()
    except dns.resolver.LifetimeTimeout:
        return Lookup(error="timeout")
    except dns.resolver.NoNameservers as exc:
        return Lookup(error=_server_error(exc))
    except dns.exception.DNSException:
        return Lookup(error="no_answer_from_servers")
    rrset = answer.rrset
    if rrset is None and rtype == "CNAME":
        addresses = lookup(resolver, name, "A")
        return addresses if addresses.found or addresses.error else Lookup()
    values = tuple(_value(r) for r in rrset) if rrset is not None else ()
    return Lookup(found=values)


# --- verdicts ---------------------------------------------------------------------------------


def _txt_kind(value: str) -> str:
    first = value.split(";", 1)[0].strip().split()
    return first[0].lower() if first else ""


def _txt_key(value: str) -> object:
    """A TXT value as compared: SPF by its terms, tag lists (DKIM, DMARC, ...) tag by tag."""
    if _txt_kind(value) == "v=spf1":
        return tuple(value.lower().split())
    tags = []
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key.strip():
            # DKIM's p= may be split by whitespace in a zone; elsewhere runs of spaces are one.
            val = "".join(val.split()) if key.strip() == "p" else " ".join(val.split())
            tags.append((key.strip(), val))
    return (tags[0], frozenset(tags[1:])) if tags else ()


def verdict(record: Mapping[str, Any], found: Lookup, domain: str, ours: Iterable[str]) -> dict[str, Any]:
    """check-dns's entry for one record, given what the lookup of its name and type found.

    `ours`: every value dns-records lists for the same name and type (the MX hosts)."""
    out: dict[str, Any] = {**record, "found": list(found.found), "error": found.error}
    if found.error is not None:
        return {**out, "status": "error", "found": []}
    kind, value, values = record["type"], record["value"], list(found.found)
    if kind == "TXT":
        if record["name"] == domain:  # the apex holds other TXT records too (verifications)
            values = [f for f in values if _txt_kind(f) == _txt_kind(value)]
        out["found"] = values
        good = len(values) == 1 and _txt_key(values[0]) == _txt_key(value)
    elif kind == "MX":
        hosts = {o.split()[-1] for o in ours}
        good = value in values and all(f.split()[-1] in hosts for f in values)
    elif kind == "CNAME":
        good = values == [value.lower()]
    else:
        good = value.lower() in values
    status = "ok" if good else ("wrong" if values else "missing")
    return {**out, "status": status}


# --- the checker --------------------------------------------------------------------------------


class CheckLog(Protocol):
    """Where verdicts are kept (state.localdb.LocalDB)."""

    def record_dns_check(self, domain: str, ok: bool, at: datetime) -> bool | None: ...

    def dns_checked_since(self, unix: int) -> set[str]: ...

    def last_dns_check(self, domain: str) -> int | None: ...


FailureHook = Callable[[str, list[dict[str, Any]], "bool | None"], None]


def check_failed(domain: str, records: list[dict[str, Any]], previous_ok: bool | None) -> None:
    """Called once for every kept check of `domain` that is not ok; this default only logs it. A
    process with webhooks replaces it with state.events.dns_check_failed, which logs it too and
    fires `dns.check_failed` (state/datadir.py). `records` are
    check-dns's entries; `previous_ok` is the verdict before (None: the domain's first check), so
    a receiver can be told only when a domain goes from ok to failing."""
    bad = [f"{r['type']} {r['name']}: {r['status']}" for r in records if r["status"] != "ok"]
    log.info("dns check of %s failed (%d record(s)): %s", domain, len(bad), "; ".join(bad[:5]))


@dataclass
class DnsChecker:
    """Looks records up (check), keeps each verdict in `db` and announces failures via `on_failure`."""

    spec: ResolverSpec | None
    db: CheckLog | None = None
    problem: str | None = None  # why there is no spec (a bad $MAILSTATE_DNS_RESOLVER)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    on_failure: FailureHook = check_failed
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _resolver: dns.resolver.Resolver | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_env(cls, db: CheckLog | None = None, env: Mapping[str, str] | None = None) -> DnsChecker:
        try:
            return cls(resolver_from_env(env), db)
        except InvalidInput as exc:
            log.warning("DNS checks are off: %s", exc.message)
            return cls(None, db, problem=exc.message)

    def _setup(self) -> tuple[dns.resolver.Resolver, ThreadPoolExecutor]:
        with self._lock:
            if self._resolver is None or self._pool is None:
                if self.spec is None:
                    raise Unavailable(self.problem or "No DNS resolver is set up.", code="dns_resolver_invalid")
                try:
                    resolver = dns.resolver.Resolver(configure=not self.spec.servers)
                except dns.exception.DNSException as exc:
                    raise Unavailable(
                        f"The system has no usable DNS resolver ({type(exc).__name__}); set {ENV_RESOLVER}.",
                        code="dns_resolver_invalid",
                    ) from exc
                if self.spec.servers:
                    resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in self.spec.servers]
                resolver.cache = None  # a check must see what DNS holds now
                resolver.lifetime = self.spec.timeout
                resolver.timeout = self.spec.timeout
                self._resolver = resolver
                self._pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="mailstate-dns")
            return self._resolver, self._pool

    def check(self, domain: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        """check-dns's answer for `records` (dns-records of `domain`); the verdict is kept."""
        resolver, pool = self._setup()
        now = self.clock()
        keys = list(dict.fromkeys((r["name"], r["type"]) for r in records))
        found = dict(zip(keys, pool.map(lambda k: lookup(resolver, *k), keys), strict=True))
        ours: dict[tuple[str, str], list[str]] = {}
        for r in records:
            ours.setdefault((r["name"], r["type"]), []).append(r["value"])
        results = [verdict(r, found[(r["name"], r["type"])], domain, ours[(r["name"], r["type"])]) for r in records]
        ok = all(r["status"] == "ok" for r in results)
        if all(f.error == "timeout" for f in found.values()) and found:
            log.warning("dns check of %s: every lookup timed out (%s); not kept", domain, self.spec_text)
        elif self.db is not None:
            previous = self.db.record_dns_check(domain, ok, now)
            if not ok:
                self.on_failure(domain, results, previous)
        return {
            "domain": domain,
            "ok": ok,
            "checked_at": now.isoformat(),
            "resolver": self.spec_text,
            "records": results,
        }

    @property
    def spec_text(self) -> str:
        return self.spec.describe() if self.spec is not None else "none"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# --- the background check -----------------------------------------------------------------------


class Executor(Protocol):
    """The store, as far as the background check uses it."""

    def execute(self, name: str, actor: Actor, data: Any = None, *, request_id: str | None = None) -> Any: ...

    @property
    def snapshot(self) -> Any: ...


@dataclass
class BackgroundDnsCheck:
    """Runs check-dns (the operation itself, as a system admin) for every domain not checked
    within `interval` seconds, a few at a time: each `tick` it works at most `budget` seconds,
    so it never holds a core, and it takes no lock a write needs (check-dns is a read).

    A domain without email (or gone) is skipped for an interval too. The list of domains due is
    made again when it is worked through, every `sweep_every` seconds, or (at most every
    `sweep_gap` seconds) when the state changed: a domain whose email was just enabled is
    checked within seconds."""

    store: Executor
    db: CheckLog
    interval: float = MIN_INTERVAL
    tick: float = 1.0
    budget: float = 0.25
    sweep_every: float = 60.0
    sweep_gap: float = 5.0
    actor: Actor = field(default_factory=lambda: Actor.admin("system:dns-check"))
    wall: Callable[[], float] = time.time  # the clock the interval is measured on (a seam for tests)
    _queue: deque[str] = field(default_factory=deque, init=False)
    _skipped: dict[str, float] = field(default_factory=dict, init=False)
    _last_sweep: float | None = field(default=None, init=False)
    _swept_commit: str | None = field(default=None, init=False)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.tick):
            try:
                self.round(stop)
            except Exception:  # the loop must outlive one bad round
                log.exception("background dns check round failed")

    def round(self, stop: threading.Event | None = None) -> int:
        """One tick's work; returns how many domains it checked."""
        now = time.monotonic()
        if self._sweep_due(now):
            self._last_sweep, self._swept_commit = now, self.store.snapshot.commit
            self._queue.extend(self.due())
        checked = 0
        while self._queue and time.monotonic() - now < self.budget and not (stop and stop.is_set()):
            domain = self._queue.popleft()
            if self._check(domain):
                checked += 1
        return checked

    def _sweep_due(self, now: float) -> bool:
        if self._queue:
            return False
        if self._last_sweep is None or now - self._last_sweep >= self.sweep_every:
            return True
        return self.store.snapshot.commit != self._swept_commit and now - self._last_sweep >= self.sweep_gap

    def due(self) -> list[str]:
        snap = self.store.snapshot
        if effective_dns(snap.settings.dns, placement.addressed(snap.nodes)) is None:
            return []
        wall = self.wall()
        fresh = self.db.dns_checked_since(int(wall - self.interval))
        self._skipped = {d: t for d, t in self._skipped.items() if t > wall}
        return [d for d in snap.sorted_domains if d not in fresh and d not in self._skipped]

    def _check(self, domain: str) -> bool:
        # A check-dns call may have checked it since the sweep: then it is not due any more.
        last = self.db.last_dns_check(domain)
        if last is not None and last >= self.wall() - self.interval:
            return False
        try:
            self.store.execute("check-dns", self.actor, {"domain": domain}, request_id="dns-check")
        except MailstateError as exc:  # no email, gone, no dns: settings, no resolver
            self._skipped[domain] = self.wall() + self.interval
            log.debug("dns check of %s skipped: %s", domain, exc.message)
            return False
        return True
