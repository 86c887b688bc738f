"""Write latency of the store against `git add && git commit -S` and the irreducible git work.

    python -m bench.bench_store [--sizes 1000,10000,100000] [--writes 200] [--cli-commits 30]
                                [--ssh-size 10000] [--profile] [--keep DIR]

For each size (mailboxes; 5 per domain) it seeds a data dir (bench.seed), then measures, in
the same run and against the same repo:

* start cold / warm: `open_store` in a fresh Python process, without and with the parse
  cache (DIR/cache/domains.pickle). The figure is open_store alone; imports are printed apart.
* store p50 / p90: `Store.execute` of writes that are not bcrypt-bound, cycling through
  remove-user (soft, a distinct mailbox each time), link-domain (a new domain),
  enable-email and disable-email (that new, empty domain) and add-node.
* git CLI p50: in a non-bare clone of the same state, rewrite one domain file (one mailbox
  set inactive) and run `git add <file> && git commit -S` with SSH signing by the data
  dir's own key (`-c gpg.format=ssh -c user.signingkey=DIR/signing_key`).
* irreducible p50: with the store's own in-process signer, write one blob, one one-entry
  tree and one signed commit object with pygit2 (no ref update, no tree rebuild).
* fsync on / off: the store's writes are durable (the default: one syncfs of the repo's
  filesystem for the write's loose objects, then the fsynced ref). To show what that costs, the same store then
  alternates write by write between durable and not (`gitrepo.set_durable`), so both halves
  see the same machine and state.

With --ssh-size, the store p50 is measured again at that size with `SshKeygenSigner`
(ssh-keygen per commit) to show what the in-process signer buys.

GIT_* variables are cleared and HOME points at a temp dir before pygit2 is imported, so the
machine's git configuration cannot leak into either side.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2 (libgit2 reads HOME once, at init)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

import pygit2  # noqa: E402

from bench.seed import SeedInfo, domain_names, seed_state  # noqa: E402
from mailstate.state import files  # noqa: E402
from mailstate.state.datadir import open_store  # noqa: E402
from mailstate.state.gitrepo import GitRepo, set_durable  # noqa: E402
from mailstate.state.signing import SshKeygenSigner  # noqa: E402
from mailstate.state.snapshot import Actor  # noqa: E402
from mailstate.state.store import Store  # noqa: E402

ADMIN = Actor.admin("bench:admin")
REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5


# --- figures -------------------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    domains: int = 0
    buckets: int = 0
    seed_s: float = 0.0
    start_cold: float = 0.0
    start_warm: float = 0.0
    import_s: float = 0.0
    store: list[float] = field(default_factory=list)
    store_cpu: list[float] = field(default_factory=list)
    by_op: dict[str, list[float]] = field(default_factory=dict)
    cli: list[float] = field(default_factory=list)
    irreducible: list[float] = field(default_factory=list)
    ssh_store: list[float] = field(default_factory=list)
    ed_store: list[float] = field(default_factory=list)
    fsync_on: list[float] = field(default_factory=list)
    fsync_off: list[float] = field(default_factory=list)
    fsync_loose: list[float] = field(default_factory=list)
    fsync_probe: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    clone_s: float = 0.0


# --- server start --------------------------------------------------------------------------

_START_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from mailstate.state.datadir import open_store
t1 = time.perf_counter()
store = open_store(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "domains": len(store.snapshot.domains)}))
"""


def measure_start(info: SeedInfo, tries: int = 2) -> tuple[float, float, float]:
    """open_store seconds in a fresh process, best of `tries`: (cold, warm, imports)."""

    def run() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", _START_SNIPPET, str(info.root)],
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
        assert info.data_dir.cache.exists(), "the cold start did not write the parse cache"
        warms.append(run())
    return min(c["open"] for c in colds), min(w["open"] for w in warms), min(w["import"] for w in warms)


# --- the three measured things ---------------------------------------------------------------
# Each has step() -> seconds for one sample. bench_size interleaves them, so that all three
# see the same machine (other work on a shared box shifts every figure, not just one).


class StoreWrites:
    """An endless, repeatable sequence of non-bcrypt writes; each must make one commit."""

    def __init__(self, store: Store, info: SeedInfo, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.store = store
        self.info = info
        self.emails = rng.sample(info.emails, min(len(info.emails), 2000))
        existing = set(info.domains)
        self.new_domains = [d for d in domain_names(len(info.domains) + 3000, seed + 1000) if d not in existing]
        rng.shuffle(self.new_domains)
        self._ops = self._sequence()
        self.last_op = ""
        self.last_cpu = 0.0

    def _sequence(self) -> Iterator[tuple[str, Actor, dict[str, Any]]]:
        i = 0
        while True:
            email = self.emails[i % len(self.emails)]
            domain = self.new_domains[i]
            project = self.info.project_of[email.partition("@")[2]]
            owner = Actor.project(project, f"bench:project-{project}")
            yield "remove-user", owner, {"email": email}
            yield "link-domain", ADMIN, {"domain": domain, "project_id": project}
            yield "enable-email", owner, {"domain": domain}
            yield (
                "add-node",
                ADMIN,
                {"name": f"bench-node-{i}", "ip_address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"},
            )
            yield "disable-email", owner, {"domain": domain}
            i += 1

    def step(self, profile: cProfile.Profile | None = None) -> float:
        name, actor, data = next(self._ops)
        self.last_op = name
        if profile:
            profile.enable()
        t, c = time.perf_counter(), time.process_time()
        outcome = self.store.execute(name, actor, data)
        dt = time.perf_counter() - t
        self.last_cpu = time.process_time() - c
        if profile:
            profile.disable()
        if not outcome.result.get("commit"):
            raise RuntimeError(f"{name} {data} made no commit: {outcome.result}")
        return dt


def git_cli(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


class GitCliCommits:
    """`git add <file> && git commit -S` of a one-domain-file change in a non-bare clone."""

    def __init__(self, info: SeedInfo, work: Path) -> None:
        t = time.perf_counter()
        git_cli("clone", "-q", str(info.data_dir.repo), str(work), cwd=work.parent)
        self.clone_s = time.perf_counter() - t
        self.work = work
        self.conf = [
            "-c", "user.name=bench", "-c", "user.email=bench@localhost",
            "-c", "gpg.format=ssh", "-c", f"user.signingkey={info.data_dir.key}",
            "-c", "commit.gpgsign=true",
        ]  # fmt: skip
        self.targets = iter(random.Random(3).sample(info.domains, len(info.domains)))

    def step(self) -> float:
        domain = next(self.targets)
        rel = files.domain_path(domain)
        path = self.work / rel
        text = path.read_text()
        assert "active: true" in text, domain
        t = time.perf_counter()
        path.write_text(text.replace("active: true", "active: false", 1))
        git_cli(*self.conf, "add", rel, cwd=self.work)
        git_cli(*self.conf, "commit", "-S", "-q", "-m", f"remove-user {domain}", cwd=self.work)
        return time.perf_counter() - t

    def check_signed(self) -> None:
        raw = subprocess.run(
            ["git", "cat-file", "commit", "HEAD"], cwd=self.work, capture_output=True, text=True
        ).stdout
        assert "-----BEGIN SSH SIGNATURE-----" in raw, "the git CLI baseline did not sign"


class Irreducible:
    """Sign + one blob + one one-entry tree + one commit object, with the store's signer."""

    def __init__(self, store: Store) -> None:
        self.repo = store.git.repo
        self.signer = store.signer
        self.parent = pygit2.Oid(hex=store.head)
        sample = store.snapshot.domains[next(iter(store.snapshot.domains))]
        self.body = files.dump_domain(sample)
        self.name = files.domain_path(sample.domain).rpartition("/")[2]
        self.n = 0

    def step(self) -> float:
        self.n += 1
        data = self.body + f"# {self.n} {time.time_ns()}\n".encode()  # a new blob every time
        when = int(time.time())
        t = time.perf_counter()
        blob = self.repo.create_blob(data)
        tb = self.repo.TreeBuilder()
        tb.insert(self.name, blob, pygit2.GIT_FILEMODE_BLOB)
        tree = tb.write()
        person = pygit2.Signature("mailstate", "mailstate@localhost", when, 0)
        text = str(self.repo.create_commit_string(person, person, f"irreducible {self.n}\n", tree, [self.parent]))
        self.repo.create_commit_with_signature(text, self.signer.sign(text.encode()))
        return time.perf_counter() - t


def fsync_probe(folder: Path, n: int) -> float:
    """Seconds to create a 300-byte file and fsync it and its folder: the disk's fsync latency."""
    t = time.perf_counter()
    fd = os.open(folder / f"probe-{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 300)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return time.perf_counter() - t


# --- phase breakdown (--phases) ------------------------------------------------------------

# (owner, method, label): wrapped only if present, since store internals move.
_PHASES = [
    ("mailstate.state.store:Store", "changed_files", "changed_files (YAML dump + render)"),
    ("mailstate.state.gitrepo:GitRepo", "build_tree", "build_tree (blobs + trees)"),
    ("mailstate.state.gitrepo:GitRepo", "commit", "commit (text + sign + object)"),
    ("mailstate.state.gitrepo:GitRepo", "flush_objects", "flush_objects (one syncfs)"),
    ("mailstate.state.gitrepo:GitRepo", "move_branch", "move_branch (flush + lock + ref)"),
    ("mailstate.state.snapshot:Snapshot", "with_change", "Snapshot.with_change"),
    ("mailstate.state.store:Store", "_adopted", "_adopted (swap snapshot)"),
]


@contextmanager
def phase_timer(samples: dict[str, list[float]]) -> Iterator[None]:
    """Wrap the store's internal steps with wall-clock timers while the block runs."""
    import importlib

    undo = []
    for owner, attr, label in _PHASES:
        module, _, name = owner.partition(":")
        cls = getattr(importlib.import_module(module), name)
        orig = cls.__dict__.get(attr)
        if orig is None:
            continue

        def wrapped(*a: Any, _f: Any = orig, _label: str = label, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                samples.setdefault(_label, []).append(time.perf_counter() - t)

        setattr(cls, attr, wrapped)
        undo.append((cls, attr, orig))
    try:
        yield
    finally:
        for cls, attr, orig in undo:
            setattr(cls, attr, orig)


# --- driver --------------------------------------------------------------------------------


def bench_size(size: int, args: argparse.Namespace, workdir: Path, log: Callable[[str], None]) -> SizeResult:
    res = SizeResult(size=size)
    root = workdir / f"data-{size}"
    log(f"[{size}] seeding ...")
    set_durable(False)  # seeding writes ~80k objects at 100k; durability is measured below, not here
    try:
        info = seed_state(root, size)
    finally:
        set_durable(True)
    res.seed_s, res.domains, res.buckets = info.seconds, len(info.domains), info.buckets
    log(
        f"[{size}] seeded {size} mailboxes / {res.domains} domains / {res.buckets} buckets in {info.seconds:.1f} s {info.stats}"
    )

    res.start_cold, res.start_warm, res.import_s = measure_start(info)
    log(
        f"[{size}] open_store best of 2: cold {res.start_cold:.2f} s, warm {res.start_warm:.2f} s (imports {res.import_s:.2f} s)"
    )

    store = open_store(root)
    writes = StoreWrites(store, info)
    irreducible = Irreducible(store)
    work = workdir / f"clone-{size}"
    cli = GitCliCommits(info, work)
    res.clone_s = cli.clone_s
    log(
        f"[{size}] cloned in {cli.clone_s:.1f} s; measuring {args.writes} store writes, interleaved with the baselines ..."
    )

    for _ in range(WARMUP):
        writes.step()
        irreducible.step()
    for _ in range(3):
        cli.step()
    every = max(1, args.writes // max(1, args.cli_commits))
    prof = cProfile.Profile() if args.profile else None
    for n in range(args.writes):
        with phase_timer(res.phases) if args.phases else nullcontext():
            dt = writes.step(prof)
        res.store.append(dt)
        res.store_cpu.append(writes.last_cpu)
        res.by_op.setdefault(writes.last_op, []).append(dt)
        res.irreducible.append(irreducible.step())
        if n % every == 0 and len(res.cli) < args.cli_commits:
            res.cli.append(cli.step())
    while len(res.cli) < args.cli_commits:
        res.cli.append(cli.step())
    cli.check_signed()
    log(
        f"[{size}] store p50 {ms(p50(res.store))} ms p90 {ms(p90(res.store))} ms; irreducible p50 {ms(p50(res.irreducible))} ms; "
        f"git CLI p50 {ms(p50(res.cli))} ms"
    )
    if prof:
        log(f"[{size}] profile of {args.writes} store writes:")
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(45)

    if size == args.ssh_size:
        # Same store, same state: alternate the signer write by write.
        ed, ssh = store.signer, SshKeygenSigner(info.data_dir.key)
        for n in range(2 * min(args.writes, 60)):
            store.signer = ssh if n % 2 else ed
            (res.ssh_store if n % 2 else res.ed_store).append(writes.step())
        store.signer = ed
        log(
            f"[{size}] alternating signers: Ed25519Signer p50 {ms(p50(res.ed_store))} ms, SshKeygenSigner p50 {ms(p50(res.ssh_store))} ms"
        )

    if args.fsync_writes:
        # Same store, same state, round-robin write by write between three repo handles:
        # - on: the store's own, durable one (the staged objects as one fsynced pack, then the fsynced ref);
        # - off: opened with set_durable(False) (no pack, nothing fsynced), the old behaviour;
        # - loose: libgit2's fsync option on for the whole write. Before objects were staged it
        #   fsynced each loose object and its folder in the repo; now the objects it fsyncs are the
        #   staged ones (tmpfs), so it is kept only to read older records against.
        # Beside them, one bare fsync (create, write 300 bytes, fsync file and folder): on a
        # shared disk its latency decides what durability costs.
        durable = store.git
        set_durable(False)
        fast = GitRepo(durable.path)
        pygit2.settings.enable_fsync_gitdir(True)
        loose = GitRepo(durable.path)
        loose.repo.references.get("refs/heads/main")  # opens its refdb with fsync on
        pygit2.settings.enable_fsync_gitdir(False)
        set_durable(True)
        probe_dir = Path(tempfile.mkdtemp(dir=info.root, prefix="fsync-probe-"))
        try:
            for n in range(3 * args.fsync_writes):
                arm = n % 3
                store.git = (durable, fast, loose)[arm]
                if arm == 2:
                    pygit2.settings.enable_fsync_gitdir(True)
                try:
                    dt = writes.step()
                finally:
                    pygit2.settings.enable_fsync_gitdir(False)
                (res.fsync_on, res.fsync_off, res.fsync_loose)[arm].append(dt)
                if arm == 0:
                    res.fsync_probe.append(fsync_probe(probe_dir, n))
        finally:
            store.git = durable
            shutil.rmtree(probe_dir, ignore_errors=True)
        log(
            f"[{size}] round-robin: durable p50 {ms(p50(res.fsync_on))} ms, off {ms(p50(res.fsync_off))} ms, "
            f"loose-fsync {ms(p50(res.fsync_loose))} ms; one fsync {ms(p50(res.fsync_probe))} ms"
        )

    # Nothing is deleted until the end: on ext4, creating files right after deleting many
    # (a clone, a data dir) is slower (the inode allocator skips recently deleted inodes),
    # and every loose git object is a new file.
    return res


def table(results: list[SizeResult]) -> str:
    head = (
        f"{'mailboxes':>9} {'domains':>7} {'store p50':>9} {'p90':>7} {'cpu p50':>7} {'git CLI p50':>11} {'speedup':>7} "
        f"{'irreduc. p50':>12} {'store/irr':>9} {'start cold':>10} {'warm':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        s50, c50, i50 = p50(r.store), p50(r.cli), p50(r.irreducible)
        lines.append(
            f"{r.size:>9} {r.domains:>7} {ms(s50):>6} ms {ms(p90(r.store)):>7} {ms(p50(r.store_cpu)):>7} {ms(c50):>8} ms {c50 / s50:>6.1f}x "
            f"{ms(i50):>9} ms {s50 / i50:>8.1f}x {r.start_cold:>8.2f} s {r.start_warm:>4.2f} s"
        )
    lines.append("")
    lines.append("store p50 by operation (ms):")
    ops = sorted({op for r in results for op in r.by_op})
    lines.append(f"{'mailboxes':>9} " + " ".join(f"{op:>13}" for op in ops))
    for r in results:
        lines.append(f"{r.size:>9} " + " ".join(f"{ms(p50(r.by_op.get(op, []))):>13}" for op in ops))
    if any(r.phases for r in results):
        labels = list(dict.fromkeys(label for r in results for label in r.phases))
        lines.append("")
        lines.append("store write phases, p50 per call (ms):")
        lines.append(f"{'phase':<36} " + " ".join(f"{r.size:>9}" for r in results))
        for label in labels:
            lines.append(f"{label:<36} " + " ".join(f"{ms(p50(r.phases.get(label, []))):>9}" for r in results))
    if any(r.fsync_on for r in results):
        lines.append("")
        lines.append(
            "durability, round-robin write by write (ms): on = one fsynced pack of the objects + fsynced ref (the default),"
        )
        lines.append(
            "off = nothing fsynced (the old behaviour), loose = libgit2 fsync option on (staged objects: tmpfs); one fsync = file + folder"
        )
        head = f"{'mailboxes':>9} {'on p50':>8} {'p90':>7} {'off p50':>8} {'p90':>7} {'cost p50':>9} {'loose p50':>10} {'p90':>7} {'one fsync p50':>14}"
        lines.append(head)
        for r in results:
            if r.fsync_on:
                on, off = p50(r.fsync_on), p50(r.fsync_off)
                lines.append(
                    f"{r.size:>9} {ms(on):>8} {ms(p90(r.fsync_on)):>7} {ms(off):>8} {ms(p90(r.fsync_off)):>7} {'+' + ms(on - off):>9} "
                    f"{ms(p50(r.fsync_loose)):>10} {ms(p90(r.fsync_loose)):>7} {ms(p50(r.fsync_probe)):>14}"
                )
    for r in results:
        if r.ssh_store:
            s50, k50 = p50(r.ed_store), p50(r.ssh_store)
            lines.append("")
            lines.append(
                f"signer at {r.size} mailboxes, alternating write by write: in-process Ed25519Signer p50 {ms(s50)} ms, "
                f"SshKeygenSigner p50 {ms(k50)} ms (+{ms(k50 - s50)} ms, {k50 / s50:.1f}x)"
            )
    lines.append("")
    lines.append(
        "seed / clone (s): "
        + ", ".join(f"{r.size}: seed {r.seed_s:.1f}, clone {r.clone_s:.1f}, {r.buckets} buckets" for r in results)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="mailbox counts, comma-separated")
    parser.add_argument("--writes", type=int, default=200, help="measured store writes per size")
    parser.add_argument("--cli-commits", type=int, default=30, help="measured git CLI commits per size")
    parser.add_argument(
        "--ssh-size", type=int, default=10000, help="size at which to also measure SshKeygenSigner (0: never)"
    )
    parser.add_argument(
        "--fsync-writes",
        type=int,
        default=60,
        help="writes per arm of the durability round-robin (on/off/loose) per size (0: skip)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the store writes; stats go to stderr")
    parser.add_argument("--phases", action="store_true", help="time the store's internal steps per write (p50 table)")
    parser.add_argument("--keep", type=Path, default=None, help="keep data dirs and clones under this dir")
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mailstate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()[0]
    results = []
    try:
        for size in sizes:
            results.append(bench_size(size, args, workdir, log))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"mailstate store bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, pygit2 {pygit2.__version__} (libgit2 {pygit2.LIBGIT2_VERSION}), {git_version}"
    )
    print(
        f"{args.writes} store writes and {args.cli_commits} git CLI commits per size; times are wall clock per write; "
        f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (other work on the box skews figures)\n"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
