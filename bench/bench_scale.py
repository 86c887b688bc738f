"""The server at scale: 1M mailboxes / 200k domains against the same figures at a
small baseline size, all in one run.

    python -m bench.bench_scale [--sizes 10000,100000,1000000] [--writes 100] [--plan-max 1000000]
                                [--data DIR ...] [--keep]

For each size (mailboxes; 5 per domain, one project per ~1000 domains, so a project has ~1k
domains at every size) it seeds a data dir with `bench.seed` (git fast-import from 200k on;
seconds and disk use are reported), then measures against it:

* start cold / warm: `open_store` in a fresh process without and with the parse cache, best
  of 2; RSS after start (VmRSS after a gc.collect) and bytes per mailbox: (RSS after open -
  RSS after the imports) / mailboxes; the same once every domain has been read (a start
  leaves them unparsed, state.domainmap; an admin listing everything parses them all);
* write p50 / p90: `Store.execute` of non-bcrypt writes (bench_store.StoreWrites: remove-user,
  link-domain, enable-email, add-node, disable-email), each one signed commit, interleaved
  with the irreducible signed commit (bench_store.Irreducible) as the same-run baseline;
* list-users for one domain, list-domains for one project (~1k domains), each through
  `Store.execute` with the local database's usage lookup, and the admin's first and a later
  page of list-users (limit 1000), the first one right after a write (the sorted name list is
  built once per snapshot);
* repo growth per write after gc: a full `git gc --prune=now`, N writes, then the incremental
  step of `git gc --auto` (`git prune --expire=now && git repack -d`: the N writes' objects in
  one new pack, deltas only among themselves) and the growth of objects/ divided by N; then a
  full `git gc --prune=now` again (what `gc --auto` does once 50 packs pile up: one pack, in
  which git keeps the newest version of a tree whole and turns the version it replaced into a
  delta against it) and the growth over the first one;
* `mailstate plan` on a working tree with one changed file (a sparse clone of `domains/` and
  the top files, which is all plan reads when the settings are unchanged; up to --plan-max
  mailboxes).

Ratios are against the first (smallest) size of the same run. Progress goes to stderr, the
tables to stdout. `--data DIR` reuses data dirs seeded earlier (`python -m bench.seed`),
one per size, in order.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from bench.bench_store import Irreducible, StoreWrites  # noqa: E402
from bench.seed import SeedInfo, seed_state  # noqa: E402
from mailstate.state import files  # noqa: E402
from mailstate.state.datadir import DataDir, open_store  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.snapshot import Actor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN = Actor.admin("bench:admin")


@dataclass
class Row:
    size: int
    domains: int = 0
    seed_s: float = 0.0
    disk_mb: float = 0.0
    cold: float = 0.0
    warm: float = 0.0
    rss_mb: float = 0.0
    bytes_per_box: float = 0.0
    writes: list[float] = field(default_factory=list)
    irreducible: list[float] = field(default_factory=list)
    list_users_one: list[float] = field(default_factory=list)
    list_domains_1k: list[float] = field(default_factory=list)
    project_domains: int = 0
    admin_first_page: list[float] = field(default_factory=list)
    admin_next_page: list[float] = field(default_factory=list)
    growth_per_write: float = 0.0
    growth_full_gc: float = 0.0
    rss_all_mb: float = 0.0
    bytes_per_box_all: float = 0.0
    plan_s: float | None = None


_START = """
import gc, json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
t0 = time.perf_counter()
from mailstate.state.datadir import open_store
import mailstate.api.server  # what `mailstate serve` imports too
gc.collect()
base = rss()
t1 = time.perf_counter()
store = open_store(sys.argv[1])
t2 = time.perf_counter()
gc.collect()
after_open = rss()
t3 = time.perf_counter()
boxes = sum(len(dom.mailboxes) for dom in store.snapshot.domains.values())  # every domain parsed
t4 = time.perf_counter()
gc.collect()
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "rss": after_open, "base": base, "domains": len(store.snapshot.domains),
                  "rss_all": rss(), "parse_all": t4 - t3, "mailboxes": boxes}))
"""


def start(info: SeedInfo, tries: int = 2) -> tuple[float, float, dict[str, Any]]:
    def run() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", _START, str(info.root)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        )
        data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        assert data["domains"] == len(info.domains), data
        return data

    colds, warms = [], []
    for _ in range(tries):
        info.data_dir.cache.unlink(missing_ok=True)
        colds.append(run())
        warms.append(run())
    return min(c["open"] for c in colds), min(w["open"] for w in warms), min(warms, key=lambda w: w["rss"])


def objects_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "objects").rglob("*") if p.is_file())


def gc(repo: Path) -> None:
    """What `git gc --auto` does between full repacks: drop unreachable loose objects (the
    superseded statement tags), then pack the loose objects into one pack. (A full `git gc`
    of 1.2M objects takes minutes and only shrinks the figure: deltas against older objects.)"""
    subprocess.run(["git", "-C", str(repo), "prune", "--expire=now"], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(repo), "repack", "-d", "-q"], check=True, capture_output=True)


def full_gc(repo: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "gc", "--prune=now", "-q"], check=True, capture_output=True)


def timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def info_of(root: Path, mailboxes: int) -> SeedInfo:
    """A SeedInfo for a data dir seeded earlier by `python -m bench.seed` (same arguments)."""
    store = open_store(root)
    snap = store.snapshot
    names = sorted(snap.domains)
    project_of = {n: snap.domains[n].project_id or 0 for n in names}
    emails = [f"{local}@{n}" for n in names for local in sorted(snap.domains[n].mailboxes)]
    return SeedInfo(
        root, DataDir(root), store.head, names, project_of, emails, len(emails), len(set(project_of.values()))
    )


def bench_size(size: int, args: argparse.Namespace, work: Path, reuse: Path | None, log: Any) -> Row:
    row = Row(size)
    ndomains = -(-size // 5)
    projects = max(1, ndomains // 1000)
    if reuse is not None:
        info = info_of(reuse, size)
    else:
        log(f"[{size}] seeding ({projects} projects) ...")
        info = seed_state(work / f"data-{size}", size, projects=projects, fast=True)
    row.domains, row.seed_s = len(info.domains), info.seconds
    row.disk_mb = (
        int(subprocess.run(["du", "-sb", str(info.root)], capture_output=True, text=True).stdout.split()[0]) / 1e6
    )
    log(f"[{size}] {row.domains} domains; seed {row.seed_s:.1f} s {info.stats}; {row.disk_mb:.0f} MB")

    row.cold, row.warm, mem = start(info)
    row.rss_mb = mem["rss"] / 1e6
    row.bytes_per_box = (mem["rss"] - mem["base"]) / size
    row.rss_all_mb = mem["rss_all"] / 1e6
    row.bytes_per_box_all = (mem["rss_all"] - mem["base"]) / size
    log(
        f"[{size}] start cold {row.cold:.2f} s, warm {row.warm:.2f} s; RSS {row.rss_mb:.0f} MB ({row.bytes_per_box:.0f} B/mailbox); "
        f"with every domain parsed ({mem['parse_all']:.1f} s) {row.rss_all_mb:.0f} MB ({row.bytes_per_box_all:.0f} B/mailbox)"
    )

    db = LocalDB(info.data_dir.db)
    store = open_store(info.root, db=db)
    store.usage_source = db.usage_for
    writes, irr = StoreWrites(store, info), Irreducible(store)
    for _ in range(5):
        writes.step()
    for _ in range(args.writes):
        row.writes.append(writes.step())
        row.irreducible.append(irr.step())
    log(f"[{size}] write p50 {ms(p50(row.writes))} ms (irreducible {ms(p50(row.irreducible))} ms)")

    rng = random.Random(5)
    project = Actor.project(1, "bench:p1")
    mine = sorted(n for n, p in info.project_of.items() if p == 1)
    row.project_domains = len(store.execute("list-domains", project, {}).result["domains"])
    for _ in range(args.reads):
        dom = rng.choice(mine)
        row.list_users_one.append(timed(store.execute, "list-users", project, {"domain": dom}))
        row.list_domains_1k.append(timed(store.execute, "list-domains", project, {}))
    middle = {"cursor": None}
    for _ in range(max(3, args.reads // 20)):
        writes.step()  # a new snapshot: the admin's sorted list is built again on the first page
        t = time.perf_counter()
        first = store.execute("list-users", ADMIN, {"limit": 1000}).result
        row.admin_first_page.append(time.perf_counter() - t)
        middle["cursor"] = first["next_cursor"]
        row.admin_next_page.append(
            timed(store.execute, "list-users", ADMIN, {"limit": 1000, "cursor": middle["cursor"]})
        )
    log(
        f"[{size}] list-users one domain {ms(p50(row.list_users_one), 3)} ms; list-domains ({row.project_domains} domains) "
        f"{ms(p50(row.list_domains_1k))} ms; admin page 1 {ms(p50(row.admin_first_page))} ms, page 2 {ms(p50(row.admin_next_page))} ms"
    )

    repo = info.data_dir.repo
    t = time.perf_counter()
    full_gc(repo)
    full_gc(repo)  # the first one after the seed still re-deltifies the seed's objects
    before = objects_bytes(repo)
    for _ in range(args.growth_writes):
        writes.step()
    gc(repo)
    row.growth_per_write = (objects_bytes(repo) - before) / args.growth_writes
    full_gc(repo)
    row.growth_full_gc = (objects_bytes(repo) - before) / args.growth_writes
    log(
        f"[{size}] growth per write: {row.growth_per_write:.0f} B after the incremental gc, {row.growth_full_gc:.0f} B after a full gc "
        f"({args.growth_writes} writes; the gc's took {time.perf_counter() - t:.0f} s)"
    )
    db.close()

    if size <= args.plan_max:
        clone = work / f"clone-{size}"
        # A sparse checkout of what plan reads with the settings unchanged (domains/ and the
        # two top files): at 1M a full checkout is 1.2M files and minutes of disk.
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(repo), str(clone)], check=True, capture_output=True)
        for args in (
            ["sparse-checkout", "set", "--no-cone", "/domains/", "/mailstate.yaml", "/nodes.yaml"],
            ["checkout", "-q", "main"],
        ):
            subprocess.run(["git", "-C", str(clone), *args], check=True, capture_output=True)
        target = clone / files.domain_path(info.domains[len(info.domains) // 2])
        target.write_text(target.read_text().replace("active: true", "active: false", 1))
        cmd = [shutil.which("mailstate") or "mailstate", "plan", str(clone)]
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            out = subprocess.run(
                cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}
            )
            runs.append(time.perf_counter() - t)
            assert out.returncode in (0, 2), out.stderr
        row.plan_s = min(runs)
        log(f"[{size}] plan, one changed file: {row.plan_s:.2f} s (whole process)")
        shutil.rmtree(clone, ignore_errors=True)
    return row


def report(rows: list[Row]) -> None:
    base = rows[0]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b else "-"

    print(f"\nbaseline for the ratios: the {base.size} row of this run\n")
    head = [
        "mailboxes",
        "domains",
        "seed s",
        "disk MB",
        "cold s",
        "warm s",
        "RSS MB",
        "B/mbox",
        "RSS all",
        "B/mb all",
        "write p50",
        "p90",
        "irr p50",
        "ratio",
    ]
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = [r.size, r.domains, f"{r.seed_s:.0f}", f"{r.disk_mb:.0f}", f"{r.cold:.2f}", f"{r.warm:.2f}", f"{r.rss_mb:.0f}",
                 f"{r.bytes_per_box:.0f}", f"{r.rss_all_mb:.0f}", f"{r.bytes_per_box_all:.0f}",
                 ms(p50(r.writes)), ms(p90(r.writes)), ms(p50(r.irreducible)), ratio(p50(r.writes), p50(base.writes))]  # fmt: skip
        print(" ".join(f"{c:>9}" for c in cells))
    print()
    head = [
        "mailboxes",
        "users/dom ms",
        "ratio",
        "domains/prj",
        "list-dom ms",
        "ratio",
        "admin p1 ms",
        "p2 ms",
        "B/wr inc gc",
        "B/wr full gc",
        "plan s",
    ]
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = [r.size, ms(p50(r.list_users_one), 3), ratio(p50(r.list_users_one), p50(base.list_users_one)), r.project_domains,
                 ms(p50(r.list_domains_1k)), ratio(p50(r.list_domains_1k), p50(base.list_domains_1k)), ms(p50(r.admin_first_page)),
                 ms(p50(r.admin_next_page)), f"{r.growth_per_write:.0f}", f"{r.growth_full_gc:.0f}",
                 "-" if r.plan_s is None else f"{r.plan_s:.2f}"]  # fmt: skip
        print(" ".join(f"{c:>12}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--growth-writes", type=int, default=200)
    parser.add_argument(
        "--plan-max",
        type=int,
        default=1_000_000,
        help="measure plan up to this size (the sparse checkout is 0.2 files per mailbox)",
    )
    parser.add_argument(
        "--data", type=Path, action="append", default=[], help="a data dir seeded earlier, one per size in order"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dirs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mailstate-bench-scale-"))
    t0 = time.perf_counter()

    def log(text: str) -> None:
        print(f"{time.perf_counter() - t0:7.1f}s {text}", file=sys.stderr, flush=True)

    rows = []
    try:
        for i, size in enumerate(sizes):
            reuse = args.data[i] if i < len(args.data) else None
            rows.append(bench_size(size, args, work, reuse, log))
        report(rows)
        log(f"done in {time.perf_counter() - t0:.0f} s")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
