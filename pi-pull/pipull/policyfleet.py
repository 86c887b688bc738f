"""The policy service in a fleet: one count per mailbox, kept by the mailbox's home node.

A submission is authenticated and sent by whichever node the client reached (submissions are
not proxied), so each node's policy service sees only its own share. To keep the count exact, a
node that is not the home of a login's domain asks the home's policy service instead of
counting, and answers Postfix with the home's verdict:

* **Who is the home**: ``<root>/current/dovecot/proxy.imap``, the live release's line per domain
  homed on another node (``host=<home address>``, checked against rendered/nodes when the
  release was built); a domain without a line is homed here, or has no home: counted here.
* **Trust**: mutual TLS on ``[fleet] policy_port`` (the same on every node). The asking node
  pins the home's certificate to the fingerprint the signed state publishes (``<fleet
  dir>/tls_policy``, as Postfix's relay does) and presents its own ``[fleet] tls_cert``. The
  home's listener accepts a client certificate that verifies against ``<fleet dir>/peers.pem``
  and whose fingerprint is one of rendered/nodes (``<fleet dir>/ccerts``); any other peer is
  refused before it can send a request. A request that arrived this way is answered where it
  arrived, never passed on again (no loops during a move).
* **When the home does not answer** (down, unreachable, certificate unknown, no answer within
  ``[fleet] policy_timeout``): the node counts the login itself, as outside a fleet, and logs a
  warning naming the home and the login. Its figures are reported like any node's and the server
  sums every node's figures per login, so nothing sent goes uncounted; while the home is away a
  login can send up to its limit on each node that cannot reach it. A home that failed is not
  asked again for ``RETRY_AFTER`` seconds, so Postfix never waits on a dead home more than once
  in a while.
* **A suspension in the state** is answered at once wherever the login submits (554), without
  asking the home; one the home decided by itself comes back in its verdict.

The listener only runs while another node has a published certificate (``ccerts`` lists one
besides this node's): a node outside a fleet, or alone in one, opens no port.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedIOBase
from typing import Any

from .config import Config

RETRY_AFTER = 30.0  # seconds a home that failed is not asked (counted here meanwhile)
# The home keeps an idle connection longer than Postfix keeps its own policy connection
# (smtpd_policy_service_max_idle, 300 s), so it is the asking node that ends one.
IDLE_TIMEOUT = 600.0
HANDSHAKE_TIMEOUT = 5.0
MAX_ANSWER_BYTES = 4096
# What a node passes on to the home: what the home's Policy.answer reads, nothing about the client.
FORWARDED = ("request", "protocol_state", "protocol_name", "sasl_username", "instance", "recipient_count")
# A verdict from the home that goes back to Postfix: DUNNO, or a 4xx/5xx reply with its text.
_ACTION = re.compile(r"^(?:DUNNO|[45][0-9][0-9] [45]\.[0-9]{1,3}\.[0-9]{1,3} [ -~]{1,400})$")
_TLS_POLICY = re.compile(r"^\[([^\]]+)\]:[0-9]+ fingerprint match=([0-9A-F:]{95})$")
_PROXY_HOST = re.compile(r" host=([^ ]+)$")


@dataclass(frozen=True)
class Home:
    """A login's home as this node's live release names it."""

    address: str
    fingerprint: str | None  # sha256 hex of its certificate; None: not published yet


class _Stat:
    """One small file parsed once per change (stat-keyed), shared by the service's threads."""

    def __init__(self, path: str, parse: Callable[[bytes], Any], empty: Any) -> None:
        self.path, self.parse, self.empty = path, parse, empty
        self._key: tuple[int, int, int, int] | None = None
        self._value: Any = empty
        self._lock = threading.Lock()

    def get(self) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            return self.empty
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key == self._key:
                return self._value
        try:
            with open(self.path, "rb") as fh:
                value = self.parse(fh.read(64 << 20))
        except OSError:
            value = self.empty
        with self._lock:
            self._key, self._value = key, value
        return value


def parse_proxy_passdb(data: bytes) -> dict[str, str]:
    """proxy.imap (``<domain>:::::::nopassword=y proxy=y host=<address>``): domain -> home address."""
    out = {}
    for raw in data.decode("ascii", "replace").splitlines():
        domain, _, _ = raw.partition(":")
        m = _PROXY_HOST.search(raw)
        if domain and m:
            out[domain] = m.group(1)
    return out


def parse_tls_policy(data: bytes) -> dict[str, str]:
    """The fleet's tls_policy (``[<address>]:<port> fingerprint match=AB:..``): address -> sha256 hex."""
    out = {}
    for raw in data.decode("ascii", "replace").splitlines():
        m = _TLS_POLICY.match(raw.strip())
        if m:
            out[m.group(1)] = m.group(2).replace(":", "").lower()
    return out


def parse_ccerts(data: bytes) -> frozenset[str]:
    """The fleet's ccerts (``AB:.. OK``): every node's certificate fingerprint, sha256 hex."""
    found = set()
    for raw in data.decode("ascii", "replace").splitlines():
        fp, _, verdict = raw.strip().partition(" ")
        if verdict == "OK" and len(fp) == 95:
            found.add(fp.replace(":", "").lower())
    return frozenset(found)


class FleetView:
    """Homes, pinned fingerprints and the nodes' certificates, as the last tick left them."""

    def __init__(self, cfg: Config) -> None:
        fleet_dir = cfg.fleet_dir or os.path.join(cfg.root, "fleet")
        self.peers_pem = os.path.join(fleet_dir, "peers.pem")
        self._homes = _Stat(os.path.join(cfg.root, "current", "dovecot", "proxy.imap"), parse_proxy_passdb, {})
        self._pins = _Stat(os.path.join(fleet_dir, "tls_policy"), parse_tls_policy, {})
        self._nodes = _Stat(os.path.join(fleet_dir, "ccerts"), parse_ccerts, frozenset())

    def home_of(self, domain: str) -> Home | None:
        """The home of ``domain`` when it is another node; None: counted here."""
        address = self._homes.get().get(domain)
        if address is None:
            return None
        return Home(address, self._pins.get().get(address))

    def node_fingerprints(self) -> frozenset[str]:
        return frozenset(self._nodes.get())


def fingerprint(sock: ssl.SSLSocket) -> str | None:
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


class _TlsFiles:
    """An SSL context rebuilt when one of its files changes (a renewed certificate, a new node)."""

    def __init__(self, build: Callable[[], ssl.SSLContext], paths: list[str]) -> None:
        self.build, self.paths = build, paths
        self._key: tuple[Any, ...] | None = None
        self._ctx: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        key = tuple(_stat_key(p) for p in self.paths)
        with self._lock:
            if self._ctx is None or key != self._key:
                self._ctx, self._key = self.build(), key
            return self._ctx


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def own_fingerprint(pem: bytes) -> str | None:
    """The sha256 hex of the first certificate of a PEM file (the leaf of a full chain)."""
    text = pem.decode("ascii", "replace")
    start, end = text.find(ssl.PEM_HEADER), text.find(ssl.PEM_FOOTER)
    if start < 0 or end < start:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(text[start : end + len(ssl.PEM_FOOTER)])
    except ValueError:
        return None
    return hashlib.sha256(der).hexdigest()


class ForwardFailed(Exception):
    """The home gave no usable verdict (the message says why, for the log)."""


class _Link:
    """One TLS connection to a home, kept for the life of the Postfix connection that needs it."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.rfile: BufferedIOBase = sock.makefile("rb")

    def close(self) -> None:
        for closing in (self.rfile.close, self.sock.close):
            try:
                closing()
            except OSError:
                pass

    def exchange(self, request: bytes) -> str:
        self.sock.sendall(request)
        action, size = None, 0
        while True:
            line = self.rfile.readline(MAX_ANSWER_BYTES)
            size += len(line)
            if not line or size > MAX_ANSWER_BYTES:
                raise ConnectionAbortedError("the home closed the connection")
            text = line.decode("ascii", "replace").rstrip("\r\n")
            if not text:
                break
            if text.startswith("action=") and action is None:
                action = text[len("action=") :]
        if action is None or not _ACTION.match(action):
            raise ForwardFailed(f"the home answered no valid action ({(action or '')[:60]!r})")
        return action


class Forwarder:
    """Asks a login's home for the verdict (see the module docstring)."""

    def __init__(self, cfg: Config, view: FleetView, log: logging.Logger, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.view, self.log, self.clock = cfg, view, log, clock
        self.port = cfg.fleet_policy_port
        self.timeout = cfg.fleet_policy_timeout
        self._down: dict[str, float] = {}
        self._tls = _TlsFiles(self._client_context, [cfg.fleet_tls_cert, cfg.fleet_tls_key])

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The home is pinned by its published fingerprint (checked after the handshake, before a
        # request is sent), as Postfix's relay pins it: no CA and no host name take part.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(self.cfg.fleet_tls_cert, self.cfg.fleet_tls_key)
        return ctx

    def home_of(self, login: str) -> Home | None:
        return self.view.home_of(login.rpartition("@")[2])

    def ask(self, home: Home, attrs: dict[str, str], conn: dict[str, Any]) -> str:
        """The home's action for one request; ForwardFailed when there is none to have."""
        until = self._down.get(home.address)
        if until is not None and self.clock() < until:
            raise ForwardFailed(f"it failed less than {RETRY_AFTER:.0f} s ago")
        request = "".join(f"{k}={attrs[k]}\n" for k in FORWARDED if k in attrs) + "\n"
        links: dict[str, _Link] = conn.setdefault("homes", {})
        try:
            return self._exchange(home, links, request.encode())
        except (OSError, ssl.SSLError, ForwardFailed) as e:
            self._down[home.address] = self.clock() + RETRY_AFTER
            stale = links.pop(home.address, None)
            if stale is not None:
                stale.close()
            raise ForwardFailed(str(e) or type(e).__name__) from None

    def _exchange(self, home: Home, links: dict[str, _Link], request: bytes) -> str:
        link = links.get(home.address)
        if link is not None:
            try:
                return link.exchange(request)
            except (
                ConnectionAbortedError,
                ConnectionResetError,
                BrokenPipeError,
                ssl.SSLEOFError,
                ssl.SSLZeroReturnError,
            ):
                # The home closed a connection that idled (or restarted): the request never
                # reached it, so it is asked again once on a new connection.
                link.close()
                del links[home.address]
        link = self._connect(home)
        links[home.address] = link
        return link.exchange(request)

    def _connect(self, home: Home) -> _Link:
        if home.fingerprint is None:
            raise ForwardFailed("its certificate is not published in the signed state yet")
        raw = socket.create_connection((home.address, self.port), timeout=self.timeout)
        try:
            sock = self._tls.get().wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        if fingerprint(sock) != home.fingerprint:
            sock.close()
            raise ForwardFailed("its certificate is not the one the signed state publishes")
        return _Link(sock)

    def close(self, conn: dict[str, Any]) -> None:
        for link in conn.pop("homes", {}).values():
            link.close()


# --- the home's side ---------------------------------------------------------------------------


class _FleetHandler(socketserver.BaseRequestHandler):
    server: FleetServer

    def handle(self) -> None:
        srv = self.server
        peer = str(self.client_address[0]).removeprefix("::ffff:")  # an IPv4 peer on the dual-stack socket
        self.request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock = srv.context().wrap_socket(self.request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            srv.log.warning(f"policy: refused a fleet connection from {peer}: {_short(e)}")
            return
        try:
            if fingerprint(sock) not in srv.view.node_fingerprints():
                srv.log.warning(f"policy: refused a fleet connection from {peer}: its certificate is not a node's")
                return
            sock.settimeout(IDLE_TIMEOUT)
            with sock.makefile("rb") as rfile, sock.makefile("wb") as wfile:
                srv.serve(rfile, wfile)
        except (OSError, ssl.SSLError):
            return  # the peer went away (or idled out)
        finally:
            sock.close()


def _short(e: BaseException) -> str:
    return (getattr(e, "reason", None) or str(e) or type(e).__name__)[:200]


class FleetServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The policy service's listener for the other nodes (dual-stack where the host has IPv6)."""

    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET6

    def __init__(
        self,
        port: int,
        context: Callable[[], ssl.SSLContext],
        view: FleetView,
        serve: Callable[[BufferedIOBase, BufferedIOBase], None],
        log: logging.Logger,
    ) -> None:
        self.context, self.view, self.serve, self.log = context, view, serve, log
        try:
            super().__init__(("::", port), _FleetHandler)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            self.address_family = socket.AF_INET
            super().__init__(("0.0.0.0", port), _FleetHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class FleetListener:
    """Runs the FleetServer while the fleet has published certificates (checked every ``interval``)."""

    def __init__(
        self, cfg: Config, view: FleetView, serve: Callable[[BufferedIOBase, BufferedIOBase], None], log: logging.Logger
    ):
        self.cfg, self.view, self.serve, self.log = cfg, view, serve, log
        self.server: FleetServer | None = None
        self._thread: threading.Thread | None = None
        self._tls = _TlsFiles(self._server_context, [cfg.fleet_tls_cert, cfg.fleet_tls_key, view.peers_pem])
        self._own = _Stat(cfg.fleet_tls_cert, own_fingerprint, None)
        self._error: str | None = None

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cfg.fleet_tls_cert, self.cfg.fleet_tls_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.view.peers_pem)
        # A node's own certificate in peers.pem is a trust anchor even when a CA issued it; the
        # fingerprint check after the handshake is what admits a node.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx

    def refresh(self) -> None:
        # Only while another node could ask: a node alone (or outside a fleet) opens no port.
        wanted = bool(self.view.node_fingerprints() - {self._own.get()})
        if wanted and self.server is None:
            try:
                self._tls.get()  # a missing key or CA file is logged here, not once per connection
                self.server = FleetServer(self.cfg.fleet_policy_port, self._tls.get, self.view, self.serve, self.log)
            except (OSError, ssl.SSLError) as e:
                error = f"policy: cannot listen for the fleet on port {self.cfg.fleet_policy_port}: {_short(e)}"
                if error != self._error:  # retried every few seconds: said once, until it changes
                    self.log.error(error)
                self._error = error
                return
            self._error = None
            self._thread = threading.Thread(
                target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True
            )
            self._thread.start()
            self.log.info(f"policy: listening for the fleet's nodes on port {self.cfg.fleet_policy_port} (TLS)")
        elif not wanted and self.server is not None:
            self.close()

    def run(self, stop: threading.Event, interval: float = 5.0) -> None:
        while not stop.is_set():
            self.refresh()
            stop.wait(interval)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
