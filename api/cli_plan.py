"""`mailstate plan`: what a change does to the state and the compiled files.

`api.cli.build_parser` adds it with `register`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Show what a change does: the domains, mailboxes and nodes added, removed or changed
(email enabled/disabled, project link, mailbox deactivated/reactivated, quota, password
changed -- named, never shown), settings changed, and the rendered/ files it adds, removes or
changes.

Sides:
  mailstate plan [PATH]                        HEAD -> the working tree at PATH
  mailstate plan [PATH] --base REV             REV  -> the working tree at PATH
  mailstate plan [PATH] --base A --head B      revision A -> revision B (PATH may be a bare repo)
  mailstate plan [PATH] --head REV             HEAD -> REV

REV is anything git understands: HEAD~1, origin/main, a branch, a tag or a sha.
The state must sit at the top of the repository. Exit status 0 whether or not anything
changed ("no changes"); 1 if a side is not a valid state; 3 if a revision is unknown.
"""


def cmd_plan(args: argparse.Namespace) -> int:
    from mailstate.state.plan import plan_revisions, plan_worktree

    root = Path(args.path)
    if args.head is not None:
        result = plan_revisions(root, args.base or "HEAD", args.head)
    else:
        result = plan_worktree(root, args.base or "HEAD")
    limit = None if args.full else 200
    if args.json:
        _print_json(result.as_dict())
    elif args.markdown:
        sys.stdout.write(result.render_markdown(limit=limit))
    else:
        sys.stdout.write(result.render_text(limit=limit))
    return 0


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="show what a change does to the state and the compiled files (working tree vs HEAD, or two revisions)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path", nargs="?", default=".", help="state repository: a working tree, or a bare repo with --head (default .)"
    )
    p.add_argument("--base", metavar="REV", help="the revision to compare from (default HEAD)")
    p.add_argument("--head", metavar="REV", help="the revision to compare to (default: the working tree at PATH)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print Markdown, e.g. for $GITHUB_STEP_SUMMARY")
    fmt.add_argument("--json", action="store_true", help="print JSON (every entry, no truncation)")
    p.add_argument(
        "--full", action="store_true", help="list every entry (text and Markdown stop at 200 per section by default)"
    )
    p.set_defaults(func=cmd_plan)
