"""The node's apply path: first apply and one-mailbox applies, old code against new, one run.

    python -m bench.bench_node_apply [--sizes 100000] [--changes 5] [--variants old,flat,buckets16,before16] [--before REV]
                                     [--python /usr/bin/python3] [--keep DIR]

A state of N mailboxes (5 per domain, bench.seed.domain_names, format 2: passwd,
virtual_mailbox_maps, virtual_mailbox_domains and mailboxes per domain, and a
virtual_alias_maps fragment for every 10th domain) is written straight into a bare repo with
``git fast-import`` (seconds at 100k, ~2 min at 1M), then ``--changes`` commits that each add one
mailbox to one random domain (its passwd, virtual_mailbox_maps and mailboxes change).

Each variant follows the same commits in its own release root (the repo is shared as its
``mirror.git``), one **process** per apply (``--python``, as the timer runs the agent), doing
what a tick does around the build: ``Releases.build`` (validate, passwd-files, maps, postmap),
``Lifecycle.before_swap``, the atomic swap, ``Lifecycle.after_reload`` (graveyard sweep of the
changed domains, against an empty mail root) and ``prune`` (keep_releases = 2, so each apply
deletes one old release, as on a node that has run a while). Not included, the same for every
variant: fetch + signature checks (~0.1 s), the reloads (~50 ms on the real node), the report.

Variants:
- ``old``: the agent package of ``--baseline`` (default 2d94ef7, the agent before the bucketed layout), taken with
  ``git archive`` into a temp dir: the baseline, measured in the same run on the same commits.
- ``flat``: this tree, ``map_buckets = 0`` (one table per map, flat passwd.d: older bundles).
- ``bucketsN``: this tree, ``map_buckets = N`` (pipull/buckets.py).
- ``beforeN``: the agent package of ``--before`` (a revision, e.g. the one before a change to the
  bucketed layout), ``map_buckets = N``: a same-run baseline for the bucketed layout itself.

Prints, per size and variant: first apply (process wall, and the in-process part), the
one-mailbox applies (p50/p90 process wall, p50 in-process), ratios against ``old``, and the
release root's disk use. Progress on stderr, results on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import isolate_env, p50, p90

isolate_env()

from bench.seed import domain_names  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HASH = "{BLF-CRYPT}$2b$04$" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"

DRIVER = r"""
import io, json, os, sys, time
t0 = time.perf_counter()
agent_dir, root, tip, buckets, mail_root = sys.argv[1:6]
sys.path.insert(0, agent_dir)
from pipull import config, lifecycle, log, mirror, release, runner
cfg = config.Config(remote_url="/dev/null", root=root, mail_root=mail_root, mail_uid=5000, mail_gid=5000, sync=False,
                    keep_releases=2, map_type="hash", postmap="postmap -c " + os.environ["BENCH_POSTFIX_ETC"])
cfg.map_buckets = int(buckets)
cfg.node_name = os.environ.get("BENCH_NODE_NAME", "")
lg = log.make_logger(stream=io.StringIO())
rn = runner.Runner()
mi = mirror.Mirror(cfg, rn, lg)
rel = release.Releases(cfg, rn, lg, mi)
lc = lifecycle.Lifecycle(cfg, mi, rel, lg)
stf = os.path.join(root, "bench-state.json")
st = json.load(open(stf)) if os.path.exists(stf) else {"history": []}
t1 = time.perf_counter()
current = rel.current_commit()
manifest = rel.build(tip, current)
lc.before_swap(tip, current)
rel.swap_to(tip)
lc.after_reload(st, tip, current)
st["previous_commit"], st["applied_commit"] = current, tip
st["history"] = [tip] + [s for s in st["history"] if s != tip][:48]
rel.prune(st)
t2 = time.perf_counter()
json.dump(st, open(stf, "w"))
print(json.dumps({"inproc": t2 - t1, "imports": t1 - t0, "domains": manifest["domains"], "mailboxes": manifest["mailboxes"]}))
"""


def say(msg: str) -> None:
    print(f"[bench_node_apply] {msg}", file=sys.stderr, flush=True)


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    r = subprocess.run(["git", "--git-dir", str(repo), *args], input=input, capture_output=True, check=True)
    return r.stdout.decode().strip()


def blob(path: str, text: str) -> bytes:
    data = text.encode()
    return b"M 100644 inline " + path.encode() + b"\ndata " + str(len(data)).encode() + b"\n" + data + b"\n"


class Seeder:
    """Writes the rendered files of a synthetic state straight into a bare repo (git fast-import)."""

    def __init__(self, repo: Path, mailboxes: int, mail_root: Path) -> None:
        self.repo = repo
        self.root = str(mail_root)
        self.domains = domain_names(mailboxes // 5)
        self.boxes: dict[str, list[tuple[str, str]]] = {}
        n = 0
        for d in self.domains:
            self.boxes[d] = []
            for j in range(5):
                n += 1
                self.boxes[d].append((f"user{j}", f"20261201-{n:06x}"[-15:]))
        self.n = n
        self.mark = 0

    def files(self, d: str) -> list[bytes]:
        base = f"rendered/domains/{d[:2]}/{d}"
        boxes = sorted(self.boxes[d])
        out = [
            blob(
                f"{base}/passwd",
                "".join(
                    f"{loc}@{d}:{HASH}:5000:5000::{self.root}/{d}/{loc}~{i}::userdb_quota_rule=*:storage=1024M\n"
                    for loc, i in boxes
                ),
            ),
            blob(f"{base}/virtual_mailbox_maps", "".join(f"{loc}@{d} {d}/{loc}~{i}/\n" for loc, i in boxes)),
            blob(f"{base}/mailboxes", "".join(f"{loc} {i} active\n" for loc, i in boxes)),
        ]
        return out

    def commit(self, body: list[bytes], message: str) -> str:
        self.mark += 1
        head = [
            b"commit refs/heads/main\n",
            f"mark :{self.mark}\n".encode(),
            b"committer bench <bench@example.invalid> 1764547200 +0000\n",
            f"data {len(message)}\n{message}\n".encode(),
        ]
        if self.mark > 1:
            head.append(f"from :{self.mark - 1}\n".encode())
        return self._run(b"".join(head) + b"".join(body) + b"\n")

    def _run(self, stream: bytes) -> str:
        self._proc.stdin.write(stream)  # type: ignore[union-attr]
        self._proc.stdin.write(f"get-mark :{self.mark}\n".encode())  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]
        return self._proc.stdout.readline().decode().strip()  # type: ignore[union-attr]

    def __enter__(self) -> Seeder:
        subprocess.run(["git", "init", "--quiet", "--bare", str(self.repo)], check=True)
        self._proc = subprocess.Popen(
            ["git", "--git-dir", str(self.repo), "fast-import", "--quiet", "--done"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.stdin.write(b"done\n")  # type: ignore[union-attr]
        self._proc.stdin.close()  # type: ignore[union-attr]
        self._proc.wait()

    def seed(self) -> str:
        body = [blob("rendered/settings", "format 2\npurge_after_days 7\n")]
        for k, d in enumerate(self.domains):
            body += self.files(d)
            body.append(blob(f"rendered/domains/{d[:2]}/{d}/virtual_mailbox_domains", f"{d} OK\n"))
            if k % 10 == 0:
                body.append(
                    blob(
                        f"rendered/domains/{d[:2]}/{d}/virtual_alias_maps",
                        f"info@{d} user0@{d},someone@elsewhere.example\n",
                    )
                )
        return self.commit(body, "seed")

    def one_mailbox(self, rng: random.Random, k: int) -> str:
        d = rng.choice(self.domains)
        self.n += 1
        self.boxes[d].append((f"bench{k}", f"20261202-{self.n:06x}"[-15:]))
        return self.commit(self.files(d), f"add bench{k}@{d}")


def run_apply(
    python: str, agent_dir: Path, root: Path, tip: str, buckets: int, mail_root: Path, etc: Path
) -> dict[str, float]:
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(
        [python, "-c", DRIVER, str(agent_dir), str(root), tip, str(buckets), str(mail_root)],
        capture_output=True,
        text=True,
        env=os.environ | {"BENCH_POSTFIX_ETC": str(etc)},
        timeout=3600,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"apply failed ({root.name}):\n{r.stderr[-3000:]}")
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    # CPU of the apply process and everything it ran (git, the helper, postmap): beside the wall
    # time it tells work from waiting for a core on a shared machine.
    out["cpu_user"] = after.ru_utime - before.ru_utime
    out["cpu_sys"] = after.ru_stime - before.ru_stime
    out["cpu"] = out["cpu_user"] + out["cpu_sys"]
    return out


def count_files(root: Path) -> int:
    """Regular files under ``root``, the mirror left out."""
    return sum(len(files) for folder, _, files in os.walk(root) if "mirror.git" not in Path(folder).parts)


def file_creation_baseline(where: Path, files: int) -> tuple[float, float]:
    """Create ``files`` small files (500 a folder; open, write, fchmod, close, as the apply's
    helper does) in a bare loop on the same file system: (wall s, kernel CPU s). What the disk
    alone charges for a first apply's files, measured in the same run."""
    where.mkdir()
    t, before = time.perf_counter(), os.times()
    for i in range(files):
        folder = where / f"d{i // 500}"
        if i % 500 == 0:
            folder.mkdir()
        fd = os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 200)
        os.fchmod(fd, 0o640)
        os.close(fd)
    wall, after = time.perf_counter() - t, os.times()
    return wall, after.system - before.system


def du(path: Path) -> int:
    r = subprocess.run(["du", "-sb", "--exclude=mirror.git", str(path)], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--variants", default="old,flat,buckets16")
    ap.add_argument("--baseline", default="2d94ef7")
    ap.add_argument("--before", default="", help="revision whose agent the beforeN variants run")
    ap.add_argument("--python", default="/usr/bin/python3")
    ap.add_argument("--keep", default="")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-node-apply-"))
    tmp.mkdir(parents=True, exist_ok=True)
    etc = tmp / "postfix-etc"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = bench.test\n")
    old = time.time() - 60
    os.utime(etc / "main.cf", (old, old))  # a "hot" main.cf makes every postmap wait ~2 s
    mail_root = tmp / "vmail"
    mail_root.mkdir(exist_ok=True)
    baseline_dir = tmp / "baseline-agent"
    before_dir = tmp / "before-agent"
    for wanted, rev, where in (("old", args.baseline, baseline_dir), ("before", args.before, before_dir)):
        if not any(v.startswith(wanted) for v in args.variants.split(",")):
            continue
        if not rev:
            ap.error(f"the {wanted} variants need --{'baseline' if wanted == 'old' else 'before'} REV")
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
        arch = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", rev, "pi-pull/pipull"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(where), "--strip-components=1"], input=arch.stdout, check=True)
    t_all = time.perf_counter()
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            repo = tmp / f"state-{size}.git"
            shutil.rmtree(repo, ignore_errors=True)
            t = time.perf_counter()
            rng = random.Random(size)
            with Seeder(repo, size, mail_root) as seeder:
                commits = [seeder.seed()]
                commits += [seeder.one_mailbox(rng, k) for k in range(args.changes + 1)]
            subprocess.run(["git", "--git-dir", str(repo), "repack", "-adq"], check=True)
            say(
                f"seeded {size} mailboxes ({len(seeder.domains)} domains) + {args.changes + 1} changes in {time.perf_counter() - t:.1f} s"
            )
            rows = []
            for variant in args.variants.split(","):
                buckets = (
                    0 if variant in ("old", "flat") else int(variant.removeprefix("buckets").removeprefix("before"))
                )
                agent_dir = (
                    baseline_dir
                    if variant == "old"
                    else before_dir
                    if variant.startswith("before")
                    else REPO_ROOT / "pi-pull"
                )
                root = tmp / f"node-{size}-{variant}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                (root / "mirror.git").symlink_to(repo)
                first = run_apply(args.python, agent_dir, root, commits[0], buckets, mail_root, etc)
                say(
                    f"{size} {variant}: first apply {first['wall']:.2f} s (CPU {first['cpu_user']:.2f} s user + {first['cpu_sys']:.2f} s sys, load {os.getloadavg()[0]:.1f})"
                )
                # one unmeasured warm-up change, then the measured ones
                run_apply(args.python, agent_dir, root, commits[1], buckets, mail_root, etc)
                applies = [run_apply(args.python, agent_dir, root, c, buckets, mail_root, etc) for c in commits[2:]]
                say(f"{size} {variant}: one-mailbox apply p50 {p50([a['wall'] for a in applies]):.3f} s")
                rows.append((variant, first, applies, du(root)))
            base = next((r for r in rows if r[0] == "old"), rows[0])
            print(
                f"\n## {size} mailboxes ({size // 5} domains), {args.changes} one-mailbox applies per variant, python {args.python}"
            )
            print(
                f"{'variant':<11}{'first apply':>12}{'(in-proc)':>11}{'apply p50':>11}{'p90':>8}{'in-proc p50':>13}{'vs old':>8}"
                f"{'imports':>9}{'disk':>9}"
            )
            for variant, first, applies, disk in rows:
                wall = p50([a["wall"] for a in applies])
                ratio = wall / p50([a["wall"] for a in base[2]])
                print(
                    f"{variant:<11}{first['wall']:>10.2f} s{first['inproc']:>9.2f} s{wall * 1000:>8.0f} ms"
                    f"{p90([a['wall'] for a in applies]) * 1000:>6.0f} ms{p50([a['inproc'] for a in applies]) * 1000:>10.0f} ms"
                    f"{ratio:>7.2f}x{p50([a['imports'] for a in applies]) * 1000:>6.0f} ms{disk / 1e6:>7.0f} MB"
                )
            files = count_files(tmp / f"node-{size}-{rows[-1][0]}")
            wall, kernel = file_creation_baseline(tmp / f"files-{size}", files)
            print(
                f"baseline: creating the {files} files of one release in a bare loop: {wall:.2f} s "
                f"({kernel:.2f} s kernel CPU, {wall / max(files, 1) * 1e6:.0f} us a file)"
            )
            sys.stdout.flush()
            if not args.keep:
                # Only now: on this ext4, creating inodes right after deleting many is several times
                # slower (the kernel's recently-deleted inode scan), which would penalise later variants.
                for variant in args.variants.split(","):
                    shutil.rmtree(tmp / f"node-{size}-{variant}", ignore_errors=True)
                shutil.rmtree(tmp / f"files-{size}", ignore_errors=True)
                shutil.rmtree(repo, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n# whole bench: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
