"""Store writes with two versions of state/gitrepo.py in ONE process, write by write.

    python -m bench.gitrepo_ab [--before main] [--mailboxes 100000] [--writes 600] [--levels 0]

One seeded data dir (bench.seed) is copied once per arm and opened with `open_store`; the
"before" arm's store uses the GitRepo of `state/gitrepo.py` at the git revision `--before`
(read with `git show`, loaded beside this tree's), the others this tree's GitRepo, one arm per
`--levels` value of STAGED_ZLIB_LEVEL. The arms then take turns, one write each, the order
rotating (bench_store's write mix: remove-user, link-domain, enable-email, add-node,
disable-email), so every arm sees the same machine: on a shared, loaded box the difference
between arms holds where the absolute figures of separate runs do not. Prints wall and CPU
p50 per arm, for each third of the run and overall. Only valid while the rest of the package
works with the before side's GitRepo (same methods).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50

_HOME = isolate_env()  # before anything imports pygit2 (libgit2 reads HOME once, at init)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
from types import ModuleType  # noqa: E402

from bench.bench_store import StoreWrites  # noqa: E402
from bench.seed import seed_state  # noqa: E402
from mailstate.state import gitrepo  # noqa: E402
from mailstate.state import store as store_module  # noqa: E402
from mailstate.state.datadir import open_store  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5


def load_before(rev: str, folder: Path) -> ModuleType:
    """state/gitrepo.py at `rev`, loaded as its own module."""
    text = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"{rev}:state/gitrepo.py"], capture_output=True, text=True, check=True
    ).stdout
    path = folder / "gitrepo_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("mailstate.state.gitrepo_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_arms(args: argparse.Namespace, work: Path) -> dict[str, tuple[StoreWrites, int | None]]:
    """Arm name -> (its writes, the STAGED_ZLIB_LEVEL to set before each, None for before)."""
    seed = work / "seed"
    gitrepo.set_durable(False)  # seeding only; the measured writes are durable
    try:
        info = seed_state(seed, args.mailboxes)
    finally:
        gitrepo.set_durable(True)
    before = load_before(args.before, work)
    arms: dict[str, tuple[StoreWrites, int | None]] = {}
    for name, level in [("before", None), *((f"after-z{lv}", int(lv)) for lv in args.levels.split(","))]:
        shutil.copytree(seed, work / name, symlinks=True)
        store_module.GitRepo = before.GitRepo if level is None else gitrepo.GitRepo  # type: ignore[misc]
        try:
            store = open_store(work / name)
        finally:
            store_module.GitRepo = gitrepo.GitRepo  # type: ignore[misc]
        assert type(store.git) is (before.GitRepo if level is None else gitrepo.GitRepo)
        arms[name] = (StoreWrites(store, info), level)
    return arms


def run(arms: dict[str, tuple[StoreWrites, int | None]], writes: int) -> None:
    def step(name: str) -> tuple[float, float]:
        w, level = arms[name]
        if level is not None:
            gitrepo.STAGED_ZLIB_LEVEL = level
        return w.step(), w.last_cpu

    names = list(arms)
    for name in names:
        for _ in range(WARMUP):
            step(name)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for i in range(writes):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            dt, c = step(name)
            wall[name].append(dt)
            cpu[name].append(c)
        if (i + 1) % max(1, writes // 3) == 0:
            loads.append(os.getloadavg()[0])
    third = max(1, writes // 3)
    for k, load in enumerate(loads[:3]):
        part = slice(k * third, (k + 1) * third if k < 2 else None)
        cells = "  ".join(f"{n} {ms(p50(wall[n][part]))}/{ms(p50(cpu[n][part]))}" for n in names)
        print(f"third {k + 1}, p50 wall/cpu ms: {cells}  (load {load:.1f})")
    for name in names:
        print(f"{name:10} {writes} writes  wall p50 {ms(p50(wall[name]))} ms  cpu p50 {ms(p50(cpu[name]))} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git revision of state/gitrepo.py to compare with")
    parser.add_argument("--mailboxes", type=int, default=100000)
    parser.add_argument("--writes", type=int, default=600, help="measured writes per arm")
    parser.add_argument("--levels", default="0", help="STAGED_ZLIB_LEVEL of this tree's arms, comma-separated")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailstate-gitrepo-ab-") as tmp:
        arms = open_arms(args, Path(tmp))
        print(f"load {os.getloadavg()[0]:.1f} at start; {args.mailboxes} mailboxes; before = {args.before}")
        run(arms, args.writes)
        print(f"load {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
