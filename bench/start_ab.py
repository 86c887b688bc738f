"""Start time of two versions of mailstate on one data dir, alternating: before/after a change.

    python -m bench.start_ab --before 60443f7 --after 9228a4f [--size 100000] [--rounds 3]

`--before` and `--after` are git revisions of this repository (`--after` defaults to this
working tree); each is exported with `git archive` into a temp dir. The data dir is seeded by
the before side's `bench.seed`, so both sides must read the same state format. Each round
runs, for each side: drop the cache, `open_store` in a fresh process (cold), `open_store`
again (warm). Prints best and median.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env

_HOME = isolate_env()  # before anything imports pygit2

import argparse  # noqa: E402
import json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
_SNIPPET = """
import json, sys, time
from mailstate.state.datadir import open_store
t = time.perf_counter()
store = open_store(sys.argv[1])
print(json.dumps({"open": time.perf_counter() - t, "domains": len(store.snapshot.domains)}))
"""


def open_seconds(tree: Path, data: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _SNIPPET, str(data)],
        cwd=tree,
        env=os.environ | {"PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"open_store failed under {tree}:\n{out.stderr[-2000:]}")
    result: float = json.loads(out.stdout.strip().splitlines()[-1])["open"]
    return result


def export(rev: str, into: Path) -> Path:
    """The tree of `rev` (git archive), unpacked into `into`."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.start_ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="git revision of the 'before' side")
    parser.add_argument("--after", default=None, help="git revision of the 'after' side (default: this working tree)")
    parser.add_argument("--size", type=int, default=100000, help="mailboxes (5 per domain)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailstate-start-ab-"))
    try:
        before = export(args.before, work / "before")
        after = export(args.after, work / "after") if args.after else REPO_ROOT
        data = work / "data"
        seed = f"from bench.seed import seed_state; seed_state(__import__('pathlib').Path({str(data)!r}), {args.size})"
        subprocess.run(
            [sys.executable, "-c", seed],
            cwd=before,
            env=os.environ | {"PYTHONPATH": str(before)},
            check=True,
            capture_output=True,
        )
        subprocess.run(["git", "-C", str(data / "state.git"), "repack", "-adq"], check=True)
        sides = {f"before ({args.before})": before, f"after ({args.after or 'this tree'})": after}
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
        for _ in range(args.rounds):
            for name, tree in sides.items():
                shutil.rmtree(data / "cache", ignore_errors=True)
                times[name][0].append(open_seconds(tree, data))
                times[name][1].append(open_seconds(tree, data))
        for name, (cold, warm) in times.items():
            cold.sort()
            warm.sort()
            print(
                f"{args.size} mailboxes {name:>24}: cold best {cold[0]:.2f} s (median {cold[len(cold) // 2]:.2f}), "
                f"warm best {warm[0]:.2f} s (median {warm[len(warm) // 2]:.2f})"
            )
        print(f"1-min load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
