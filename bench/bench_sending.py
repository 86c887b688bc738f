"""Sending: what sender-map rendering adds to a write, and one submission through a real node.

    python -m bench.bench_sending                        # 10k mailboxes (5 a domain)
    python -m bench.bench_sending --mailboxes 100000     # the sender-map part at 100k
    python -m bench.bench_sending --no-node              # skip the real Postfix + Dovecot part

1. Seed (bench.seed.seed_state: N mailboxes in one signed commit, sender_login_maps included),
   then every 10th domain gets an alias (two of its mailboxes) and every 50th domain an alias
   domain, so some fragments carry alias and alias-domain lines.
2. Store writes (one `Store.execute` each: YAML dump, render of the domain, its
   sender_login_maps included, tree, signature, commit), alternating remove-user / restore-user
   (soft) and update-alias. In the same run, for each written domain, the sender-map part of
   that write measured on its own: the alias-domain scan of the state that `changed_files` does
   (`after` list), `maplines.sender_lines` and the template render of the fragment. Printed: the
   write's p50, the sender part's p50, and their ratio (what the sender map adds to a write).
3. With a real node (tests.helpers.mailnode.running_mailnode: Postfix + Dovecot on loopback, the SMTP
   sink as the internet), the built pi_pull.py applies the seeded state; then N submissions on
   587, each from a fresh connection: STARTTLS, AUTH PLAIN (Dovecot, bcrypt cost 4 as seeded),
   MAIL FROM an owned alias (sender_login_maps lookup), RCPT external, DATA until Postfix's
   250 (queued). Printed: p50/p90 of the AUTH step and of the whole transaction, and the time
   until the sink got the message. With no DKIM milter here: the signing step is the DKIM
   helper's figure.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.seed import SeedInfo, seed_state
from mailstate.compiler.maplines import sender_lines
from mailstate.compiler.render import _env as render_env
from mailstate.state import senders
from mailstate.state.datadir import open_store
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]


def add_aliases(store: Store, info: SeedInfo) -> tuple[int, int]:
    """An alias in every 10th domain, an alias domain for every 50th (through the store)."""
    aliases = alias_domains = 0
    for i, name in enumerate(info.domains):
        actor = Actor.project(info.project_of[name], "bench")
        boxes = sorted(store.snapshot.domains[name].mailboxes)
        if i % 10 == 0 and len(boxes) >= 2:
            store.execute(
                "add-alias",
                actor,
                {"address": f"ms-team@{name}", "destinations": [f"{boxes[0]}@{name}", f"{boxes[1]}@{name}"]},
            )
            aliases += 1
        if i % 50 == 0:
            alias = f"alias-{i}.example"
            store.execute("link-domain", Actor.admin("bench"), {"domain": alias, "project_id": info.project_of[name]})
            store.execute("enable-email", actor, {"domain": alias})
            store.execute("add-alias-domain", actor, {"domain": alias, "target": name})
            alias_domains += 1
    return aliases, alias_domains


def sender_part(store: Store, name: str) -> float:
    """The sender-map work of one write of domain ``name``, alone (see the module docstring)."""
    snap = store.snapshot
    t = time.perf_counter()
    after = [snap.domains[u] for u in snap.alias_users.get(name, ()) if u != name]  # as changed_files does
    users = senders.alias_index(after)
    lines = sender_lines(snap.domains[name], users.get(name, ()))
    render_env().get_template("sender_login_maps.j2").render({"senders": [{"key": k, "owners": o} for k, o in lines]})
    return time.perf_counter() - t


def measure_writes(store: Store, info: SeedInfo, n: int, start: int = 0) -> tuple[list[float], list[float]]:
    writes: list[float] = []
    parts: list[float] = []
    names = info.domains
    for i in range(start, start + n):
        name = names[(i * 7919) % len(names)]
        actor = Actor.project(info.project_of[name], "bench")
        dom = store.snapshot.domains[name]
        first = sorted(dom.mailboxes)[0]
        t = time.perf_counter()
        if i % 2 == 0:
            store.execute("remove-user", actor, {"email": f"{first}@{name}"})
            writes.append(time.perf_counter() - t)
            parts.append(sender_part(store, name))
            t = time.perf_counter()
            store.execute("restore-user", actor, {"email": f"{first}@{name}"})
        else:
            address = f"ms-bench@{name}"
            op = "update-alias" if "ms-bench" in dom.aliases else "add-alias"
            store.execute(op, actor, {"address": address, "destinations": [f"{first}@{name}", f"x{i}@partner.example"]})
        writes.append(time.perf_counter() - t)
        parts.append(sender_part(store, name))
    return writes, parts


def node_part(info: SeedInfo, tmp: Path, n: int) -> None:
    from tests.helpers.mailnode import pi_pull_script, running_mailnode

    with running_mailnode() as node:
        cfg = node.write_pi_pull_config(
            tmp / "pi-pull.ini", str(info.data_dir.repo), info.data_dir.allowed_signers, name="bench"
        )
        # The seed's uid/gid (5000) are the state's; the node must expect those.
        text = (
            cfg.read_text()
            .replace(f"mail_uid = {node.uid}", "mail_uid = 5000")
            .replace(f"mail_gid = {node.gid}", "mail_gid = 5000")
        )
        text = text.replace(f"mail_root = {node.mail_root}", f"mail_root = {info.data_dir.root.parent / 'vmail'}")
        cfg.write_text(text + "[lifecycle]\npurge = no\nusage_interval = 0\n")
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, str(pi_pull_script()), "--config", str(cfg), "--once"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if r.returncode != 0:
            raise SystemExit(f"pi-pull tick failed (rc {r.returncode}): {r.stderr[-2000:]}")
        print(
            f"\nnode: first apply of {info.mailboxes} mailboxes {time.perf_counter() - t:.1f} s "
            f"(sender_login_maps {(node.root / 'current/postfix/sender_login_maps').stat().st_size} bytes)"
        )
        with_alias = [d for i, d in enumerate(info.domains) if i % 10 == 0]
        auth: list[float] = []
        total: list[float] = []
        arrive: list[float] = []
        assert node.sink is not None
        for i in range(n + 2):
            name = with_alias[(i * 31) % len(with_alias)]
            user = next(e for e in info.emails if e.endswith(f"@{name}"))
            boxes = sorted(e for e in info.emails if e.endswith(f"@{name}"))
            sender = f"ms-team@{name}" if user in boxes[:2] else user
            subject = f"bench-{i}"
            msg = f"From: {sender}\r\nTo: someone@internet.test\r\nSubject: {subject}\r\n\r\nhello\r\n"
            t0 = time.perf_counter()
            with contextlib.closing(node.submission()) as s:
                t1 = time.perf_counter()
                s.login(user, info.password)
                t2 = time.perf_counter()
                s.sendmail(sender, ["someone@internet.test"], msg)
                t3 = time.perf_counter()
                s.quit()
            node.sink.wait_subject(subject, 30)
            t4 = time.perf_counter()
            if i >= 2:  # two warm-up submissions
                auth.append(t2 - t1)
                total.append(t3 - t0)
                arrive.append(t4 - t3)
        print(f"submission on 587 at {info.mailboxes} mailboxes, {n} messages, ms:")
        print(f"  AUTH PLAIN (Dovecot, bcrypt cost 4)       p50 {p50(auth) * 1e3:7.1f}  p90 {p90(auth) * 1e3:7.1f}")
        print(f"  connect+STARTTLS+AUTH+MAIL/RCPT/DATA=250  p50 {p50(total) * 1e3:7.1f}  p90 {p90(total) * 1e3:7.1f}")
        print(f"  queued -> at the sink (relay)             p50 {p50(arrive) * 1e3:7.1f}  p90 {p90(arrive) * 1e3:7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--writes", type=int, default=100)
    ap.add_argument("--submissions", type=int, default=30)
    ap.add_argument("--no-node", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sending-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        info = seed_state(tmp / "data", args.mailboxes, mail_root=str(tmp / "vmail"))
        store = open_store(info.root)
        t = time.perf_counter()
        aliases, alias_domains = add_aliases(store, info)
        print(
            f"seed: {args.mailboxes} mailboxes in {len(info.domains)} domains ({info.seconds:.1f} s); "
            f"+{aliases} aliases, +{alias_domains} alias domains ({time.perf_counter() - t:.1f} s)"
        )
        measure_writes(store, info, 8, start=1_000_000)
        writes, parts = measure_writes(store, info, args.writes)
        print(
            f"store writes at {args.mailboxes} mailboxes, n={len(writes)}: write p50 {p50(writes) * 1e3:.2f} ms (p90 {p90(writes) * 1e3:.2f}); "
            f"its sender-map part p50 {p50(parts) * 1e3:.3f} ms (p90 {p90(parts) * 1e3:.3f}); ratio {p50(parts) / p50(writes):.3f}"
        )
        if not args.no_node:
            node_part(info, tmp, args.submissions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
