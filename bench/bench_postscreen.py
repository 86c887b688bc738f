"""Postscreen on port 25: what it costs a client, against Postfix's SMTP server without it.

    python -m bench.bench_postscreen [--sessions 200] [--new 8]

In ONE run, one real Postfix + Dovecot node on loopback (tests.helpers.mailnode.running_mailnode)
with the bundle's port 25 (postscreen, its default DNS blocklists) and a local knotd serving those
lists on port 53 of a loopback address of its own (Postfix's resolv.conf points there; 127.0.0.2
is listed by zen.spamhaus.org). Each session connects, reads the greeting and says QUIT. Printed,
p50/p90 of the time to the greeting:

- baseline: the node's submission service (smtpd straight, no postscreen), `--sessions` sessions;
- a remembered client on port 25 (postscreen's PASS OLD: handed to smtpd at once), `--sessions`;
- a client port 25 lets skip the tests (postscreen_access_list), `--sessions`;
- `--new` first contacts at once (each waits out the greeting test, postscreen_greet_wait) and
  `--new` listed clients at once (521 after the same wait).

Needs root, Postfix, Dovecot with Pigeonhole and knot. Progress goes to stderr.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import smtplib  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from tests.helpers.knot import KnotServer  # noqa: E402
from tests.helpers.mailnode import MailNode, running_mailnode  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def session(port: int, source: str) -> tuple[float, int]:
    """Seconds to the greeting, and its code (a refusal: the code it refused with)."""
    started = time.perf_counter()
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    except smtplib.SMTPConnectError as e:
        return time.perf_counter() - started, e.smtp_code
    took = time.perf_counter() - started
    with contextlib.closing(s):
        s.quit()
    return took, 220


def serial(port: int, source: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        took, code = session(port, source)
        assert code == 220, code
        out.append(took)
    return out


def parallel(port: int, sources: list[str], want: int) -> list[float]:
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def one(source: str) -> None:
        r = session(port, source)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == want for _, code in results), results
    return [took for took, _ in results]


def line(name: str, values: list[float]) -> str:
    return f"| {name} | {len(values)} | {ms(p50(values))} | {ms(p90(values))} |"


def measure(node: MailNode, sessions: int, new: int) -> list[str]:
    say("baseline: the submission service (smtpd, no postscreen)")
    base = serial(node.submission_port, "127.0.0.1", sessions)
    say(f"{new} first contacts and {new} listed clients, at once")
    first = parallel(node.smtp_port, [f"127.0.1.{i + 1}" for i in range(new)], 220)
    listed = parallel(node.smtp_port, ["127.0.0.2"] * new, 521)
    say("a remembered client (PASS OLD)")
    old = serial(node.smtp_port, "127.0.1.1", sessions)
    say("a client that skips the tests (postscreen_access_list)")
    skip = serial(node.smtp_port, "127.0.0.1", sessions)
    return [
        "| client | sessions | greeting p50 (ms) | p90 (ms) |",
        "|---|---|---|---|",
        line("submission port, smtpd without postscreen (baseline)", base),
        line("port 25, remembered (PASS OLD)", old),
        line("port 25, skips the tests (access list)", skip),
        line("port 25, first contact (greeting test)", first),
        line("port 25, listed (521)", listed),
        "",
        f"remembered client: +{ms(p50(old) - p50(base))} ms p50 over the baseline ({p50(old) / p50(base):.2f}x)",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200, help="sessions per serial measure (default 200)")
    ap.add_argument("--new", type=int, default=8, help="first contacts and listed clients, at once (default 8)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-postscreen-"))
    host = f"127.53.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    try:
        with KnotServer(tmp / "knot", ["zen.spamhaus.org", "bl.spamcop.net"], host=host, port=53) as knot:
            knot.set_zone("zen.spamhaus.org", ["2.0.0.127 A 127.0.0.2"])
            (tmp / "resolv.conf").write_text(f"nameserver {host}\noptions timeout:2 attempts:2\n")
            with running_mailnode(resolv_conf=tmp / "resolv.conf") as node:
                rows = measure(node, args.sessions, args.new)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
