"""Aliases at scale: store writes that touch aliases, and a node's apply of one alias change.

    python -m bench.bench_aliases                                   # 100k mailboxes + 50k aliases
    python -m bench.bench_aliases --mailboxes 10000 --aliases 5000  # quicker

1. Seed: `bench.seed.seed_state` (N mailboxes, 5 per domain, one signed commit), then ONE more
   signed commit that gives the domains `--aliases` aliases (spread evenly; every 10th domain
   also gets a catch-all, so its fragment holds the self-mappings of each of its mailboxes), the
   way the store builds a commit (dump_domain + render_domain + build_tree).
2. Store writes, alternating write by write between the alias writes and a same-run baseline:
   update-alias (two destination lists in turn), add-alias + remove-alias, set-forwarding on and
   off, against remove-user / restore-user (soft), the non-bcrypt mailbox write of bench_store.
   Each is one `Store.execute`: the loop check, YAML dump, render of the domain (its alias
   fragment too), tree, signature, commit. Target: p50 <= 15 ms at 100k mailboxes.
3. Node: the built `pi_pull.py --once` (the zipapp a bundle ships) follows the data dir's bare
   repo (accepted-head statement, signature, validation of every line, postmap of the three maps;
   reloads are `true`: no Postfix needed). After a first full apply, each measured tick applies ONE
   change, alternating an alias change (update-alias) with a one-mailbox change (remove-user soft /
   restore-user) as the baseline; the figure is the whole process's wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.seed import SeedInfo, seed_state
from mailstate.compiler.render import render_domain
from mailstate.state import files
from mailstate.state.datadir import open_store
from mailstate.state.gitrepo import GitRepo
from mailstate.state.signing import Ed25519Signer
from mailstate.state.snapshot import Actor
from mailstate.state.statement import write_statement
from mailstate.state.store import Store, clean_request_id, commit_message, utcnow


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]


def seed_aliases(info: SeedInfo, count: int) -> tuple[str, float]:
    """One signed commit adding `count` aliases over the seeded domains; returns (head, seconds)."""
    t = time.perf_counter()
    store = open_store(info.root)
    snap = store.snapshot
    repo = GitRepo(info.data_dir.repo)
    changes: dict[str, bytes | None] = {}
    names = info.domains
    per = max(1, -(-count // len(names)))
    left = count
    for i, name in enumerate(names):
        if left <= 0:
            break
        dom = snap.domains[name]
        first = sorted(dom.mailboxes)[0]
        aliases = {f"alias{j}": [f"{first}@{name}", f"ext{j}@partner.example"] for j in range(min(per, left))}
        left -= len(aliases)
        if i % 10 == 0:
            aliases["@"] = [f"{first}@{name}"]
        new = dom.model_copy(update={"aliases": aliases})
        changes[files.domain_path(name)] = files.dump_domain(new)
        changes.update(render_domain(new, snap.settings))
    tree = repo.build_tree(snap.commit, changes)
    message = commit_message("seed", f"{count} aliases", None, Actor.admin("bench:seed"), clean_request_id(None))
    sha = repo.commit(tree, snap.commit, message, Ed25519Signer(info.data_dir.key), utcnow())
    repo.move_branch(sha, snap.commit)
    # Stated accepted, as the store states its own writes: the store then starts from it instead
    # of validating the seed like a commit made elsewhere (which at 100k costs ~14 s).
    write_statement(info.data_dir.repo, Ed25519Signer(info.data_dir.key), sha)
    return sha, time.perf_counter() - t


def measure_writes(store: Store, info: SeedInfo, n: int, start: int = 0) -> dict[str, list[float]]:
    """Alias writes and the mailbox baseline, interleaved write by write (`start` offsets the
    names and values, so that warm-up writes never make a measured write a no-op)."""
    out: dict[str, list[float]] = {
        "update-alias": [],
        "add+remove-alias": [],
        "set-forwarding": [],
        "baseline remove/restore-user": [],
    }
    names = info.domains
    for i in range(start, start + n):
        name = names[(i * 7919) % len(names)]
        actor = Actor.project(info.project_of[name], "bench")
        dom = store.snapshot.domains[name]
        first = sorted(dom.mailboxes)[0]
        kind = list(out)[i % 4]
        t = time.perf_counter()
        if kind == "update-alias":
            dests = [f"{first}@{name}"] if i % 8 else [f"{first}@{name}", f"other{i}@partner.example"]
            if "alias0" in dom.aliases:
                store.execute(
                    "update-alias", actor, {"address": f"alias0@{name}", "destinations": [*dests, f"u{i}@x.example"]}
                )
            else:
                store.execute("add-alias", actor, {"address": f"alias0@{name}", "destinations": dests})
        elif kind == "add+remove-alias":
            address = f"bench{i}@{name}"
            store.execute("add-alias", actor, {"address": address, "destinations": [f"{first}@{name}"]})
            out[kind].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.execute("remove-alias", actor, {"address": address})
        elif kind == "set-forwarding":
            store.execute(
                "set-forwarding",
                actor,
                {"email": f"{first}@{name}", "destinations": [f"fwd{i}@partner.example"], "keep_copy": i % 2 == 0},
            )
        else:
            email = f"{first}@{name}"
            store.execute("remove-user", actor, {"email": email})
            out[kind].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.execute("restore-user", actor, {"email": email})
        out[kind].append(time.perf_counter() - t)
    return out


def node_config(tmp: Path, info: SeedInfo, mail_root: str) -> Path:
    etc = tmp / "node-etc"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = bench.test\n")
    cfg = tmp / "pi-pull.ini"
    cfg.write_text(
        f"[remote]\nurl = {info.data_dir.repo}\n[node]\nname = bench\nallowed_signers = {info.data_dir.allowed_signers}\n"
        f"[paths]\nroot = {tmp / 'node'}\nsync = no\nmail_root = {mail_root}\nmail_uid = 5000\nmail_gid = 5000\nkeep_releases = 3\n"
        f"[services]\npostfix_reload = true\ndovecot_reload = true\nmap_type = hash\npostmap = postmap -c {etc}\n"
        "[lifecycle]\npurge = no\nusage_interval = 0\n"
    )
    return cfg


def tick(script: Path, cfg: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(script), "--config", str(cfg), "--once"], capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"pi-pull tick failed (rc {r.returncode}): {r.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=100_000)
    ap.add_argument("--aliases", type=int, default=50_000)
    ap.add_argument("--writes", type=int, default=120, help="measured store writes (after 8 warm-up writes)")
    ap.add_argument("--changes", type=int, default=6, help="measured node ticks (half alias, half baseline)")
    args = ap.parse_args(argv)
    from mailstate.compiler.node_bundle import build_pi_pull
    from tests.helpers.mailnode import AGENT_DIR

    with tempfile.TemporaryDirectory(prefix="bench-aliases-") as tmpdir:
        tmp = Path(tmpdir)
        mail_root = str(tmp / "vmail")
        t = time.perf_counter()
        info = seed_state(tmp / "data", args.mailboxes, mail_root=mail_root)
        head, alias_s = seed_aliases(info, args.aliases)
        seeded = f"{args.mailboxes} mailboxes in {len(info.domains)} domains ({info.seconds:.1f} s) + {args.aliases} aliases ({alias_s:.1f} s)"
        print(f"seed: {seeded}", file=sys.stderr)
        shutil.rmtree(info.root / "cache", ignore_errors=True)
        t = time.perf_counter()
        open_store(info.root)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        store = open_store(info.root)
        print(
            f"store start (open_store, in process): cold {cold:.2f} s (no parse cache), warm {time.perf_counter() - t:.2f} s"
        )
        measure_writes(store, info, 8, start=1_000_000)
        samples = measure_writes(store, info, args.writes)
        print(
            f"\nstore writes at {args.mailboxes} mailboxes + {args.aliases} aliases ({len(info.domains)} domains), interleaved, ms:"
        )
        print(f"{'write':32} {'n':>4} {'p50':>7} {'p90':>7}")
        for kind, xs in samples.items():
            print(f"{kind:32} {len(xs):4d} {p50(xs) * 1e3:7.2f} {p90(xs) * 1e3:7.2f}")
        alias_all = [x for k, xs in samples.items() if not k.startswith("baseline") for x in xs]
        base = samples["baseline remove/restore-user"]
        print(
            f"{'all alias writes':32} {len(alias_all):4d} {p50(alias_all) * 1e3:7.2f} {p90(alias_all) * 1e3:7.2f}"
            f"   ratio to baseline p50: {p50(alias_all) / p50(base):.2f}   target p50 <= 15 ms"
        )

        script = tmp / "pi_pull.py"
        script.write_bytes(build_pi_pull(AGENT_DIR))
        cfg = node_config(tmp, info, mail_root)
        first = tick(script, cfg)
        noop = tick(script, cfg)
        alias_ticks: list[float] = []
        base_ticks: list[float] = []
        name = info.domains[len(info.domains) // 2]
        actor = Actor.project(info.project_of[name], "bench")
        first_box = sorted(store.snapshot.domains[name].mailboxes)[0]
        for i in range(args.changes):
            if i % 2 == 0:
                store.execute(
                    "update-alias", actor, {"address": f"alias0@{name}", "destinations": [f"n{i}@partner.example"]}
                )
                alias_ticks.append(tick(script, cfg))
            else:
                op = "remove-user" if i % 4 == 1 else "restore-user"
                store.execute(op, actor, {"email": f"{first_box}@{name}"})
                base_ticks.append(tick(script, cfg))
        alias_map = tmp / "node" / "current" / "postfix" / "virtual_alias_maps"
        lines = sum(1 for _ in alias_map.open("rb"))
        print(
            f"\nnode (pi_pull.py --once, whole process), {args.mailboxes} mailboxes + {args.aliases} aliases, "
            f"virtual_alias_maps {lines} lines, {alias_map.stat().st_size / 1e6:.1f} MB:"
        )
        print(f"first full apply {first:.2f} s; no-op tick {noop * 1e3:.0f} ms")
        print(
            f"apply of one alias change (update-alias)  p50 {p50(alias_ticks):.2f} s  (n={len(alias_ticks)}, {', '.join(f'{x:.2f}' for x in alias_ticks)})"
        )
        print(
            f"apply of one mailbox change (baseline)    p50 {p50(base_ticks):.2f} s  (n={len(base_ticks)}, {', '.join(f'{x:.2f}' for x in base_ticks)})"
        )
        print(f"ratio alias / baseline: {p50(alias_ticks) / p50(base_ticks):.2f}")
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        _ = head
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
