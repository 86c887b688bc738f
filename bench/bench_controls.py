"""Platform controls: the nodes' policy check, what webhooks cost a write, how fast a backlog drains.

    python -m bench.bench_controls                      # ~1 min
    python -m bench.bench_controls --writes 500 --rate 100 --backlog 2000

1. The policy check (pi-pull/pipull/policy.py) as Postfix asks it: the built pi_pull.py runs
   `policy` as its own process on loopback (a real SQLite counts file under a temp root, limits
   from a domain fragment); one persistent connection, as an smtpd process keeps. Per message:
   3 RCPT TO (each: the login's token, the hour and day windows, the answer) and one
   END-OF-MESSAGE (the count written). Printed: p50/p90/p99 of a request's round trip, RCPT and
   END-OF-MESSAGE apart, against a baseline in the same run: the same requests for a login
   without limits (no window read).
1b. The policy check in a fleet: two policy processes, the home of example.com and another node
   whose live release names that home (proxy.imap, its fingerprint pinned in tls_policy); the
   same login's requests asked on the home (counted there) and on the other node (forwarded to
   the home over the fleet's mutual TLS, one kept connection), alternating. Printed: p50/p90/p99
   of each, and forwarded/local.
2. Writes with webhooks: one store (in process, like the server), writes paced at `--rate` a
   second, each making one event (remove-user and restore-user in turn: mailbox.deleted,
   mailbox.restored). Run A: no webhooks (nothing listening to commits). Run B: one webhook that
   wants every event, a local HTTP receiver, the commit listener, the events thread and the
   dispatcher running; the receiver is a process of its own, as a real one is. A and B alternate
   (`--rounds` times A B) so the machine's load hits both; printed: the
   write p50 of each and B/A (target: within 10 %), and how many deliveries B made.
3. Backlog: `--backlog` events in the outbox for one webhook, then the dispatcher starts; the
   time until the receiver has all of them. Printed: deliveries a second (target >= 50), and the
   same for 4 webhooks (4 receivers) at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

isolate_env()

from mailstate.state.datadir import init_data_dir, open_store  # noqa: E402
from mailstate.state.delivery import Dispatcher  # noqa: E402
from mailstate.state.events import CommitEvents  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.models import WEBHOOK_EVENTS, Settings  # noqa: E402
from mailstate.state.snapshot import Actor  # noqa: E402
from mailstate.state.store import Store  # noqa: E402
from mailstate.state.webhooks import Event, Webhooks  # noqa: E402
from tests.helpers.mailnode import pi_pull_script  # noqa: E402

ADMIN = Actor.admin("bench")
PROJECT = Actor.project(7, "bench")


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- 1. the policy check -------------------------------------------------------------------------------


def _ask(sock: socket.socket, attrs: dict[str, str]) -> tuple[float, str]:
    payload = ("".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n").encode()
    t0 = time.perf_counter()
    sock.sendall(payload)
    data = b""
    while not data.endswith(b"\n\n"):
        data += sock.recv(4096)
    return time.perf_counter() - t0, data.decode()


def bench_policy(messages: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    policy_dir = root / "node" / "policy"
    (policy_dir / "domains").mkdir(parents=True)
    # Limits high enough that every message goes through: the full path (windows read, count written).
    (policy_dir / "domains" / "example.com").write_text(f"@limits {messages * 10} {messages * 100}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ini = root / "policy.ini"
    ini.write_text(
        f"[remote]\nurl = {root / 'none.git'}\n[node]\nallowed_signers = /dev/null\n"
        f"[paths]\nroot = {root / 'node'}\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
        f"[policy]\nlisten = 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(pi_pull_script()), "policy", "--config", str(ini)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results: dict[str, dict[str, list[float]]] = {}
        with sock:
            for label, login in (("limited login", "info@example.com"), ("no limits (baseline)", "x@nolimits.org")):
                rcpt: list[float] = []
                eom: list[float] = []
                for m in range(messages):
                    base = {"request": "smtpd_access_policy", "sasl_username": login, "instance": f"{label}.{m}"}
                    for r in range(3):
                        took, answer = _ask(sock, {**base, "protocol_state": "RCPT", "recipient": f"r{r}@o.org"})
                        assert answer == "action=DUNNO\n\n", answer
                        rcpt.append(took)
                    took, _ = _ask(sock, {**base, "protocol_state": "END-OF-MESSAGE", "recipient_count": "3"})
                    eom.append(took)
                results[label] = {"RCPT": rcpt, "END-OF-MESSAGE": eom}
        print(f"\n## 1. The policy check ({messages} messages x (3 RCPT + END-OF-MESSAGE), one connection)\n")
        print("| login | request | p50 ms | p90 ms | p99 ms |")
        print("|---|---|---|---|---|")
        for label, kinds in results.items():
            for kind, xs in kinds.items():
                print(f"| {label} | {kind} | {ms(p50(xs), 3)} | {ms(p90(xs), 3)} | {ms(p99(xs), 3)} |")
        both = results["limited login"]["RCPT"] + results["limited login"]["END-OF-MESSAGE"]
        base = results["no limits (baseline)"]["RCPT"] + results["no limits (baseline)"]["END-OF-MESSAGE"]
        print(f"\nA request of a limited login: p50 {ms(p50(both), 3)} ms (target <= 2 ms); "
              f"{p50(both) / p50(base):.2f}x the no-limit baseline")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- 1b. the policy check in a fleet: asked on the home, and through another node ---------------------


def _node_certificate(d: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed certificate (as `pi_pull.py install` makes): (cert, key, sha256 as Postfix writes it)."""
    cert, key = d / "cert.pem", d / "key.pem"
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest().upper()
    return cert, key, ":".join(fp[i : i + 2] for i in range(0, 64, 2))


def _policy_process(root: Path, name: str, listen: int, fleet_port: int, limits: str) -> subprocess.Popen[bytes]:
    node = root / name
    (node / "policy" / "domains").mkdir(parents=True)
    (node / "policy" / "domains" / "example.com").write_text(limits)
    ini = root / f"{name}.ini"
    ini.write_text(
        f"[remote]\nurl = {root / 'none.git'}\n[node]\nallowed_signers = /dev/null\n"
        f"[paths]\nroot = {node}\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
        f"[policy]\nlisten = 127.0.0.1:{listen}\n"
        f"[fleet]\npolicy_port = {fleet_port}\ntls_cert = {node / 'tls' / 'cert.pem'}\n"
        f"tls_key = {node / 'tls' / 'key.pem'}\n"
    )
    return subprocess.Popen(
        [sys.executable, str(pi_pull_script()), "policy", "--config", str(ini)], stderr=subprocess.DEVNULL
    )


def _connect(port: int, timeout: float = 15) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bench_policy_fleet(messages: int) -> None:
    """The same requests of one limited login asked on its home (counted there) and on another node
    (forwarded to the home over the fleet's TLS, pipull/policyfleet.py), one Postfix connection
    each, alternating message by message so the machine's load hits both."""
    root = Path(tempfile.mkdtemp(prefix="bench-policy-fleet-"))
    limits = f"@limits {messages * 20} {messages * 200}\n"
    home_cert, _, home_fp = _node_certificate(root / "home" / "tls", "home")
    other_cert, _, other_fp = _node_certificate(root / "other" / "tls", "other")
    for name in ("home", "other"):
        (root / name / "fleet").mkdir(parents=True)
    # The home admits the fleet's nodes; the other node pins the home and names it example.com's home.
    (root / "home" / "fleet" / "ccerts").write_text(f"{home_fp} OK\n{other_fp} OK\n")
    (root / "home" / "fleet" / "peers.pem").write_text(home_cert.read_text() + other_cert.read_text())
    (root / "other" / "fleet" / "tls_policy").write_text(f"[127.0.0.1]:2525 fingerprint match={home_fp}\n")
    (root / "other" / "current" / "dovecot").mkdir(parents=True)
    (root / "other" / "current" / "dovecot" / "proxy.imap").write_text(
        "example.com:::::::nopassword=y proxy=y host=127.0.0.1\n"
    )
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        ports = []
        for s in (a, b, c):
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    home_port, other_port, fleet_port = ports
    procs = [
        _policy_process(root, "home", home_port, fleet_port, limits),
        _policy_process(root, "other", other_port, fleet_port, limits),
    ]
    try:
        home, other = _connect(home_port), _connect(other_port)
        _connect(fleet_port).close()  # the home's fleet listener is up
        results: dict[str, list[float]] = {"on the home (counted there)": [], "on another node (forwarded)": []}
        with home, other:
            for m in range(messages):
                for label, sock in zip(results, (home, other), strict=True):
                    base = {
                        "request": "smtpd_access_policy",
                        "sasl_username": "info@example.com",
                        "instance": f"{label}.{m}",
                    }
                    for r in range(3):
                        took, answer = _ask(sock, {**base, "protocol_state": "RCPT", "recipient": f"r{r}@o.org"})
                        assert answer == "action=DUNNO\n\n", answer
                        results[label].append(took)
                    took, _ = _ask(sock, {**base, "protocol_state": "END-OF-MESSAGE", "recipient_count": "3"})
                    results[label].append(took)
        print(f"\n## 1b. The policy check in a fleet ({messages} messages x 4 requests on each node, alternating)\n")
        print("| asked | p50 ms | p90 ms | p99 ms |")
        print("|---|---|---|---|")
        for label, xs in results.items():
            print(f"| {label} | {ms(p50(xs), 3)} | {ms(p90(xs), 3)} | {ms(p99(xs), 3)} |")
        local, forwarded = results.values()
        print(f"\nThrough another node: p50 {ms(p50(forwarded), 3)} ms (target <= 2 ms); "
              f"{p50(forwarded) / p50(local):.2f}x the home's own, same run")  # fmt: skip
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


# --- 2. writes with and without webhooks -----------------------------------------------------------------


@contextmanager
def fresh_store(root: Path, users: int) -> Iterator[Store]:
    dd = init_data_dir(root, Settings(bcrypt_cost=4))
    db = LocalDB(dd.db)
    store = open_store(dd.root, db=db)
    store.execute("link-domain", ADMIN, {"domain": "bench.example", "project_id": 7})
    store.execute("enable-email", PROJECT, {"domain": "bench.example"})
    for i in range(users):
        store.execute("add-user", PROJECT, {"email": f"u{i}@bench.example", "password": "bench-password"})
    try:
        yield store
    finally:
        db.close()


def paced_writes(store: Store, writes: int, rate: float, users: int) -> list[float]:
    """`writes` writes at `rate` a second (each one event); their latencies."""
    out = []
    start = time.perf_counter()
    for n in range(writes):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        user = f"u{n % users}@bench.example"
        op = "remove-user" if (n // users) % 2 == 0 else "restore-user"
        t0 = time.perf_counter()
        store.execute(op, PROJECT, {"email": user})
        out.append(time.perf_counter() - t0)
    return out


@contextmanager
def receiver() -> Iterator[tuple[str, Callable[[], int]]]:
    """A webhook receiver in its own process, as a real one would be: (its URL, how many it got)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.webhooksink", str(port)])
    count_url = f"http://127.0.0.1:{port}/count"

    def count() -> int:
        with urllib.request.urlopen(count_url, timeout=5) as resp:
            return int(json.loads(resp.read())["received"])

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                count()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/hook", count
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_writes(root: Path, writes: int, rate: float, hooks_on: bool) -> tuple[list[float], int]:
    users = 50
    with fresh_store(root, users) as store:
        if not hooks_on:
            return paced_writes(store, writes, rate, users), 0
        with receiver() as (url, count):
            hooks = Webhooks(store.git.path.parent / "mailstate.db", private_ok=True)
            hooks.add_hook(None, url, list(WEBHOOK_EVENTS), None, datetime.now(UTC))
            events = CommitEvents(store, hooks)
            dispatcher = Dispatcher(hooks)
            stop = threading.Event()
            threads = [threading.Thread(target=t, args=(stop,), daemon=True) for t in (events.run, dispatcher.run)]
            for t in threads:
                t.start()
            try:
                lat = paced_writes(store, writes, rate, users)
                deadline = time.monotonic() + 60
                while count() < writes and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                dispatcher.wake()
                for t in threads:
                    t.join(timeout=15)
            return lat, count()


def bench_writes(writes: int, rate: float, rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    runs: dict[str, list[float]] = {"A": [], "B": []}
    pairs: list[float] = []
    delivered = 0
    for i in range(rounds):
        pair = {}
        for arm in "AB":
            log(f"writes: round {i + 1}/{rounds}, run {arm}")
            lat, got = run_writes(base / f"{arm}{i}", writes // (2 * rounds), rate, hooks_on=arm == "B")
            runs[arm] += lat
            pair[arm] = p50(lat)
            delivered += got
        pairs.append(pair["B"] / pair["A"])
    a, b = p50(runs["A"]), p50(runs["B"])
    order = " ".join("AB" * rounds)
    print(f"\n## 2. Writes at {rate:g}/s, one event each ({len(runs['A'])} writes an arm, {order})\n")
    print("| run | write p50 ms | p90 ms |")
    print("|---|---|---|")
    print(f"| A: no webhooks | {ms(a)} | {ms(p90(runs['A']))} |")
    print(f"| B: a webhook on every event, events thread + dispatcher running | {ms(b)} | {ms(p90(runs['B']))} |")
    print(
        f"\nB/A write p50: {b / a:.3f} (target <= 1.10); per round: {', '.join(f'{r:.2f}' for r in pairs)}; "
        f"deliveries made in B: {delivered} of {len(runs['B'])}"
    )


# --- 3. draining a backlog ---------------------------------------------------------------------------------


def drain(backlog: int, receivers: int) -> float:
    root = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    with ExitStack() as stack:
        opened = [stack.enter_context(receiver()) for _ in range(receivers)]
        hooks = Webhooks(root / "mailstate.db", private_ok=True)
        for url, _count in opened:
            hooks.add_hook(None, url, ["node.stale"], None, datetime.now(UTC))
        per = backlog // receivers
        hooks.enqueue([Event("node.stale", None, {"node": f"n{i}"}) for i in range(per)])
        dispatcher = Dispatcher(hooks)
        stop = threading.Event()
        t0 = time.perf_counter()
        thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        thread.start()
        while hooks.backlog():
            time.sleep(0.01)
        took = time.perf_counter() - t0
        stop.set()
        dispatcher.wake()
        thread.join(timeout=15)
        assert sum(count() for _url, count in opened) == per * receivers
        return per * receivers / took


def bench_drain(backlog: int) -> None:
    one = drain(backlog, 1)
    four = drain(backlog, 4)
    print(f"\n## 3. Draining a backlog of {backlog} deliveries to local receivers\n")
    print("| webhooks | deliveries/s |")
    print("|---|---|")
    print(f"| 1 | {one:.0f} |")
    print(f"| 4 | {four:.0f} |")
    print(f"\nOne webhook drains at {one:.0f}/s (target >= 50).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_controls", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=300, help="messages through the policy service per login (300)")
    p.add_argument("--writes", type=int, default=600, help="paced writes, half per arm (600)")
    p.add_argument("--rate", type=float, default=100.0, help="writes (events) a second (100)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds of the write part (3)")
    p.add_argument("--backlog", type=int, default=2000, help="deliveries in the backlog (2000)")
    p.add_argument("--policy-only", action="store_true", help="only the policy check (parts 1 and 1b)")
    args = p.parse_args(argv)
    bench_policy(args.messages)
    bench_policy_fleet(args.messages)
    if args.policy_only:
        return 0
    bench_writes(args.writes, args.rate, args.rounds)
    bench_drain(args.backlog)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
