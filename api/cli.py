"""`mailstate`, the command line. Each command parses its arguments, calls one library
function, and maps errors to an exit code and a one-line message on stderr:

    0 ok · 1 check failed / problems found · 2 usage or invalid input · 3 not found,
    conflict or not allowed · 4 store/git failure · 130 interrupted

Every command's --help ends with that table (EXIT_HELP), plus what the command itself means
by a code (EXIT_NOTES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailstate.api import cli_key, cli_node, cli_plan, strict_json
from mailstate.state.errors import (
    CompileError,
    Conflict,
    Forbidden,
    InvalidInput,
    MailstateError,
    NotFound,
    StateInvalid,
    StoreError,
    Unauthenticated,
)

# One table: error class → exit code (most specific first).
EXIT_CODES: list[tuple[type[MailstateError], int]] = [
    (InvalidInput, 2),
    (Unauthenticated, 3),
    (Forbidden, 3),
    (NotFound, 3),
    (Conflict, 3),
    (StateInvalid, 1),
    (CompileError, 4),
    (StoreError, 4),
    (MailstateError, 4),
]

DEFAULT_DATA = "./data"

EXIT_HELP = """\
exit codes:
  0    ok
  1    check failed / problems found (the problems are printed)
  2    usage error or invalid input
  3    not found, conflict, or not allowed (bad token, admin only, ...)
  4    store, git or disk failure (or no data dir there)
  130  interrupted"""

# What a command means by a code, beyond the table.
EXIT_NOTES = {
    "compile": "1: with --check, rendered/ is stale.",
    "check": "1: the checkout has problems (schema, invariants, or a stale rendered/).",
    "plan": "0 whether or not anything changed; 1: a side is not a valid state; 3: a revision is unknown.",
    "token revoke": "3: no active token has that id or name, or several share the name (token_ambiguous: give an id).",
    "serve": "Runs until stopped (SIGINT/SIGTERM: 0). 2: bad --port or --log-format; 4: the data dir is not usable.",
    "mcp": "Runs until stdin closes. 2: no token given; 3: the token is not valid; 4: no data dir there.",
}


def exit_code_for(exc: MailstateError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 4


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


# --- commands ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mailstate.state.datadir import init_data_dir
    from mailstate.state.models import DnsSettings, SendingSettings, Settings, invalid_input_from

    try:
        sending = None
        if args.send_per_hour is not None or args.send_per_day is not None:
            sending = SendingSettings(
                send_per_hour=args.send_per_hour,
                send_per_day=args.send_per_day,
                auto_suspend_factor=args.auto_suspend_factor,
            )
        settings = Settings(
            mail_root=args.mail_root,
            uid=args.uid,
            gid=args.gid,
            default_quota_mb=args.default_quota_mb,
            bcrypt_cost=args.bcrypt_cost,
            dns=DnsSettings(mx_hosts=args.mx_host, dkim_cname_zone=args.dkim_cname_zone) if args.mx_host else None,
            sending=sending,
        )
    except ValidationError as exc:
        raise invalid_input_from(exc) from None
    extra = None
    if args.with_workflow:
        from mailstate.compiler.workflow import state_repo_workflow

        extra = state_repo_workflow(args.with_workflow)
    dd = init_data_dir(Path(args.data), settings, extra_files=extra)
    print(f"initialised {dd.root}")
    print(f"  state repo:       {dd.repo}")
    print(f"  allowed_signers:  {dd.allowed_signers}")
    print(f"  signing key:      {dd.key} (keep it secret)")
    if args.no_token:
        print(f"no admin token made; make one with: mailstate token create --data {dd.root} --admin")
        return 0
    from mailstate.state.localdb import LocalDB

    db = LocalDB(dd.db)
    try:
        info, secret = db.create_token(project_id=None, name="admin")
    finally:
        db.close()
    # Like `serve` on an empty dir and `token create`: the token is the last line, shown once.
    print(f"admin token {info.name} (id {info.id}; shown ONCE, it cannot be recovered; store it now,")
    print(f"or make another with: mailstate token create --data {dd.root} --admin):")
    print(secret)
    return 0


def _log_format(args: argparse.Namespace) -> str:
    from mailstate.api.logs import log_format

    try:
        return log_format(args.log_format)
    except ValueError as exc:
        raise InvalidInput(f"MAILSTATE_LOG_FORMAT: {exc}.", code="invalid_request", field="log_format") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from mailstate.api.server import serve

    serve(
        Path(args.data),
        host=args.host,
        port=args.port,
        upstream=args.upstream,
        bcrypt_cost=args.bcrypt_cost,
        log_format=_log_format(args),
    )
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from mailstate.api.mcp_server import run_stdio

    token = args.token or os.environ.get("MAILSTATE_TOKEN")
    if not token:
        raise InvalidInput("Give --token or set MAILSTATE_TOKEN.", code="missing_token")
    if _log_format(args) == "json":
        from mailstate.api.logs import configure

        configure("json", os.environ.get("MAILSTATE_LOG_LEVEL", "warning"))
    run_stdio(Path(args.data), token)
    return 0


def _db(args: argparse.Namespace) -> Any:
    from mailstate.state.datadir import DataDir
    from mailstate.state.localdb import LocalDB

    dd = DataDir(Path(args.data))
    if not dd.is_initialised():
        raise StoreError(f"{args.data} is not a mailstate data dir; run `mailstate init --data {args.data}`.")
    return LocalDB(dd.db)


def cmd_token_create(args: argparse.Namespace) -> int:
    db = _db(args)
    info, secret = db.create_token(project_id=None if args.admin else args.project, name=args.name)
    role = "admin" if info.project_id is None else f"project {info.project_id}"
    print(f"token {info.name} (id {info.id}, {role}); shown once, store it now:")
    print(secret)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = [t.as_dict() for t in _db(args).list_tokens()]
    if args.json:
        _print_json(tokens)
    else:
        print(f"{'ID':<12}  {'NAME':<24} {'ROLE':<16} {'CREATED':<25} STATUS")
        for t in tokens:
            scope = "admin" if t["project_id"] is None else f"project {t['project_id']}"
            print(
                f"{t['id']:<12}  {t['name']:<24} {scope:<16} {t['created_at']:<25} {'revoked' if t['revoked'] else 'active'}"
            )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    info = _db(args).revoke_token(args.token_id)
    scope = "admin" if info.project_id is None else f"project {info.project_id}"
    print(f"revoked token {info.id} (name {info.name}, {scope})")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from mailstate.state.datadir import DataDir, open_store
    from mailstate.state.localdb import LocalDB
    from mailstate.state.snapshot import Actor

    user = os.environ.get("USER", "root")
    actor = Actor.admin(f"cli:{user}") if args.project is None else Actor.project(args.project, f"cli:{user}")
    data = _json_object(args.json) if args.json else {}
    for n, item in enumerate(args.fields, start=1):
        key, sep, value = item.partition("=")
        if not sep:
            # Not echoed: a password typed without its `password=` would land in the message.
            raise InvalidInput(f"Field argument {n} is not key=value.", code="invalid_request")
        if key in data:
            raise strict_json.duplicate_key_error(key)
        data[key] = _coerce(value)
    dd = DataDir(Path(args.data))
    # The data dir's database too: dns-records lists the nodes' DKIM keys, check-dns keeps its verdict.
    db = LocalDB(dd.db) if dd.is_initialised() else None
    try:
        outcome = open_store(dd.root, db=db).execute(args.operation, actor, data)
    finally:
        if db is not None:
            db.close()
    _print_json(outcome.result)
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from mailstate.state.datadir import upgrade_data_dir

    result = upgrade_data_dir(Path(args.data))
    if result.get("sender_maps"):
        print(
            f"rendered the sender_login_maps fragments (format {result['format']}) in one signed commit {result['commit']}"
        )
    elif result["upgraded"]:
        print(
            f"upgraded the state from format {result['from_format']} to {result['format']} in one signed commit {result['commit']}"
            f" ({result['mailboxes']} mailbox id(s) assigned)"
        )
    else:
        print(f"the state is already at format {result['format']}; nothing to do")
    return 0


def cmd_place(args: argparse.Namespace) -> int:
    from mailstate.state.place import place_data_dir

    result = place_data_dir(Path(args.data), args.node)
    if not result["placed"]:
        print("every email-enabled domain has a home; nothing to do")
        return 0
    for domain, node in sorted(result["placed"].items()):
        print(f"{domain} -> {node}")
    print(f"placed {len(result['placed'])} domain(s) in one signed commit {result['commit']}")
    return 0


def _json_object(text: str) -> dict[str, Any]:
    """`--json TEXT` as an object; anything else is a usage error, never a traceback."""
    try:
        data = strict_json.loads(text)
    except strict_json.DuplicateKey as exc:
        raise strict_json.duplicate_key_error(exc.key) from None
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidInput(f"--json is not valid JSON{where}.", code="invalid_request", field="json") from None
    if not isinstance(data, dict):
        raise InvalidInput(
            '--json must be a JSON object, like \'{"domain": "example.com"}\'.', code="invalid_request", field="json"
        )
    return data


def _coerce(value: str) -> Any:
    # key=value pairs arrive as text; numbers and booleans are what the models expect.
    if value in ("true", "false"):
        return value == "true"
    if value.isdigit():
        return int(value)
    return value


def cmd_compile(args: argparse.Namespace) -> int:
    from mailstate.compiler.render import compile_state, diff_rendered
    from mailstate.compiler.write import write_rendered
    from mailstate.state.load import load_checkout, read_rendered

    root = Path(args.path)
    loaded = load_checkout(root)
    if loaded.problems or loaded.settings is None:
        raise StateInvalid(
            "The state does not validate; fix it first (see `mailstate check`).", problems=loaded.problems
        )
    expected = compile_state(loaded.settings, loaded.domains.values(), loaded.projects, loaded.nodes)
    if args.check:
        problems = diff_rendered(expected, read_rendered(root))
        for line in problems:
            print(line)
        if problems:
            print(
                f"rendered/ is stale: {len(problems)} file(s) differ; run `mailstate compile {args.path}`",
                file=sys.stderr,
            )
            return 1
        print("rendered/ is up to date")
        return 0
    changed = write_rendered(root, expected)
    for path in changed:
        print(f"wrote {path}")
    print(f"{len(changed)} file(s) changed")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mailstate.state.load import check_checkout

    problems = check_checkout(Path(args.path))
    for line in problems:
        print(line)
    if problems:
        print(f"check failed: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("ok: state is valid and rendered/ is up to date")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from mailstate.state.audit import filter_log, read_log

    entries = filter_log(
        read_log(Path(args.path), args.rev),
        domain=args.domain,
        mailbox=args.mailbox,
        project=args.project,
        action=args.action,
    )
    if args.limit:
        entries = entries[: args.limit]
    if args.json:
        _print_json([e.as_dict() for e in entries])
    else:
        for e in entries:
            print(
                f"{e.commit[:12]}  {e.date}  {e.action:<16} {e.target or e.subject:<36} project={e.project} actor={e.actor} request={e.request_id}"
            )
    return 0


# --- parser --------------------------------------------------------------------------------


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=os.environ.get("MAILSTATE_DATA", DEFAULT_DATA),
        help="data directory (default: $MAILSTATE_DATA or ./data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailstate",
        description="GitOps for mailboxes: every change is one signed commit of YAML state plus compiled Postfix/Dovecot files.",
    )
    parser.add_argument("--version", action="version", version=f"mailstate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_init_command,
        _add_server_commands,
        _add_token_commands,
        _add_data_dir_commands,
        _add_checkout_commands,
        cli_node.register,
        cli_plan.register,
        cli_key.register,
    ):
        add(sub)
    _add_exit_help(parser, [])
    return parser


def _add_init_command(sub: Any) -> None:
    """Init: a new data dir."""
    p = sub.add_parser(
        "init", help="create a data dir: bare state repo (first commit signed), signing key, allowed_signers, local db"
    )
    _data_arg(p)
    p.add_argument("--mail-root", default="/var/vmail", help="Maildir root on the nodes (default /var/vmail)")
    p.add_argument("--uid", type=int, default=5000, help="uid owning the mail on the nodes (default 5000)")
    p.add_argument("--gid", type=int, default=5000, help="gid owning the mail on the nodes (default 5000)")
    p.add_argument("--default-quota-mb", type=int, default=1024, help="quota when add-user gives none (default 1024)")
    p.add_argument(
        "--bcrypt-cost", type=int, default=12, help="bcrypt cost for new passwords (default 12; 4 for tests)"
    )
    p.add_argument(
        "--mx-host",
        action="append",
        metavar="HOST",
        help="the platform's mail host for dns-records' MX (repeat in preference order; "
        "writes mailstate.yaml's dns: block, which has more keys: see docs/node-guide.md)",
    )
    p.add_argument(
        "--dkim-cname-zone", metavar="ZONE", help="with --mx-host: DKIM records as CNAMEs to <selector>.ZONE"
    )
    p.add_argument(
        "--send-per-hour",
        type=int,
        metavar="N",
        help="recipients every mailbox may send to in an hour unless set-limits says otherwise "
        "(writes mailstate.yaml's sending: block; docs/controls.md)",
    )
    p.add_argument("--send-per-day", type=int, metavar="N", help="the same over 24 hours")
    p.add_argument(
        "--auto-suspend-factor",
        type=float,
        default=3.0,
        metavar="X",
        help="with --send-per-*: a node suspends a mailbox past X times its limit (default 3)",
    )
    p.add_argument(
        "--no-token",
        action="store_true",
        help="make no admin token (default: make one and print it once, as the last line)",
    )
    p.add_argument(
        "--with-workflow",
        metavar="USES",
        help="also commit .github/workflows/mailstate.yml calling this reusable workflow, e.g. OWNER/mailstate/.github/workflows/state-check.yml@main",
    )
    p.set_defaults(func=cmd_init)


def _add_server_commands(sub: Any) -> None:
    """Serve and mcp: the API over HTTP, and MCP on stdio."""
    p = sub.add_parser(
        "serve", help="serve the HTTP API, MCP at /mcp and the node endpoints (initialises an empty data dir)"
    )
    _data_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8025, help="port to listen on (default 8025)")
    p.add_argument(
        "--upstream",
        default=os.environ.get("MAILSTATE_UPSTREAM"),
        help="git URL of an upstream state repo to push every write to (default: none, local mode)",
    )
    p.add_argument("--bcrypt-cost", type=int, default=None, help="bcrypt cost when initialising an empty data dir")
    _log_format_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mcp", help="run the MCP server on stdio, acting with one token")
    _data_arg(p)
    p.add_argument("--token", help="bearer token to act as (default: $MAILSTATE_TOKEN)")
    _log_format_arg(p)
    p.set_defaults(func=cmd_mcp)


def _add_token_commands(sub: Any) -> None:
    """Token create / list / revoke."""
    p = sub.add_parser("token", help="create, list and revoke API tokens")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create a token; prints it once, as the last line")
    _data_arg(tc)
    who = tc.add_mutually_exclusive_group(required=True)
    who.add_argument("--project", type=int, help="project id the token acts for")
    who.add_argument("--admin", action="store_true", help="an admin token (needed for [Admin] endpoints)")
    tc.add_argument("--name", help="name shown in commits' Actor trailer (default: generated)")
    tc.set_defaults(func=cmd_token_create)
    tl = tsub.add_parser("list", help="list tokens (never their secrets)")
    _data_arg(tl)
    tl.add_argument("--json", action="store_true", help="print JSON")
    tl.set_defaults(func=cmd_token_list)
    tr = tsub.add_parser("revoke", help="revoke ONE token: by id, or by a name only one active token has")
    _data_arg(tr)
    tr.add_argument(
        "token_id", metavar="ID_OR_NAME", help="token id (see `token list`), or a name exactly one active token has"
    )
    tr.set_defaults(func=cmd_token_revoke)


def _add_data_dir_commands(sub: Any) -> None:
    """Call, upgrade and place: act on a data dir directly."""
    p = sub.add_parser("call", help="run one operation directly on a data dir (as admin, or --project ID)")
    _data_arg(p)
    p.add_argument("operation", help="operation name, e.g. add-node")
    p.add_argument("fields", nargs="*", help="request fields as key=value")
    p.add_argument("--json", help="request body as JSON")
    p.add_argument("--project", type=int, help="act as this project instead of admin")
    p.set_defaults(func=cmd_call)

    p = sub.add_parser(
        "upgrade",
        help="upgrade a data dir's state to the current format in one signed commit (the server also does it on start)",
    )
    _data_arg(p)
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser(
        "place",
        help="give every email-enabled domain without a home a home node (a fleet with addressed nodes), "
        "in one signed commit",
    )
    _data_arg(p)
    p.add_argument("--node", help="put them all on this node (default: each on the node with the fewest mailboxes)")
    p.set_defaults(func=cmd_place)


def _add_checkout_commands(sub: Any) -> None:
    """Compile, check and log: read a state repo or checkout."""
    p = sub.add_parser("compile", help="render rendered/ from the state in a checkout (--check: fail if stale)")
    p.add_argument("path", nargs="?", default=".", help="state checkout (default .)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if rendered/ is stale")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="validate a state checkout: schema, invariants, rendered/ up to date")
    p.add_argument("path", nargs="?", default=".", help="state checkout (default .)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("log", help="the audit log, from commit trailers")
    p.add_argument("path", nargs="?", default=".", help="state repo, bare or checkout (default .)")
    p.add_argument("--rev", default="main", help="revision to read from (default main)")
    p.add_argument("--domain", help="only changes to this domain or its mailboxes")
    p.add_argument("--mailbox", help="only changes to this mailbox (full address)")
    p.add_argument("--project", help="only changes for this project id")
    p.add_argument("--action", help="only this action, e.g. add-user")
    p.add_argument("--limit", type=int, help="at most this many entries")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_log)


def _log_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text, or one JSON object per line (default: $MAILSTATE_LOG_FORMAT or text)",
    )


def _add_exit_help(parser: argparse.ArgumentParser, path: list[str]) -> None:
    """End every command's --help (the extras' too) with the exit codes."""
    note = EXIT_NOTES.get(" ".join(path))
    parts = [p for p in (parser.epilog, EXIT_HELP, note) if p]
    parser.epilog = "\n\n".join(parts)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _add_exit_help(sub, [*path, name])


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailstate")
    except Exception:  # a checkout that was never installed
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except StateInvalid as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print(f"error: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    except MailstateError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
