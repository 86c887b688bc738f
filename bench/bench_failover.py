"""Replicas and failover: replication lag, failover-to-IMAP time, and what replication costs the home.

    python -m bench.bench_failover [--seconds 30] [--rate 5] [--burst 200] [--rounds 2] [--skip lag,rate,failover]

A real fleet on this machine (tests/helpers/fleetworld.py: `mailstate serve` and three nodes in
network namespaces, each with its own Postfix and Dovecot), every node in follow mode
(``pi_pull.py --follow``, as the bundle runs it). plain.test and rep.test are homed on n1;
rep.test has its replica on n2. Parts (each prints its figures; ratios against a baseline
measured in the same run):

- ``lag``: ``--rate`` deliveries a second to n1's port 25 for a rep.test mailbox for
  ``--seconds``; per message, the time from its file appearing in n1's Maildir to its file
  appearing in n2's (both directories polled every 20 ms): p50/p99 (target: p50 <= 5 s, p99 <= 30 s).
- ``rate``: ``--burst`` messages as fast as 4 SMTP clients send them to n1, for plain.test (no
  replica) and for rep.test (replica on n2), alternating ``--rounds`` times; messages a second
  until all are in n1's Maildirs; the ratio with/without (target: >= 0.8).
- ``failover``: n1's services and its follower stop; failover-node n1 is called; the time from
  its answer until an IMAP login + SELECT on n2 (the new home) sees every replicated message, and
  the same through n3 (proxied to n2); target: <= 5 s.

Needs root, Postfix, Dovecot and iproute2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import isolate_env, p50

isolate_env()

from tests.helpers.fleetworld import PASSWORD, World, fleet_world, wait  # noqa: E402
from tests.helpers.netns import FleetNode  # noqa: E402

REP, PLAIN = "ana@rep.test", "bob@plain.test"


def say(msg: str) -> None:
    print(f"[bench_failover] {msg}", file=sys.stderr, flush=True)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def send(node: FleetNode, to: str, subject: str) -> None:
    msg = f"From: bench@outside.test\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@bench>\r\n\r\nx\r\n"
    with contextlib.closing(smtplib.SMTP(node.address, 25, timeout=30)) as s:
        s.sendmail("bench@outside.test", [to], msg)


class Seen:
    """First time each message (by Subject) shows up as a file in a node's Maildirs of a domain."""

    def __init__(self, node: FleetNode, domain: str) -> None:
        self.base = node.mail_root / domain
        self.names: dict[str, str] = {}  # file base name -> subject
        self.at: dict[str, float] = {}  # subject -> first seen

    def poll(self) -> None:
        now = time.monotonic()
        for box in self.base.glob("*/Maildir"):
            for sub in ("new", "cur"):
                try:
                    entries = list(os.scandir(box / sub))
                except OSError:
                    continue
                for entry in entries:
                    base = entry.name.split(":2,", 1)[0]
                    if base in self.names:
                        continue
                    subject = _subject(Path(entry.path))
                    if subject is not None:
                        self.names[base] = subject
                        self.at.setdefault(subject, now)


def _subject(path: Path) -> str | None:
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("subject:"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():
                    return ""
    except OSError:  # renamed (new/ -> cur/) while we looked: seen at the next poll
        return None
    return ""


def bench_lag(w: World, seconds: float, rate: float) -> None:
    n1, n2 = w.nodes["n1"], w.nodes["n2"]
    home, replica = Seen(n1, "rep.test"), Seen(n2, "rep.test")
    count = int(seconds * rate)
    subjects = [f"lag-{i}" for i in range(count)]
    done = threading.Event()

    def sender() -> None:
        start = time.monotonic()
        for i, subject in enumerate(subjects):
            pause = start + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            send(n1, REP, subject)
        done.set()

    threading.Thread(target=sender, daemon=True).start()
    deadline = time.monotonic() + seconds + 120
    while time.monotonic() < deadline:
        home.poll()
        replica.poll()
        if done.is_set() and all(s in replica.at for s in subjects):
            break
        time.sleep(0.02)
    missing = [s for s in subjects if s not in replica.at or s not in home.at]
    lags = [replica.at[s] - home.at[s] for s in subjects if s in replica.at and s in home.at]
    print(f"\n## replication lag, {rate:g} deliveries/s to the home for {seconds:g} s ({count} messages)")
    print(f"home file -> replica file   p50 {p50(lags):6.2f} s   p99 {p99(lags):6.2f} s   max {max(lags):6.2f} s")
    print(f"missing on the replica after 120 s: {len(missing)}")
    ok = p50(lags) <= 5 and p99(lags) <= 30 and not missing
    print(f"target p50 <= 5 s, p99 <= 30 s: {'ok' if ok else 'OVER'}")


def burst(node: FleetNode, to: str, domain: str, n: int, tag: str) -> float:
    seen = Seen(node, domain)
    seen.poll()
    before = len(seen.at)
    subjects = [f"{tag}-{i}" for i in range(n)]
    t = time.monotonic()
    threads = [
        threading.Thread(target=lambda part=subjects[k::4]: [send(node, to, s) for s in part], daemon=True)
        for k in range(4)
    ]
    for thread in threads:
        thread.start()
    while len(seen.at) < before + n:
        if time.monotonic() - t > 300:
            raise RuntimeError(f"{tag}: only {len(seen.at) - before} of {n} delivered")
        time.sleep(0.02)
        seen.poll()
    for thread in threads:
        thread.join()
    return n / (time.monotonic() - t)


def bench_rate(w: World, n: int, rounds: int) -> None:
    n1 = w.nodes["n1"]
    plain, rep = [], []
    for r in range(rounds):
        plain.append(burst(n1, PLAIN, "plain.test", n, f"plain-{r}"))
        rep.append(burst(n1, REP, "rep.test", n, f"rep-{r}"))
    without, with_ = sum(plain) / len(plain), sum(rep) / len(rep)
    print(f"\n## the home's delivery rate, {n} messages from 4 SMTP clients, {rounds} rounds alternating")
    print(f"without a replica (plain.test)  {without:6.1f} msg/s   rounds {', '.join(f'{x:.1f}' for x in plain)}")
    print(f"with a replica (rep.test)       {with_:6.1f} msg/s   rounds {', '.join(f'{x:.1f}' for x in rep)}")
    ratio = with_ / without
    print(f"ratio {ratio:.2f}x (target >= 0.8x): {'ok' if ratio >= 0.8 else 'UNDER'}")


def imap_sees(node: FleetNode, count: int) -> bool:
    try:
        m = node.imap(REP, PASSWORD)
    except Exception:
        return False
    try:
        typ, data = m.select("INBOX")
        return typ == "OK" and int(data[0] or 0) >= count
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            m.logout()


def bench_failover(w: World) -> None:
    n1, n2, n3 = (w.nodes[n] for n in ("n1", "n2", "n3"))
    wait("the replica to catch up", lambda: len(list(n2.maildir_messages("rep.test"))) >= len(
        list(n1.maildir_messages("rep.test"))), timeout=120)  # fmt: skip
    count = len(n2.maildir_messages("rep.test"))
    w.followers[0].terminate()  # n1's follower (started first)
    w.followers[0].wait(10)
    n1.stop()
    t = time.monotonic()
    out = w.call("failover-node", {"name": "n1"})
    answered = time.monotonic()
    assert out["moved"] == ["rep.test"], out
    wait("IMAP on the new home", lambda: imap_sees(n2, count), timeout=60, interval=0.05)
    on_home = time.monotonic()
    wait("IMAP through n3", lambda: imap_sees(n3, count), timeout=60, interval=0.05)
    via_n3 = time.monotonic()
    print(f"\n## failover-node n1 (follow mode), {count} replicated messages in rep.test")
    print(f"failover-node answered in             {answered - t:6.2f} s")
    print(f"answer -> IMAP on the new home (n2)   {on_home - answered:6.2f} s")
    print(f"answer -> IMAP through n3 (proxied)   {via_n3 - answered:6.2f} s")
    print(f"target <= 5 s: {'ok' if on_home - answered <= 5 else 'OVER'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=5)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: lag,rate,failover")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp, fleet_world(["n1", "n2", "n3"], Path(tmp)) as w:
        for domain, user in (("rep.test", REP), ("plain.test", PLAIN)):
            w.call("link-domain", {"domain": domain, "project_id": 42}, 201)
            w.call("enable-email", {"domain": domain, "node": "n1"})
            w.call("add-user", {"email": user, "password": PASSWORD}, 201)
        w.call("set-replica", {"domain": "rep.test", "node": "n2"})
        w.settle()
        for name in ("n1", "n2", "n3"):
            w.followers.append(w.nodes[name].follow())
        time.sleep(3)  # their first ticks
        say(f"fleet up in {time.perf_counter() - t:.0f} s")
        if "lag" not in skip:
            bench_lag(w, args.seconds, args.rate)
        if "rate" not in skip:
            bench_rate(w, args.burst, args.rounds)
        if "failover" not in skip:
            bench_failover(w)
    print(f"\n# whole bench: {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
