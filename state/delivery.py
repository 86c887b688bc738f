"""Webhook delivery: the outbox (state/webhooks.py) POSTed to the receivers, at least once.

    Dispatcher(hooks).run(stop)   the server's delivery thread (api/server.py starts it)

- Each try is a POST of the event's JSON with the Standard Webhooks headers: `webhook-id` (the
  same on every try of a delivery), `webhook-timestamp` (this try's, unix seconds) and
  `webhook-signature` (`v1,<base64 HMAC-SHA256>` over `<id>.<timestamp>.<body>`).
- A 2xx answer delivers it; anything else (another status, a redirect, a refused connection,
  no answer within `timeout` seconds) is tried again after RETRY_DELAYS (5 s, 30 s, 2 min, 10
  min, 30 min, 1 h, 2 h, 4 h, then every 8 h; each +-20 %), until 24 hours after the event,
  when it is dropped and counted as given up. The outbox is a table, so a restart loses nothing.
- A receiver that hangs or fails harms nothing else: tries run in a bounded pool (`workers`),
  one at a time for one webhook (`per_hook`: so a receiver that keeps up gets its events in
  order), each bounded by `timeout`; writes never wait for any of it (the events are queued off
  the write path, state/events.py).
- Every try resolves the host again and connects only to public addresses (unless
  MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1), to the address it checked: a name that turns private
  later (DNS rebinding) is refused, not followed. Redirects are not followed.
- Nothing of the URL, the secret or the answer's body reaches a log line or list-webhooks;
  failures are described by status or kind ("HTTP 500", "timed out", "connection refused").
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailstate.state.errors import InvalidInput
from mailstate.state.webhooks import Delivery, Resolver, Webhooks, is_public, parse_url, resolve, sign

log = logging.getLogger("mailstate.webhooks")

RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
GIVE_UP_AFTER = 24 * 3600.0
TIMEOUT = 10.0
USER_AGENT = "mailstate-webhooks/1"


class TryFailed(Exception):
    """A try that did not deliver; the message is safe to keep (no URL, no body)."""


def retry_delay(attempts: int, rng: random.Random) -> float:
    """Seconds before the next try after `attempts` failed ones (1 = the first failed)."""
    base = RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]
    return base * rng.uniform(0.8, 1.2)


class _Plain(http.client.HTTPConnection):
    """HTTP to one checked address, with the URL's host in Host."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = _socket(self._ip, self.port, self.timeout)


class _Tls(http.client.HTTPSConnection):
    """HTTPS to one checked address, with the URL's host for Host, SNI and the certificate."""

    def __init__(self, host: str, port: int, ip: str, timeout: float, tls: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self._ip = ip
        self._tls = tls

    def connect(self) -> None:
        self.sock = self._tls.wrap_socket(_socket(self._ip, self.port, self.timeout), server_hostname=self.host)


def _socket(ip: str, port: int, timeout: float | None) -> socket.socket:
    sock = socket.create_connection((ip, port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small request: no Nagle wait
    return sock


Post = Callable[[Delivery, dict[str, str], float], int]


_Key = tuple[str, str, int, str]  # scheme, host, port, the address connected to


@dataclass
class Poster:
    """One try: resolve, check, POST; the HTTP status, or TryFailed. A connection the receiver
    keeps open is used again for the next try to the same checked address (no new handshake)."""

    private_ok: bool
    resolver: Resolver = resolve
    tls: ssl.SSLContext | None = None  # default: the system's CAs (made once: loading them costs ~50 ms)
    _idle: dict[_Key, http.client.HTTPConnection] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __call__(self, delivery: Delivery, headers: dict[str, str], timeout: float) -> int:
        try:
            target = parse_url(delivery.url, private_ok=self.private_ok)
        except InvalidInput as exc:
            raise TryFailed("the URL is no longer allowed") from exc
        addresses = [target.host] if target.ip_literal else self.resolver(target.host, target.port)
        if not addresses:
            raise TryFailed("the host does not resolve")
        if not self.private_ok and not all(is_public(ipaddress.ip_address(a.split("%", 1)[0])) for a in addresses):
            raise TryFailed("the host resolves to an address that is not public")
        parts = urllib.parse.urlsplit(delivery.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = (target.scheme, target.host, target.port, addresses[0])
        with self._lock:
            kept = self._idle.pop(key, None)
        try:
            if kept is not None:
                try:
                    return self._post(kept, key, path, delivery.body, headers, timeout)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    pass  # the receiver closed the kept connection meanwhile: a new one
            return self._post(self._connect(key, timeout), key, path, delivery.body, headers, timeout)
        except TimeoutError:
            raise TryFailed("timed out") from None
        except ConnectionRefusedError:
            raise TryFailed("connection refused") from None
        except ssl.SSLError as exc:
            raise TryFailed(f"TLS failed ({type(exc).__name__})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TryFailed(f"connection failed ({type(exc).__name__})") from None

    def _connect(self, key: _Key, timeout: float) -> http.client.HTTPConnection:
        scheme, host, port, ip = key
        if scheme != "https":
            return _Plain(host, port, ip, timeout)
        if self.tls is None:
            self.tls = ssl.create_default_context()
        return _Tls(host, port, ip, timeout, self.tls)

    def _post(
        self,
        conn: http.client.HTTPConnection,
        key: _Key,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
    ) -> int:
        keep = False
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(65536)
            keep = not resp.will_close and resp.isclosed()
            return int(resp.status)
        finally:
            if keep:
                with self._lock:
                    old = self._idle.pop(key, None)
                    self._idle[key] = conn
                if old is not None:
                    old.close()
            else:
                conn.close()


@dataclass
class Counters:
    """What /metrics shows (api/metrics.py): tries by result since the server started."""

    delivered: int = 0
    failed: int = 0  # tries that failed (each retry counts)
    given_up: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


@dataclass
class Dispatcher:
    """Tries the due outbox rows (see the module docstring); `clock` and `post` are seams."""

    hooks: Webhooks
    post: Post | None = None
    workers: int = 8
    per_hook: int = 1
    timeout: float = TIMEOUT
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    counters: Counters = field(default_factory=Counters)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _busy: dict[int, str] = field(default_factory=dict, init=False)  # seq -> webhook id, being tried
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _slots: threading.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        if self.post is None:
            self.post = Poster(self.hooks.private_ok, self.hooks.resolver)
        self._slots = threading.Semaphore(self.workers)
        self.hooks.on_enqueue = self._wake.set

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Until `stop`: start every due try that has a free slot, then wait for a wake-up, a
        finished try or the next due time (at most a second)."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="mailstate-webhook") as pool:
            while not stop.is_set():
                try:
                    started = self.round(pool)
                except Exception:  # the loop must outlive one bad round
                    log.exception("webhook delivery round failed")
                    started = 0
                if not started:
                    self._wake.wait(self._idle())
                    self._wake.clear()

    def _idle(self) -> float:
        """How long to wait when nothing could start: until a try ends (it wakes us) while one
        runs, else until the next try is due; never over a second."""
        with self._lock:
            if self._busy:
                return 1.0
        due = self.hooks.next_due()
        if due is None:
            return 1.0
        return max(0.01, min(1.0, due - self.clock()))

    def round(self, pool: ThreadPoolExecutor) -> int:
        """Submit the due tries there are slots for; returns how many were started."""
        with self._lock:
            busy = dict(self._busy)
        found = self.hooks.due(self.clock(), self.workers * 4, skip=busy)
        per_hook: dict[str, int] = {}
        for hook in busy.values():
            per_hook[hook] = per_hook.get(hook, 0) + 1
        started = 0
        for delivery in found:
            if per_hook.get(delivery.webhook_id, 0) >= self.per_hook:
                continue
            if not self._slots.acquire(blocking=False):
                break
            per_hook[delivery.webhook_id] = per_hook.get(delivery.webhook_id, 0) + 1
            with self._lock:
                self._busy[delivery.seq] = delivery.webhook_id
            pool.submit(self._try, delivery)
            started += 1
        return started

    def _try(self, delivery: Delivery) -> None:
        try:
            self.attempt(delivery)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", delivery.msg_id)
        finally:
            with self._lock:
                self._busy.pop(delivery.seq, None)
            self._slots.release()
            self._wake.set()

    def attempt(self, delivery: Delivery) -> bool:
        """One try of `delivery`, its outcome recorded in the outbox; True when delivered."""
        assert self.post is not None
        stamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(delivery.secret, delivery.msg_id, stamp, delivery.body),
        }
        now = datetime.now(UTC)
        try:
            status = self.post(delivery, headers, self.timeout)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except TryFailed as exc:
            error = str(exc)
        if error is None:
            self.hooks.delivered(delivery, now)
            self.counters.add("delivered")
            return True
        self.counters.add("failed")
        elapsed = self.clock() - delivery.created_unix
        if elapsed >= GIVE_UP_AFTER:
            self.hooks.failed(delivery, f"{error}; given up after 24 h", now, None)
            self.counters.add("given_up")
            log.warning(
                "webhook %s: gave up on %s after %d tries (%s)",
                delivery.webhook_id,
                delivery.msg_id,
                delivery.attempts + 1,
                error,
            )
            return False
        retry_at = min(
            self.clock() + retry_delay(delivery.attempts + 1, self.rng), delivery.created_unix + GIVE_UP_AFTER
        )
        self.hooks.failed(delivery, error, now, retry_at)
        log.info(
            "webhook %s: %s failed (%s), retry in %.0f s",
            delivery.webhook_id,
            delivery.msg_id,
            error,
            retry_at - self.clock(),
        )
        return False
