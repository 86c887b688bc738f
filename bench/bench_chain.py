"""Every commit verified: the cost of checking a range of N signed commits.

    python3 -m bench.bench_chain [--commits 1000]

Builds a repo of N SSH-signed commits (git commit -S, ed25519), then measures, in the same run:

* node:     pipull.chain.ChainVerifier.verify(root, tip): one rev-list, one cat-file --batch,
            ssh-keygen -Y verify per commit (4 at a time);
* server:   state.chain.range_problems(repo, root, tip): pygit2 walk, ssh-keygen per commit;
* baseline: `git verify-commit` once per commit (git + find-principals + verify each), what
            a tip-only check would cost N times over.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import isolate_env

isolate_env()

ROOT = Path(__file__).resolve().parents[1]


def build(work: Path, n: int) -> tuple[Path, Path, list[str]]:
    key = work / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)], check=True)
    signers = work / "allowed_signers"
    signers.write_text(f'mailstate namespaces="git" {(work / "key.pub").read_text().strip()}\n')
    repo = work / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    # fast-import writes unsigned commits; the signed ones need git commit -S: ~10 ms each.
    base = [
        "git",
        "-C",
        str(repo),
        "-c",
        "user.name=b",
        "-c",
        "user.email=b@x",
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key}",
    ]
    t0 = int(time.time()) - n
    for i in range(n):
        env = {**os.environ, "GIT_COMMITTER_DATE": f"{t0 + i} +0000", "GIT_AUTHOR_DATE": f"{t0 + i} +0000"}
        subprocess.run([*base, "commit", "-q", "-S", "--allow-empty", "-m", f"c{i}"], check=True, env=env)
    shas = subprocess.run(
        ["git", "-C", str(repo), "rev-list", "--reverse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.split()
    return repo, signers, shas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=1000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "pi-pull"))
    from pipull.chain import ChainVerifier
    from pipull.config import Config
    from pipull.mirror import Mirror
    from pipull.runner import Runner

    from mailstate.state.chain import range_problems

    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        repo, signers, shas = build(work, args.commits + 1)
        print(f"built {len(shas)} signed commits in {time.perf_counter() - t:.1f} s")
        root, tip = shas[0], shas[-1]
        n = len(shas) - 1

        cfg = Config(remote_url=str(repo), allowed_signers=str(signers), root=str(work / "node"))
        mirror = Mirror(cfg, Runner(), logging.getLogger("bench"))
        mirror.path = str(repo / ".git")
        t = time.perf_counter()
        checked = ChainVerifier(mirror, cfg, Runner(), str(signers), now=time.time(), clock_skew=300).verify(root, tip)
        node_s = time.perf_counter() - t
        assert checked == n, checked

        t = time.perf_counter()
        problems = range_problems(repo, root, tip, signers)
        server_s = time.perf_counter() - t
        assert problems == [], problems

        sample = shas[1 : 1 + min(n, 200)]
        t = time.perf_counter()
        for sha in sample:
            subprocess.run(
                ["git", "-C", str(repo), "-c", f"gpg.ssh.allowedSignersFile={signers}", "verify-commit", sha],
                check=True,
                capture_output=True,
            )
        per = (time.perf_counter() - t) / len(sample)
        base_s = per * n
        print(f"{n} commits, {os.cpu_count()} cores")
        print(f"  node   ChainVerifier.verify     {node_s:6.2f} s  ({node_s / n * 1000:5.2f} ms/commit)")
        print(f"  server range_problems          {server_s:6.2f} s  ({server_s / n * 1000:5.2f} ms/commit)")
        print(
            f"  baseline git verify-commit x N {base_s:6.2f} s  ({per * 1000:5.2f} ms/commit, measured on {len(sample)})"
        )
        print(f"  node/baseline {node_s / base_s:.2f}x, server/baseline {server_s / base_s:.2f}x")


if __name__ == "__main__":
    main()
