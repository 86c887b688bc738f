"""A worker process of a cold start's parse (state.load._parse_in_workers).

    python -m mailstate.state.parseworker REPO  < lines "index path oid"

Parses and validates each domain file and writes, per file, a tab-separated line `index oid
domain project_id alias_of fits home moving_to moved_from replica mailboxes length` (an empty field for None; validated names and ids
hold no tab or newline) followed by `length` bytes of the entry's JSON (state.load's cache
entry form). Not JSON lines: decoding 200k of them would cost the waiting parent seconds. At the
first file that fails it writes `{"index": i,
"problems": [...]}` and stops. A separate interpreter rather than multiprocessing: the
server may run threads (no fork), and spawn re-runs the caller's `__main__`.
"""

from __future__ import annotations

import json
import sys

from mailstate.state import aliases, files
from mailstate.state.errors import StateInvalid
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import entry_json


def main(argv: list[str]) -> int:
    repo = GitRepo(argv[0])
    out = sys.stdout.buffer
    for line in sys.stdin:
        index, path, oid = line.split()
        try:
            dom = files.parse_domain(repo.blob(oid), path)
        except StateInvalid as exc:
            out.write(json.dumps({"index": int(index), "problems": exc.problems or [exc.message]}).encode() + b"\n")
            break
        data = entry_json(dom)
        project = "" if dom.project_id is None else str(dom.project_id)
        links = " ".join(sorted(aliases.links(dom)))
        meta = [index, oid, dom.domain, project, dom.alias_of or "", str(files.format_fits(dom)), links]
        meta += [dom.home or "", dom.moving_to or "", dom.moved_from or "", dom.replica or ""]
        meta += [str(len(dom.mailboxes)), str(len(data))]
        out.write("\t".join(meta).encode() + b"\n")
        out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
