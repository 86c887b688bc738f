"""What mailbox usage figures cost the server: a node's report carrying every
mailbox's usage, and list-users / list-domains reading the figures back.

    python3 bench/bench_usage.py [--sizes 10000,100000] [--repeat 5]

For each size the state holds that many mailboxes (5 per domain, 50 projects; in memory, no
git: the store is not what this measures) and `mailstate.db` is a real SQLite file. Baselines,
measured in the same run: a report WITHOUT usage (status only), and list-users with no usage
source (the figures all null). Ratios are against those.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import isolate_env, ms, p50

isolate_env()

from mailstate.state import ops  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.models import DomainFile, Mailbox, Node, NodesFile, Settings  # noqa: E402
from mailstate.state.nodes import parse_report, record_report  # noqa: E402
from mailstate.state.snapshot import Actor, Snapshot  # noqa: E402

HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def state(mailboxes: int, per_domain: int = 5, projects: int = 50) -> Snapshot:
    domains: dict[str, DomainFile] = {}
    for d in range(-(-mailboxes // per_domain)):
        name = f"d{d:06d}.example"
        boxes = {
            f"user{i}": Mailbox.model_construct(
                id=f"20261201-{d * per_domain + i:06x}", password=HASH, quota_mb=1024, active=True
            )
            for i in range(min(per_domain, mailboxes - d * per_domain))
        }
        domains[name] = DomainFile.model_construct(
            domain=name, project_id=1 + d % projects, email_enabled=True, mailboxes=boxes
        )
    nodes = NodesFile(nodes={"n1": Node(sync_key_sha256="0" * 64, created_at=NOW)})
    return Snapshot.build("0" * 40, Settings(), domains, nodes)


def usage_body(snap: Snapshot) -> str:
    entries = [
        {"email": f"{local}@{dom.domain}", "id": box.id, "used_bytes": 1000 + i, "messages": i % 50}
        for i, (dom, local, box) in enumerate(
            (dom, local, box) for dom in snap.domains.values() for local, box in dom.mailboxes.items()
        )
    ]
    return json.dumps({"applied_commit": None, "status": "ok", "error": None, "usage": entries})


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def run(size: int, repeat: int) -> None:
    snap = state(size)
    body = usage_body(snap)
    with tempfile.TemporaryDirectory() as tmp:
        db = LocalDB(Path(tmp) / "mailstate.db")
        try:
            clock = iter(NOW + timedelta(minutes=15 * i) for i in range(10_000))
            status_only = timed(lambda: record_report(db, snap, "n1", {"status": "ok"}, None, next(clock)), repeat)
            parse = timed(lambda: parse_report(json.loads(body)), repeat)
            first = timed(lambda: record_report(db, snap, "n1", json.loads(body), None, next(clock)), 1)
            again = timed(lambda: record_report(db, snap, "n1", json.loads(body), None, next(clock)), repeat)
            project = Actor.project(1)

            def listing(usage: bool, request: object, op: object = ops.list_users) -> None:
                ctx = ops.Context(
                    state=snap,
                    actor=project,
                    now=NOW,
                    node_status=lambda _n: None,
                    usage=db.usage_for if usage else None,
                )
                op(ctx, request, {})  # type: ignore[operator]

            one = ops.m.ListUsersRequest(domain="d000000.example")
            every = ops.m.ListUsersRequest()
            lu_one_base = timed(lambda: listing(False, one), repeat * 20)
            lu_one = timed(lambda: listing(True, one), repeat * 20)
            lu_all_base = timed(lambda: listing(False, every), repeat)
            lu_all = timed(lambda: listing(True, every), repeat)
            ld_base = timed(lambda: listing(False, ops.m.ListDomainsRequest(), ops.list_domains), repeat)
            ld = timed(lambda: listing(True, ops.m.ListDomainsRequest(), ops.list_domains), repeat)
        finally:
            db.close()
    project_boxes = sum(len(snap.domains[n].mailboxes) for n in snap.by_project[1])
    print(
        f"\n{size} mailboxes ({len(body) / 1e6:.1f} MB report body; project 1 has {project_boxes} mailboxes in {len(snap.by_project[1])} domains)"
    )
    print(f"  report, status only (baseline)        p50 {ms(p50(status_only))} ms")
    print(f"  report with usage: parse + validate   p50 {ms(p50(parse))} ms")
    print(
        f"  report with usage: first (inserts)    {ms(first[0])} ms   x{first[0] / p50(status_only):.0f} the baseline"
    )
    print(
        f"  report with usage: again (updates)    p50 {ms(p50(again))} ms   x{p50(again) / p50(status_only):.0f} the baseline"
    )
    ratio = p50(lu_one) / p50(lu_one_base)
    print(
        f"  list-users one domain                 p50 {ms(p50(lu_one), 3)} ms   (no usage: {ms(p50(lu_one_base), 3)} ms, x{ratio:.1f})"
    )
    print(
        f"  list-users whole project              p50 {ms(p50(lu_all))} ms   (no usage: {ms(p50(lu_all_base))} ms, x{p50(lu_all) / p50(lu_all_base):.1f})"
    )
    print(
        f"  list-domains whole project            p50 {ms(p50(ld))} ms   (no usage: {ms(p50(ld_base))} ms, x{p50(ld) / p50(ld_base):.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        run(size, args.repeat)


if __name__ == "__main__":
    main()
