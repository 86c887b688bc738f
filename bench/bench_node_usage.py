"""What the node's mailbox lifecycle costs: the usage measurement at 10k and 100k
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
   (tests.helpers.mailnode.StateRepo, format 2, a signed statement) that the node already applied,
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
        for sub in ("cur", "new", ".Sent/cur", ".Sent/new", ".Sent", ""):  # the last change was long ago
            os.utime(md / sub, (1_700_000_000, 1_700_000_000))
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
    return subprocess.run(
        ["git", "--git-dir", str(mirror), "rev-parse", "main"], check=True, capture_output=True, text=True
    ).stdout.strip()


def naive_walk(root: Path) -> tuple[int, int]:
    used = count = 0
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) not in ("cur", "new"):
            continue
        for name in files:
            used += os.lstat(os.path.join(dirpath, name)).st_size
            count += 1
    return used, count


def deliver(mail_root: Path, boxes: list[tuple[str, str, str]], picks: range, tag: str) -> int:
    """One new message (``,S=1000``) in new/ of every picked mailbox; the bytes added."""
    for i in picks:
        domain, local, bid = boxes[i]
        (mail_root / domain / f"{local}~{bid}" / "Maildir" / "new" / f"1700000300.M{i}P{tag}.bench,S=1000").write_bytes(
            b""
        )
    return 1000 * len(picks)


def bench_usage(pipull: ModuleType, n: int, repeat: int, tmp: Path, budget: float) -> dict[str, float]:
    work = tmp / f"usage-{n}"
    mail_root = work / "vmail"
    t0 = time.monotonic()
    log(f"usage at {n} mailboxes: building the mail root and the mirror ...")
    boxes = build_mail_root(mail_root, n)
    node_root = work / "node"
    node_root.mkdir()
    sha = build_mirror(node_root / "mirror.git", boxes)
    log(f"  built in {time.monotonic() - t0:.1f}s")
    cfg = pipull.config.Config(
        remote_url="/unused",
        root=str(node_root),
        mail_root=str(mail_root),
        mail_uid=1,
        mail_gid=1,
        report_url="http://127.0.0.1:9/unused",
    )
    cfg.usage_budget_s = budget
    quiet = logging.getLogger("bench-usage")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    runner = pipull.runner.Runner()
    mirror = pipull.mirror.Mirror(cfg, runner, quiet)
    releases = pipull.release.Releases(cfg, runner, quiet, mirror)
    clock = [1_800_000_000.0]
    life = pipull.lifecycle.Lifecycle(cfg, mirror, releases, quiet, clock=lambda: clock[0])
    usage = pipull.usage
    cache = node_root / usage.USAGE_CACHE_DIR
    total = [n * 4 * 2000, n * 4]
    r: dict[str, float] = {}

    def totals(out: list[dict[str, object]]) -> list[int]:
        return [sum(int(e["used_bytes"]) for e in out), sum(int(e["messages"]) for e in out)]  # type: ignore[call-overload]

    # The old way (before the cache): every folder of every mailbox listed, one run = one tick.
    # The first run warms the page cache and is not counted.
    olds = []
    for _ in range(repeat + 1):
        t = time.monotonic()
        out = list(usage.measure(str(mail_root), boxes))
        olds.append(time.monotonic() - t)
        assert totals(out) == total
    r["old"] = p50(olds[1:])
    t = time.monotonic()
    tree = releases.list_rendered(sha)
    life._mailboxes(tree, sorted(tree))
    r["git"] = time.monotonic() - t

    def one_pass() -> tuple[float, int, int]:
        sc = usage.Scanner(str(mail_root), str(cache), float("inf"))
        ls: dict[str, object] = {}
        t = time.monotonic()
        out = sc.step(ls, sha, lambda: boxes)
        dt = time.monotonic() - t
        assert usage.PASS_STATE not in ls and totals(out) == total, (totals(out), total)
        return dt, sc.listed, sc.hits

    # First full pass: an empty cache (a new node, or a lost cache).
    firsts = []
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        firsts.append(one_pass()[0])
    r["first"] = p50(firsts)
    # Incremental pass: 1% of the mailboxes got a message in new/ since the last pass.
    one = max(1, n // 100)
    incs, listed = [], 0
    for k in range(repeat):
        total[0] += deliver(mail_root, boxes, range(k * one, (k + 1) * one), str(k))
        total[1] += one
        dt, listed, _hits = one_pass()
        incs.append(dt)
    r["inc"], r["inc_listed"] = p50(incs), listed

    # Per tick under the budget, as a tick calls it (Lifecycle.usage: git once per pass, then
    # slices of at most usage_budget_s): a first pass from an empty cache, then an incremental one.
    def ticks() -> list[float]:
        st: dict[str, object] = {"applied_commit": sha, "lifecycle": {"purge_after_days": 7}}
        clock[0] += USAGE_INTERVAL
        got, out_all = [], []
        while True:
            t = time.monotonic()
            out = life.usage(st)
            got.append(time.monotonic() - t)
            assert out is not None
            out_all += out
            if usage.PASS_STATE not in st["lifecycle"]:  # type: ignore[operator]
                break
            clock[0] += INTERVAL
        assert totals(out_all) == total and len(out_all) == n
        return got

    shutil.rmtree(cache, ignore_errors=True)
    cold = ticks()
    total[0] += deliver(mail_root, boxes, range(n - one, n), "t")
    total[1] += one
    warm = ticks()
    r.update(
        tick_first_max=max(cold),
        tick_first_n=len(cold),
        tick_inc_max=max(warm),
        tick_inc_n=len(warm),
        cache_bytes=sum(p.stat().st_size for p in cache.iterdir()),
    )
    shutil.rmtree(work, ignore_errors=True)
    return r


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True)
        out.append(time.monotonic() - t)
        assert r.returncode == 0, r.stderr
    return out


def bench_noop(ticks: int, tmp: Path, python: str) -> dict[str, list[float]]:
    from tests.helpers.mailnode import StateRepo, make_signing_key, pi_pull_script, write_allowed_signers

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
    ap.add_argument("--budget", type=float, default=2.0, help="[lifecycle] usage_budget_s for the per-tick figures")
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    args = ap.parse_args()
    pipull = import_pipull()
    tmp = Path(tempfile.mkdtemp(prefix="bench-node-usage-", dir="/tmp"))
    try:
        noop = bench_noop(args.ticks, tmp, args.python)
        sizes = [int(s) for s in args.sizes.split(",") if s]
        usage = {n: bench_usage(pipull, n, args.repeat, tmp, args.budget) for n in sizes}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"no-op tick, whole process (median / p90 of {args.ticks}; lifecycle on, 50 graveyard entries listed, none due):"
    )
    rows = [
        ("python3 pi_pull.py --once (no-op)", noop["tick"]),
        ("baseline: python3 -c pass", noop["py_pass"]),
        ("baseline: python3 pi_pull.py --help", noop["py_help"]),
    ]
    for name, values in rows:
        print(f"  {name:<42} {ms(p50(values), 1):>8} ms  {ms(p90(values), 1):>8} ms")
    tick = p50(noop["tick"])
    print(
        f"  no-op tick - python3 -c pass: {ms(tick - p50(noop['py_pass']), 1)} ms; budget 200 ms: {'OK' if tick <= 0.2 else 'OVER'}"
    )
    print()
    print(
        f"usage measurement (median of {args.repeat}, page cache warm after the first old walk; budget {args.budget:g} s per tick):"
    )
    print("  old = the previous code: every cur/new folder of every mailbox listed in one tick (usage.measure)")
    for n, r in usage.items():
        old = r["old"]
        print(
            f"  {n} mailboxes: old full walk {ms(old, 0)} ms (git listing of the mailboxes {ms(r['git'], 0)} ms, once per pass)"
        )
        print(f"    first full pass (empty cache)      {ms(r['first'], 0):>8} ms  {r['first'] / old:>6.2f}x old")
        print(
            f"    incremental pass, 1% changed       {ms(r['inc'], 0):>8} ms  {r['inc'] / old:>6.2f}x old  ({r['inc_listed']:.0f} listings)"
        )
        print(
            f"    per tick, first pass, max{ms(r['tick_first_max'], 0):>17} ms  {r['tick_first_max'] / old:>6.2f}x old  ({r['tick_first_n']:.0f} ticks)"
        )
        print(
            f"    per tick, incr. pass, max{ms(r['tick_inc_max'], 0):>17} ms  {r['tick_inc_max'] / old:>6.2f}x old  ({r['tick_inc_n']:.0f} ticks)"
        )
        print(f"    cache on disk                      {r['cache_bytes'] / 1e6:>8.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
