"""Inbound filtering: what rspamd as port 25's milter costs a node, against the same node without it.

    python -m bench.bench_inbound [--messages 200] [--clients 16] [--rounds 3]

In ONE run, with real Postfix + Dovecot nodes on loopback (tests.helpers.mailnode.running_mailnode):
three nodes, each with one mailbox applied by the real pi-pull: one without a filter, one with the
bundle's rspamd as port 25's milter over the bundle's UNIX socket (``smtpd_milters =
unix:rspamd/milter.sock`` under Postfix's queue directory; tests.helpers.rspamd: the bundle's
local.d files, DNS to a local knotd serving the sender's SPF record), and one with the same rspamd
reached over loopback TCP instead (``inet:127.0.0.1:PORT``, the alternative the socket replaced). `--rounds` times, alternating
between the nodes so that the machine's load weighs on all alike, `--clients` threads each open
one SMTP session a message (as sending servers do), speak for 198.51.100.7 (XCLIENT) and send to
the mailbox until `--messages` were sent to that node in the round. Printed:

- accepted messages per second with and without the filter (the 250 after DATA), and the ratios
  (issue target: >= 0.5). 16 clients by default: an MX takes many sessions at once, and with
  few clients the rate measures each session's latency (the scan waits inside it), not how many
  messages the node can take;
- the CPU each message cost the node's Postfix + Dovecot and rspamd (their processes' user +
  system time over the node's blasts, exited children included), which shows what the filter
  costs beside what the machine's load does to the rates;
- SMTP transaction time (connect to the 250 after DATA) p50/p90 with and without, and the p50
  the filter adds (issue target: <= 150 ms);
- rspamd's memory once the messages went through: RSS and PSS summed over its processes (PSS
  counts shared pages once; RSS counts them per process) and each process's PSS (issue
  target: <= 250 MB). rspamd runs warm, as a node's does after its first start: it is started
  once (which compiles its hyperscan database into its DBDIR), its idle memory read, then
  restarted (the main process loads the database before it forks, so the workers share it).
  The first start's idle memory is printed too.

Needs root, Postfix, Dovecot with Pigeonhole, rspamd and knot. Progress goes to stderr.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2

import argparse  # noqa: E402
import contextlib  # noqa: E402
import email.utils  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import smtplib  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from tests.helpers.knot import KnotServer  # noqa: E402
from tests.helpers.mailnode import (  # noqa: E402
    MailNode,
    StateRepo,
    bcrypt_hash,
    make_signing_key,
    run_pi_pull,
    running_mailnode,
    write_allowed_signers,
)
from tests.helpers.rspamd import Rspamd  # noqa: E402

ADDRESS = "anna@shop.example"
COLD_SETTLE = 8.0  # seconds after rspamd's first start before its memory is read (the workers load hyperscan)
OUTSIDE = "198.51.100.7"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Tally:
    seconds: float = 0.0
    accepted: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)
    postfix_cpu: float = 0.0  # seconds used by the node's Postfix and Dovecot while it was blasted
    rspamd_cpu: float = 0.0  # seconds used by rspamd meanwhile


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` and their descendants, reaped children included (a Postfix
    daemon that exits hands its time to master's cutime), so a difference spans a run."""
    total = 0
    for pid in _tree(pids):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def node_pids(node: MailNode) -> list[int]:
    """The masters of the node's Postfix and Dovecot (their pid files)."""
    out = []
    for pidfile in (
        node.workdir / "postfix" / "queue" / "pid" / "master.pid",
        node.workdir / "dovecot" / "run" / "master.pid",
    ):
        with contextlib.suppress(OSError, ValueError):
            out.append(int(pidfile.read_text().split()[0]))
    return out


def send_one(node: MailNode, n: int) -> tuple[bool, float]:
    body = (
        f"From: Bob <bob@sender.test>\r\nTo: {ADDRESS}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench.{n}.{time.time_ns()}@sender.test>\r\nDate: {email.utils.formatdate()}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + "A short note about the meeting on Friday, with a few lines of text.\r\n"
        * 20
    )
    t0 = time.perf_counter()
    with contextlib.closing(smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=120)) as s:
        s.ehlo("mx.sender.test")
        s.docmd("XCLIENT", f"ADDR={OUTSIDE} NAME=mx.sender.test HELO=mx.sender.test")
        s.ehlo("mx.sender.test")
        s.mail("bob@sender.test")
        s.rcpt(ADDRESS)
        code, _ = s.data(body.encode())
        took = time.perf_counter() - t0
        with contextlib.suppress(smtplib.SMTPException):
            s.quit()
    return code == 250, took


def blast(node: MailNode, messages: int, clients: int, tally: Tally) -> None:
    lock = threading.Lock()
    counter = iter(range(messages))

    def worker() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            ok, took = send_one(node, n)
            with lock:
                tally.latencies.append(took)
                if ok:
                    tally.accepted += 1
                else:
                    tally.refused += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds += time.perf_counter() - t0


def provision(node: MailNode, tmp: Path, name: str) -> None:
    signing = make_signing_key(tmp / f"keys-{name}")
    repo = StateRepo(tmp / f"repo-{name}", signing, mail_root=str(node.mail_root), uid=node.uid, gid=node.gid, format=2)
    repo.set_mailbox(ADDRESS, password_hash=bcrypt_hash("bench password"))
    repo.commit("bench")
    signers = write_allowed_signers(tmp / f"allowed_signers-{name}", [signing])
    ini = node.write_pi_pull_config(tmp / f"pi-pull-{name}.ini", str(repo.bare), signers, name=name)
    r = run_pi_pull(ini)
    if r.returncode != 0:
        raise SystemExit(f"pi-pull could not apply the bench state on {name}: {r.stderr}")


@dataclass
class Memory:
    rss: float = 0.0  # MB, summed over the processes
    pss: float = 0.0
    processes: list[tuple[str, float]] = field(default_factory=list)  # (process title, PSS MB)


def memory(pids: list[int]) -> Memory:
    """RSS and PSS summed over ``pids`` and their children, and each process's PSS (smaps_rollup)."""
    out = Memory()
    for pid in _tree(pids):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            fields = {}
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(value.split()[0]) / 1024
            out.rss += fields.get("Rss", 0.0)
            out.pss += fields.get("Pss", 0.0)
            out.processes.append((title.split(" (")[0][:60], fields.get("Pss", 0.0)))
    return out


def _tree(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    ap.add_argument("--messages", type=int, default=200, help="messages per node and round (default 200)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent SMTP clients (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating the nodes (default 3)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not all(shutil.which(p) for p in ("postfix", "dovecot", "rspamd", "knotd")):
        raise SystemExit("needs root, Postfix, Dovecot, rspamd and knot")
    tmp = Path(tempfile.mkdtemp(prefix="bench-inbound-"))
    os.chmod(tmp, 0o755)
    try:
        with KnotServer(tmp / "knot", ["sender.test"]) as knot:
            knot.set_zone("sender.test", [f'@ TXT "v=spf1 ip4:{OUTSIDE} -all"', f"mx A {OUTSIDE}"])
            rs = Rspamd(tmp / "rspamd", dns=knot.address)
            with (
                running_mailnode(spam_milter=rs.milter) as filtered,
                running_mailnode(spam_milter=rs.milter) as tcp,
                running_mailnode() as plain,
            ):
                rs.use_node(filtered)
                use_tcp_milter(tcp, rs.add_milter_tcp())
                t0 = time.monotonic()
                rs.start()
                say(f"rspamd up in {time.monotonic() - t0:.1f}s")
                # The first start of an rspamd compiles its hyperscan database into DBDIR; every later
                # start (a reboot, a restart) loads it before forking. A node runs warm: so does the bench.
                time.sleep(COLD_SETTLE)
                cold = memory([rs.proc.pid]) if rs.proc is not None else Memory()
                rs.stop()
                rs.start()
                try:
                    tallies = {"without filter": Tally(), "with rspamd": Tally(), "with rspamd, loopback TCP": Tally()}
                    nodes = dict(zip(tallies, (plain, filtered, tcp), strict=True))
                    for n, node in enumerate(nodes.values()):
                        provision(node, tmp, f"node{n}")
                        blast(node, args.clients * 2, args.clients, Tally())  # warm up: smtpd and cleanup start
                    for rnd in range(args.rounds):
                        say(f"round {rnd + 1}/{args.rounds}")
                        for name, node in nodes.items():
                            measure(node, rs, args, tallies[name])
                    assert rs.proc is not None
                    mem = memory([rs.proc.pid])
                    stat = rs.stat() or {}
                finally:
                    rs.stop()
        report(args, tallies, mem, stat)
        print(f"rspamd's first start (cold hyperscan cache), idle: PSS {cold.pss:.0f} MB, RSS {cold.rss:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def measure(node: MailNode, rs: Rspamd, args: argparse.Namespace, tally: Tally) -> None:
    """One blast at ``node``, with the CPU its Postfix + Dovecot and rspamd used meanwhile."""
    assert rs.proc is not None
    before = cpu_seconds(node_pids(node)), cpu_seconds([rs.proc.pid])
    blast(node, args.messages, args.clients, tally)
    tally.postfix_cpu += cpu_seconds(node_pids(node)) - before[0]
    tally.rspamd_cpu += cpu_seconds([rs.proc.pid]) - before[1]


def use_tcp_milter(node: MailNode, milter: str) -> None:
    """Point ``node``'s port 25 at rspamd's loopback TCP port instead of the bundle's socket."""
    subprocess.run(["postconf", "-c", str(node.postfix_dir), "-e", f"smtpd_milters = {milter}"], check=True)
    subprocess.run(node.postfix_reload.split(), check=True, capture_output=True)


def report(args: argparse.Namespace, tallies: dict[str, Tally], mem: Memory, stat: dict[str, object]) -> None:
    rates = {name: t.accepted / t.seconds for name, t in tallies.items()}
    print(
        f"inbound: {args.rounds} rounds x {args.messages} messages a node, {args.clients} SMTP clients, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(
        "| node | accepted | refused | accepted/s | SMTP p50 ms | SMTP p90 ms | CPU ms/msg Postfix+Dovecot | rspamd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, t in tallies.items():
        row = [name, str(t.accepted), str(t.refused), f"{rates[name]:.1f}", ms(p50(t.latencies), 1)]
        sent = max(t.accepted + t.refused, 1)
        cpu = [f"{t.postfix_cpu * 1000 / sent:.2f}", f"{t.rspamd_cpu * 1000 / sent:.2f}"]
        print("| " + " | ".join([*row, ms(p90(t.latencies), 1), *cpu]) + " |")
    base = tallies["without filter"]
    for name in ("with rspamd", "with rspamd, loopback TCP"):
        print(f"accept rate {name} / without: {rates[name] / rates['without filter']:.2f} (target >= 0.5)")
        added = ms(p50(tallies[name].latencies) - p50(base.latencies), 1)
        print(f"added SMTP latency p50 {name}: {added} ms (target <= 150 ms)")
    print(
        f"rspamd memory (a warm start, after the messages): RSS {mem.rss:.0f} MB summed over its processes, "
        f"PSS {mem.pss:.0f} MB (target <= 250 MB)"
    )
    for title, pss in mem.processes:
        print(f"  PSS {pss:6.1f} MB  {title}")
    print(f"rspamd scanned {stat.get('scanned')} messages; actions {stat.get('actions')}")


if __name__ == "__main__":
    raise SystemExit(main())
