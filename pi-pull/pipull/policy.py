"""The outbound policy service: Postfix's check_policy_service for the submission ports.

``pi_pull.py policy --config FILE`` (the bundle's pi-pull-policy.service) listens on ``[policy]
listen`` (``127.0.0.1:10040``) and speaks Postfix's policy delegation protocol
(SMTPD_POLICY_README: ``name=value`` lines and an empty line; the answer ``action=...``). The
bundle's submission services ask it at RCPT TO (smtpd_recipient_restrictions) and at the end of
the message (smtpd_end_of_data_restrictions). Per SASL login (the mailbox address):

- a mailbox the state suspends, or one this node suspended by itself: ``554 5.7.1`` at RCPT TO,
  so the message gets no recipient and its DATA fails too; its IMAP and SMTP logins still work;
- past ``send_per_hour`` recipients in the last hour, or ``send_per_day`` in the last 24 hours:
  ``450 4.7.1`` with a sentence saying which limit, per recipient (a message to three
  recipients counts three; the recipients of a message still being sent count too);
- past ``auto_suspend_factor`` x a limit in that window, counting the recipients refused for a
  limit too (a hijacked mailbox keeps trying): suspended on this node at once (554), and the
  report tells the server, which records it in the state;
- at END-OF-MESSAGE the message's accepted recipients (``recipient_count``) and the message are
  counted, in the login's current minute.

The counts are in SQLite (``[policy] db``, WAL), per login and minute, so they survive a restart
of the service; what the next report should carry is published in ``pending.json`` (Publisher),
so a tick never opens the counts. A mailbox's limits and token come from ``<root>/policy`` (pipull/sending.py); a
new token (a suspend or a resume in the state) starts the login's counts afresh and ends a
suspension of this node's own. Why not Debian's policyd-rate-limit: it counts but cannot
suspend, answers every refusal the same way (no 4xx/5xx split, no sentence per limit), takes
its limits from its own config (a restart per change) and reports nothing back; this service
reads the signed state's limits as they go live and counts what the server needs.

In a fleet, a submission is authenticated and sent by whichever node the client reached, and
every node would count only its own share: a node that is not the home of the login's domain
asks the home's policy service instead, over TLS between the fleet's nodes, so the home holds the
one count (pipull/policyfleet.py, which also says what happens while the home does not answer).
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedIOBase
from typing import Any

from .config import Config
from .errors import Refused
from .fsutil import atomic_write
from .policyfleet import FleetListener, FleetView, Forwarder, ForwardFailed
from .rules import is_domain, is_local_part
from .sending import Defaults, DomainSending, parse_defaults, parse_domain

DUNNO = "DUNNO"
PENDING = "pending.json"
ACKED = "acked"
MAX_REQUEST_BYTES = 64 * 1024
REPORT_MAX = 5000
HOUR, DAY = 60, 1440  # minutes

SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    login TEXT NOT NULL,
    minute INTEGER NOT NULL,
    messages INTEGER NOT NULL DEFAULT 0,
    recipients INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (login, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logins (
    login TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    suspended_at INTEGER,
    last_minute INTEGER NOT NULL,
    reported TEXT
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class LoginPolicy:
    """What the state says about one login: its limits, auto-suspend factor and token."""

    per_hour: int | None
    per_day: int | None
    factor: float | None
    token: str  # "" | "ok <stamp>" | "suspended <stamp>"

    @property
    def suspended(self) -> bool:
        return self.token.startswith("suspended ")


class PolicyFiles:
    """``<root>/policy`` as the sync left it; each file parsed once per change (stat-keyed)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._cache: dict[str, tuple[tuple[int, int, int], Any]] = {}
        self._lock = threading.Lock()

    def _load(self, path: str, parse: Callable[[bytes], Any], empty: Any) -> Any:
        try:
            st = os.stat(path)
        except OSError:
            return empty
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            found = self._cache.get(path)
            if found is not None and found[0] == key:
                return found[1]
        try:
            with open(path, "rb") as fh:
                value = parse(fh.read(1 << 20))
        except (OSError, Refused):
            value = empty  # the sync validated it; a file that went bad is no limit rather than an outage
        with self._lock:
            self._cache[path] = (key, value)
        return value

    def lookup(self, login: str) -> LoginPolicy:
        local, _, domain = login.rpartition("@")
        defaults: Defaults = self._load(os.path.join(self.dir, "defaults"), parse_defaults, Defaults())
        dom = DomainSending()
        if is_domain(domain) and is_local_part(local):
            dom = self._load(
                os.path.join(self.dir, "domains", domain), lambda data: parse_domain(domain, data), DomainSending()
            )
        return LoginPolicy(
            dom.per_hour if dom.per_hour is not None else defaults.per_hour,
            dom.per_day if dom.per_day is not None else defaults.per_day,
            defaults.factor,
            dom.tokens.get(local, ""),
        )


@dataclass(frozen=True)
class Window:
    """A login's figures over the last hour and day (counted since its token last changed)."""

    messages_hour: int = 0
    recipients_hour: int = 0
    refused_hour: int = 0
    messages_day: int = 0
    recipients_day: int = 0
    refused_day: int = 0


class Counter:
    """The counts (see the module docstring). Thread-safe; ``clock`` is the tests' seam."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._pruned = 0
        # Told after a count or a suspension changed (the Publisher wakes up).
        self.on_change: Callable[[], None] = lambda: None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def minute(self) -> int:
        return int(self.clock() // 60)

    def _login(self, login: str, token: str, minute: int) -> tuple[int | None, bool]:
        """(suspended_at, fresh) for the login, its counts started afresh when its token changed. Lock held."""
        row = self._conn.execute("SELECT token, suspended_at FROM logins WHERE login = ?", (login,)).fetchone()
        if row is not None and row[0] == token:
            return row[1], False
        self._conn.execute("DELETE FROM counts WHERE login = ?", (login,))
        self._conn.execute(
            "INSERT OR REPLACE INTO logins (login, token, suspended_at, last_minute, reported) VALUES (?, ?, NULL, ?, NULL)",
            (login, token, minute),
        )
        return None, True

    def _window(self, login: str, minute: int) -> Window:
        row = self._conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN minute > ? THEN messages END), 0),"
            " COALESCE(SUM(CASE WHEN minute > ? THEN recipients END), 0),"
            " COALESCE(SUM(CASE WHEN minute > ? THEN refused END), 0),"
            " COALESCE(SUM(messages), 0), COALESCE(SUM(recipients), 0), COALESCE(SUM(refused), 0)"
            " FROM counts WHERE login = ? AND minute > ?",
            (minute - HOUR, minute - HOUR, minute - HOUR, login, minute - DAY),
        ).fetchone()
        return Window(*(int(v) for v in row))

    def _add(self, login: str, minute: int, messages: int, recipients: int, refused: int) -> None:
        self._conn.execute(
            "INSERT INTO counts (login, minute, messages, recipients, refused) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(login, minute) DO UPDATE SET messages = messages + excluded.messages,"
            " recipients = recipients + excluded.recipients, refused = refused + excluded.refused",
            (login, minute, messages, recipients, refused),
        )
        self._conn.execute("UPDATE logins SET last_minute = ? WHERE login = ?", (minute, login))

    def rcpt(self, login: str, policy: LoginPolicy, pending: int) -> str:
        """The answer to one RCPT TO of ``login`` (``pending``: this message's recipients so far)."""
        minute = self.minute()
        with self._lock:
            suspended_at, _ = self._login(login, policy.token, minute)
            if policy.suspended or suspended_at is not None:
                return "554 5.7.1 Sending is suspended for this mailbox; it still receives mail. Ask your provider to resume it."
            if policy.per_hour is None and policy.per_day is None:
                return DUNNO
            w = self._window(login, minute)
            over = _over(policy, w.recipients_hour + pending + 1, w.recipients_day + pending + 1)
            if over is None:
                return DUNNO
            self._add(login, minute, 0, 0, 1)
            self.on_change()
            if _past_factor(
                policy, w.recipients_hour + w.refused_hour + pending + 1, w.recipients_day + w.refused_day + pending + 1
            ):
                self._conn.execute("UPDATE logins SET suspended_at = ? WHERE login = ?", (int(self.clock()), login))
                return (
                    "554 5.7.1 Sending is suspended for this mailbox: it tried to send far past its limit "
                    f"({over}). Ask your provider to resume it."
                )
        return f"450 4.7.1 Sending limit reached: this mailbox may send to {over}; try again later."

    def sent(self, login: str, policy: LoginPolicy, recipients: int) -> None:
        """A message of ``login`` went through with ``recipients`` recipients (END-OF-MESSAGE)."""
        minute = self.minute()
        with self._lock:
            self._login(login, policy.token, minute)
            self._add(login, minute, 1, max(0, recipients), 0)
            self.on_change()
            if minute - self._pruned > 60:
                self._conn.execute("DELETE FROM counts WHERE minute <= ?", (minute - DAY,))
                self._pruned = minute

    # --- what the node reports ---------------------------------------------------------------

    def report_entries(self, files: PolicyFiles) -> list[dict[str, Any]]:
        """Each login whose figures or state changed since ``reported()`` last marked them,
        busiest first (at most REPORT_MAX)."""
        minute = self.minute()
        out = []
        with self._lock:
            rows = self._conn.execute(
                "SELECT login, token, suspended_at, reported FROM logins WHERE last_minute > ? OR reported IS NOT NULL"
                " OR suspended_at IS NOT NULL",
                (minute - DAY - 1,),
            ).fetchall()
            for login, token, suspended_at, reported in rows:
                policy = files.lookup(login)
                fresh = token != policy.token
                w = Window() if fresh else self._window(login, minute)
                entry = {
                    "login": login,
                    "state": _state(policy, w, None if fresh else suspended_at),
                    "token": policy.token,
                    "messages_hour": w.messages_hour,
                    "recipients_hour": w.recipients_hour,
                    "messages_day": w.messages_day,
                    "recipients_day": w.recipients_day,
                    "refused_hour": w.refused_hour,
                }
                if json.dumps(entry, sort_keys=True) != reported:
                    out.append(entry)
        out.sort(key=lambda e: (-int(e["recipients_day"]), str(e["login"])))
        return out[:REPORT_MAX]

    def reported(self, entries: list[dict[str, Any]]) -> None:
        """The server accepted a report carrying ``entries``."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                for e in entries:
                    idle = e["state"] == "ok" and not e["messages_day"] and not e["refused_hour"]
                    self._conn.execute(
                        "UPDATE logins SET reported = ? WHERE login = ?",
                        (None if idle else json.dumps(e, sort_keys=True), e["login"]),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise


class Publisher:
    """What the next report should carry, kept in ``<policy dir>/pending.json`` by the service,
    so a tick reads one small file and never opens the counts (a no-op tick writes nothing):

        pending.json   {"seq": N, "entries": [...]}: the logins whose figures changed since the
                       server last accepted them (Counter.report_entries); rewritten soon after a
                       count changes, and every `interval` seconds (the windows move)
        acked          N, written by a tick whose report carrying pending.json N was accepted;
                       the service then marks those entries reported and publishes again"""

    def __init__(self, counter: Counter, files: PolicyFiles, directory: str, log: logging.Logger) -> None:
        self.counter = counter
        self.files = files
        self.path = os.path.join(directory, PENDING)
        self.acked = os.path.join(directory, ACKED)
        self.log = log
        self.wake = threading.Event()
        counter.on_change = self.wake.set

    def run(self, stop: threading.Event, interval: float = 30.0, settle: float = 0.05) -> None:
        while not stop.is_set():
            if self.wake.wait(interval):
                stop.wait(settle)  # a message's requests come together: publish once for them
            self.wake.clear()
            try:
                self.round()
            except Exception as e:  # the next change or interval tries again
                self.log.error(f"policy: could not publish the figures to report: {type(e).__name__}: {e}")

    def round(self) -> bool:
        """Take an acknowledgement, then publish what is to report; True when the file changed."""
        current = read_pending(self.path)
        if current is not None and _read_int(self.acked) == current["seq"] and current["entries"]:
            self.counter.reported(current["entries"])
        entries = self.counter.report_entries(self.files)
        if (current["entries"] if current is not None else []) == entries:
            return False  # nothing new (and no file while there never was anything to report)
        seq = (current["seq"] if current is not None else 0) + 1
        atomic_write(self.path, json.dumps({"seq": seq, "entries": entries}, sort_keys=True).encode())
        return True


def read_pending(path: str) -> dict[str, Any] | None:
    """pending.json as the Publisher wrote it, or None (missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read(64 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or not isinstance(data.get("entries"), list):
        return None
    return data


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read(32).strip())
    except (OSError, ValueError):
        return None


def _over(policy: LoginPolicy, hour: int, day: int) -> str | None:
    """Which limit ``hour`` / ``day`` recipients pass, in words; None: neither."""
    if policy.per_hour is not None and hour > policy.per_hour:
        return f"{policy.per_hour} recipient(s) an hour"
    if policy.per_day is not None and day > policy.per_day:
        return f"{policy.per_day} recipient(s) a day"
    return None


def _past_factor(policy: LoginPolicy, hour: int, day: int) -> bool:
    f = policy.factor
    if f is None:
        return False
    return (policy.per_hour is not None and hour > f * policy.per_hour) or (
        policy.per_day is not None and day > f * policy.per_day
    )


def _state(policy: LoginPolicy, w: Window, suspended_at: int | None) -> str:
    if policy.suspended or suspended_at is not None:
        return "suspended"
    full = (policy.per_hour is not None and w.recipients_hour >= policy.per_hour) or (
        policy.per_day is not None and w.recipients_day >= policy.per_day
    )
    return "limited" if full or w.refused_hour else "ok"


# --- the protocol ------------------------------------------------------------------------------


class Policy:
    """Answers policy requests (one ``dict`` of attributes each); ``pending`` is per connection.
    With a ``fleet`` Forwarder, a login homed on another node is answered by its home."""

    def __init__(
        self, files: PolicyFiles, counter: Counter, log: logging.Logger, fleet: Forwarder | None = None
    ) -> None:
        self.files = files
        self.counter = counter
        self.log = log
        self.fleet = fleet

    def answer(self, attrs: dict[str, str], conn: dict[str, Any], forwarded: bool = False) -> str:
        """The action for one request; ``forwarded``: another node asked (never passed on again)."""
        login = attrs.get("sasl_username", "").strip().lower()
        if attrs.get("request") != "smtpd_access_policy" or not login or "@" not in login:
            return DUNNO  # unauthenticated: the submission services refuse it by their own rules
        policy = self.files.lookup(login)
        state = attrs.get("protocol_state", "").upper()
        if self.fleet is not None and not forwarded and state in ("RCPT", "END-OF-MESSAGE"):
            verdict = self._at_home(login, policy, state, attrs, conn)
            if verdict is not None:
                return verdict
        return self._here(login, policy, state, attrs, conn)

    def _at_home(
        self, login: str, policy: LoginPolicy, state: str, attrs: dict[str, str], conn: dict[str, Any]
    ) -> str | None:
        """The verdict of the login's home when it is another node; None: counted here."""
        assert self.fleet is not None
        home = self.fleet.home_of(login)
        if home is None:
            return None
        if policy.suspended and state == "RCPT":
            return self._here(login, policy, state, attrs, conn)  # the state says so: no need to ask
        try:
            action = self.fleet.ask(home, attrs, conn)
        except ForwardFailed as e:
            self.log.warning(f"policy: {login}: the home {home.address} did not answer ({e}); counted on this node")
            return None
        if action != DUNNO:
            self.log.warning(f"policy: {login}: {action} (the home {home.address})")
        return action

    def done(self, conn: dict[str, Any]) -> None:
        """Postfix closed the connection ``conn`` belonged to."""
        if self.fleet is not None:
            self.fleet.close(conn)

    def _here(self, login: str, policy: LoginPolicy, state: str, attrs: dict[str, str], conn: dict[str, Any]) -> str:
        instance = attrs.get("instance", "")
        if conn.get("instance") != instance:
            conn["instance"], conn["pending"] = instance, 0  # a new message: the last one is done or aborted
        if state == "RCPT":
            action = self.counter.rcpt(login, policy, int(conn["pending"]))
            if action == DUNNO:
                conn["pending"] = int(conn["pending"]) + 1
            else:
                self.log.warning(f"policy: {login}: {action}")
            return action
        if state == "END-OF-MESSAGE":
            try:
                count = int(attrs.get("recipient_count", "0") or 0)
            except ValueError:
                count = int(conn["pending"])
            self.counter.sent(login, policy, count)
            conn["instance"], conn["pending"] = None, 0
        return DUNNO


def serve_requests(policy: Policy, rfile: BufferedIOBase, wfile: BufferedIOBase, forwarded: bool = False) -> None:
    """Answer one connection's requests until it closes (Postfix's, or another node's when ``forwarded``)."""
    conn: dict[str, Any] = {"instance": None, "pending": 0}
    attrs: dict[str, str] = {}
    size = 0
    try:
        while True:
            line = rfile.readline(MAX_REQUEST_BYTES)
            if not line:
                return
            size += len(line)
            if size > MAX_REQUEST_BYTES:
                return  # not Postfix
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text:
                name, sep, value = text.partition("=")
                if sep:
                    attrs.setdefault(name, value)
                continue
            try:
                action = policy.answer(attrs, conn, forwarded)
            except Exception as e:  # a broken request or database: tempfail, never a silent permit
                policy.log.error(f"policy: request failed: {type(e).__name__}: {e}")
                action = "451 4.3.0 The sending policy could not be checked; try again later."
            wfile.write(f"action={action}\n\n".encode())
            wfile.flush()
            attrs, size = {}, 0
    finally:
        policy.done(conn)


class _Handler(socketserver.StreamRequestHandler):
    server: PolicyServer

    def handle(self) -> None:
        serve_requests(self.server.policy, self.rfile, self.wfile)


class PolicyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], policy: Policy) -> None:
        self.policy = policy
        super().__init__(address, _Handler)


def listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"[policy] listen must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def open_policy(cfg: Config, log: logging.Logger, view: FleetView | None = None) -> Policy:
    """The service's Policy; with a FleetView, logins homed on another node are asked there."""
    fleet = Forwarder(cfg, view, log) if view is not None else None
    return Policy(PolicyFiles(os.path.join(cfg.root, "policy")), Counter(cfg.policy_db), log, fleet)


def serve(cfg: Config, log: logging.Logger, stop: threading.Event | None = None) -> int:
    """Run the policy service, and its Publisher, until SIGTERM (or ``stop``)."""
    stop = stop or threading.Event()
    view = FleetView(cfg)
    policy = open_policy(cfg, log, view)
    publisher = Publisher(policy.counter, policy.files, policy.files.dir, log)
    server = PolicyServer(listen_address(cfg.policy_listen), policy)
    fleet = FleetListener(cfg, view, lambda rfile, wfile: serve_requests(policy, rfile, wfile, True), log)
    log.info(f"policy: listening on {cfg.policy_listen} (counts in {cfg.policy_db})")
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True),
        threading.Thread(target=publisher.run, args=(stop,), daemon=True),
        threading.Thread(target=fleet.run, args=(stop,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        threads[2].join(timeout=6)  # its next refresh would start the listener again
        fleet.close()
        publisher.wake.set()
        threads[1].join(timeout=5)
        policy.counter.close()
    return 0
