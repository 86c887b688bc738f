"""What the node's mailbox lifecycle costs (issue 10): the usage measurement at 10k and 100k
mailboxes, per run and per tick, and the whole-process no-op tick with the lifecycle on.

    python3 -m bench.bench_node_usage [--sizes 10000,100000] [--repeat 3] [--ticks 15] [--python /usr/bin/python3]

1. usage, per run: a mail root of N format-2 homes is built on disk, each as Dovecot leaves it
   (``<home>/Maildir/{cur,new,tmp}``, a ``.Sent`` subfolder, 3 messages with ``,S=<size>``
   names and 1 without, plus index files). A mirror holds a commit with the matching
   ``mailboxes`` fragments (5 mailboxes per domain, written with ``git fast-import``). One run
   is ``Lifecycle.usage()`` exactly as a tick calls it: ``ls-tree`` of the applied commit, every
   ``mailboxes`` blob through one ``cat-file --batch``, then the Maildir listings. Baseline,
   same tree, same run: the naive way, ``os.walk`` + ``lstat`` of every file (what ``du``
   does). The page cache is warm for both (the bench does not drop caches on a shared box).
   Per tick = per run x ([agent] interval 60 s / [lifecycle] usage_interval 900 s).
2. no-op tick, whole process: ``python3 pi_pull.py --once`` against a local state repo
   (tests.mailnode.StateRepo, format 2, a signed statement) that the node already applied,
   with a graveyard of 50 entries the purge lists every tick and none due. Baselines:
   ``python3 -c pass`` and ``python3 pi_pull.py --help``, all with ``--python`` (default
   /usr/bin/python3, what pi-pull.service runs).

Progress goes to stderr, results to stdout. Temp dirs are removed at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import isolate_env, ms, p50, p90

isolate_env()

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from types import ModuleType  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
INTERVAL, USAGE_INTERVAL = 60.0, 900.0
ID_DAY = "20261201"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_pipull() -> ModuleType:
    sys.path.insert(0, str(REPO / "pi-pull"))
    import pipull.lifecycle  # noqa: F401

    return sys.modules["pipull"]


def box_id(i: int) -> str:
    return f"{ID_DAY}-{i:06x}"


def build_mail_root(root: Path, n: int, per_domain: int = 5) -> list[tuple[str, str, str]]:
    """N homes as Dovecot leaves them; returns the (domain, local, id) triples."""
    boxes = []
    body = b"x" * 2000
    for i in range(n):
        domain, local = f"d{i // per_domain:06d}.example", f"user{i % per_domain}"
        boxes.append((domain, local, box_id(i)))
        md = root / domain / f"{local}~{box_id(i)}" / "Maildir"
        for sub in ("cur", "new", "tmp", ".Sent/cur", ".Sent/new", ".Sent/tmp"):
            os.makedirs(md / sub)
        for k in range(2):
            (md / "cur" / f"17000000{k:02d}.M{i}P{k}.bench,S=2000,W=2040:2,S").write_bytes(body)
        (md / "new" / f"1700000100.M{i}P9.bench").write_bytes(body)  # no S=: measured with lstat
        (md / ".Sent" / "cur" / f"1700000200.M{i}P7.bench,S=2000,W=2040:2,S").write_bytes(body)
        (md / "dovecot.index.log").write_bytes(b"i" * 100)
        if i and i % 20000 == 0:
            log(f"  ... {i} homes")
    return boxes


def build_mirror(mirror: Path, boxes: list[tuple[str, str, str]]) -> str:
    """A bare repo whose one commit holds each domain's rendered files; the commit id."""
    subprocess.run(["git", "init", "-q", "--bare", str(mirror)], check=True)
    by_domain: dict[str, list[str]] = {}
    for domain, local, bid in boxes:
        by_domain.setdefault(domain, []).append(f"{local} {bid} active\n")
    out = [b"blob\nmark :1\ndata 0\n\n"]  # one shared blob for the files list_rendered only lists
    mark = 2
    marks: dict[str, int] = {}
    for domain, lines in by_domain.items():
        data = "".join(sorted(lines)).encode()
        out.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(data), data))
        marks[domain] = mark
        mark += 1
    out.append(b"commit refs/heads/main\ncommitter bench <b@example.invalid> 1700000000 +0000\ndata 5\nbench\n")
    settings = b"format 2\npurge_after_days 7\n"
    out.append(b"M 100644 inline rendered/settings\ndata %d\n%s\n" % (len(settings), settings))
    for domain, m in marks.items():
        base = f"rendered/domains/{domain[:2]}/{domain}".encode()
        for name in (b"passwd", b"virtual_mailbox_maps", b"virtual_mailbox_domains"):
            out.append(b"M 100644 :1 %s/%s\n" % (base, name))
        out.append(b"M 100644 :%d %s/mailboxes\n" % (m, base))
    out.append(b"\n")
    subprocess.run(["git", "--git-dir", str(mirror), "fast-import", "--quiet"], input=b"".join(out), check=True)
    return subprocess.run(["git", "--git-dir", str(mirror), "rev-parse", "main"], check=True, capture_output=True, text=True).stdout.strip()


def naive_walk(root: Path) -> tuple[int, int]:
    used = count = 0
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) not in ("cur", "new"):
            continue
        for name in files:
            used += os.lstat(os.path.join(dirpath, name)).st_size
            count += 1
    return used, count


def bench_usage(pipull: ModuleType, n: int, repeat: int, tmp: Path) -> dict[str, float]:
    work = tmp / f"usage-{n}"
    mail_root = work / "vmail"
    t0 = time.monotonic()
    log(f"usage at {n} mailboxes: building the mail root and the mirror ...")
    boxes = build_mail_root(mail_root, n)
    node_root = work / "node"
    node_root.mkdir()
    sha = build_mirror(node_root / "mirror.git", boxes)
    log(f"  built in {time.monotonic() - t0:.1f}s")
    cfg = pipull.config.Config(remote_url="/unused", root=str(node_root), mail_root=str(mail_root), mail_uid=1, mail_gid=1,
                               report_url="http://127.0.0.1:9/unused")
    quiet = logging.getLogger("bench-usage")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    runner = pipull.runner.Runner()
    mirror = pipull.mirror.Mirror(cfg, runner, quiet)
    releases = pipull.release.Releases(cfg, runner, quiet, mirror)
    clock = [1_800_000_000.0]
    life = pipull.lifecycle.Lifecycle(cfg, mirror, releases, quiet, clock=lambda: clock[0])
    runs, lists, walks = [], [], []
    expected = (n * 4 * 2000, n * 4)
    for _ in range(repeat + 1):  # the first run warms the page cache and is not counted
        st: dict[str, object] = {"applied_commit": sha, "lifecycle": {"purge_after_days": 7}}
        clock[0] += USAGE_INTERVAL
        t = time.monotonic()
        out = life.usage(st)
        runs.append(time.monotonic() - t)
        assert out is not None and len(out) == n
        assert (sum(int(e["used_bytes"]) for e in out), sum(int(e["messages"]) for e in out)) == expected
        t = time.monotonic()
        tree = releases.list_rendered(sha)
        life._mailboxes(tree, sorted(tree))
        lists.append(time.monotonic() - t)
        t = time.monotonic()
        assert naive_walk(mail_root) == expected
        walks.append(time.monotonic() - t)
    shutil.rmtree(work, ignore_errors=True)
    return {"run": p50(runs[1:]), "run_p90": p90(runs[1:]), "list": p50(lists[1:]), "walk": p50(walks[1:])}


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True)
        out.append(time.monotonic() - t)
        assert r.returncode == 0, r.stderr
    return out


def bench_noop(ticks: int, tmp: Path, python: str) -> dict[str, list[float]]:
    from tests.mailnode import StateRepo, make_signing_key, pi_pull_script, write_allowed_signers

    work = tmp / "noop"
    key = make_signing_key(work / "keys")
    repo = StateRepo(work / "repo", key, mail_root=str(work / "vmail"), uid=1, gid=1, format=2)
    for i in range(20):
        repo.set_mailbox(f"user{i}@example.com", password_hash="{BLF-CRYPT}$2b$04$" + "a" * 53)
    repo.commit("bench")
    signers = write_allowed_signers(work / "allowed_signers", [key])
    (work / "vmail").mkdir()
    cfg = work / "pi-pull.ini"
    cfg.write_text(
        f"[remote]\nurl = {repo.bare}\n[node]\nallowed_signers = {signers}\n"
        f"[paths]\nroot = {work / 'node'}\nmail_root = {work / 'vmail'}\nmail_uid = 1\nmail_gid = 1\nsync = no\n"
        "[services]\npostfix_reload = true\ndovecot_reload = true\nmap_type = texthash\n[lifecycle]\npurge = yes\n"
    )
    script = str(pi_pull_script())
    first = subprocess.run([python, script, "--config", str(cfg), "--once"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    grave = work / "vmail" / ".graveyard"
    grave.mkdir(mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for i in range(50):
        (grave / f"{stamp}_example.com_gone{i}~{box_id(i)}" / "Maildir" / "cur").mkdir(parents=True)
    tick = timed([python, script, "--config", str(cfg), "--once"], ticks + 1)[1:]
    assert len(os.listdir(grave)) == 50, "a no-op tick purged entries that were not due"
    return {
        "tick": tick,
        "py_pass": timed([python, "-c", "pass"], ticks),
        "py_help": timed([python, script, "--help"], ticks),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ticks", type=int, default=15)
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    args = ap.parse_args()
    pipull = import_pipull()
    tmp = Path(tempfile.mkdtemp(prefix="bench-node-usage-", dir="/tmp"))
    try:
        noop = bench_noop(args.ticks, tmp, args.python)
        sizes = [int(s) for s in args.sizes.split(",") if s]
        usage = {n: bench_usage(pipull, n, args.repeat, tmp) for n in sizes}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"no-op tick, whole process (median / p90 of {args.ticks}; lifecycle on, 50 graveyard entries listed, none due):")
    rows = [("python3 pi_pull.py --once (no-op)", noop["tick"]), ("baseline: python3 -c pass", noop["py_pass"]),
            ("baseline: python3 pi_pull.py --help", noop["py_help"])]
    for name, values in rows:
        print(f"  {name:<42} {ms(p50(values), 1):>8} ms  {ms(p90(values), 1):>8} ms")
    tick = p50(noop["tick"])
    print(f"  no-op tick - python3 -c pass: {ms(tick - p50(noop['py_pass']), 1)} ms; budget 200 ms: {'OK' if tick <= 0.2 else 'OVER'}")
    print()
    print(f"usage measurement (median of {args.repeat}, warm page cache; per tick = per run x {INTERVAL:.0f}/{USAGE_INTERVAL:.0f}):")
    print(f"  {'mailboxes':>10} {'per run':>10} {'p90':>10} {'per tick':>10} {'of which git':>13} {'baseline walk+lstat':>20} {'ratio':>7}")
    for n, r in usage.items():
        print(f"  {n:>10} {ms(r['run'], 0):>7} ms {ms(r['run_p90'], 0):>7} ms {ms(r['run'] * INTERVAL / USAGE_INTERVAL, 1):>7} ms"
              f" {ms(r['list'], 0):>10} ms {ms(r['walk'], 0):>17} ms {r['run'] / r['walk']:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
