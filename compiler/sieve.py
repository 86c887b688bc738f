"""Mailbox owners' settings (state/owners.py) → the nodes' files: one Sieve script per mailbox,
and the app passwords' passwd-file lines. Pure and deterministic, like the rest of the compiler.

Two per-domain fragments, written only for a domain that has any (so every other domain keeps
its bytes):

    rendered/domains/<bb>/<domain>/sieve_scripts    the scripts of the domain's active mailboxes
                                                    with filters or an enabled vacation, sorted
                                                    by local part, each as `sieve <local>
                                                    <length>\\n` and then exactly <length> bytes
                                                    of script (templates/rendered/sieve_script.j2)
    rendered/domains/<bb>/<domain>/app_passwords    `<local>@<domain>/<service>/<slot>/<tag>:<bcrypt>`
                                                    per app password and scope, sorted

A script holds only what the template writes: a comment naming the mailbox, one fixed
`require`, an `if` per filter and the vacation block. Every value is a Sieve quoted string
(`"` and `\\` escaped; a control character is refused here as the last guard, after
state/owners.py refused it at write time), the reply's text a dot-stuffed `text:` block.
pi-pull (pipull/sieve.py, pipull/apppass.py) accepts exactly this and nothing else; the
vectors in tests/vectors/ hold it to the server's verdicts.
"""

from __future__ import annotations

from typing import Any

from mailstate.state import owners as ow
from mailstate.state.errors import CompileError
from mailstate.state.models import DomainFile, Mailbox

SIEVE_FRAGMENT = "sieve_scripts"
APP_FRAGMENT = "app_passwords"
SIEVE_HEADER = "sieve"


def sieve_string(value: object) -> str:
    """A Sieve quoted string (RFC 5228 2.4.2): `"`, with `\\` and `"` escaped. A value that
    holds a control character, a line separator or a lone surrogate never gets this far
    (state/owners.py); if one did, it is refused rather than written."""
    text = str(value)
    if ow.forbidden_char(text) is not None:
        raise CompileError("A value would break a Sieve script; refusing to render it.")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sieve_text(value: object) -> str:
    """The lines of a Sieve `text:` block (RFC 5228 2.4.2, multi-line): every line that starts
    with `.` gets another one, so no line of the text can end the block; ends with a newline."""
    text = str(value)
    if ow.forbidden_char(text, multiline=True) is not None:
        raise CompileError("A text would break a Sieve script; refusing to render it.")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(("." + line if line.startswith(".") else line) + "\n" for line in lines)


def _filter_context(rule: Any) -> dict[str, Any]:
    # from/to with `is` compare the address (`address :all :is`); everything else a header's text.
    address_test = rule.op == "is" and rule.field in ("from", "to")
    header = rule.field[len(ow.HEADER_PREFIX) :] if rule.field.startswith(ow.HEADER_PREFIX) else rule.field
    target = ow.sieve_folder(rule.target) if rule.action == "fileinto" else rule.target
    return {
        "address_test": address_test,
        "op": rule.op,
        "header": header,
        "value": rule.value,
        "action": rule.action,
        "target": target,
        "stop": rule.stop,
    }


def script_context(address: str, box: Mailbox) -> dict[str, Any] | None:
    """What templates/rendered/sieve_script.j2 needs for an active mailbox's script, or None when
    the mailbox gets none (no filters, no enabled vacation, or soft-deleted)."""
    vacation = box.vacation if box.vacation is not None and box.vacation.enabled else None
    if not box.active or (not box.filters and vacation is None):
        return None
    return {
        "address": address,
        "filters": [_filter_context(f) for f in box.filters or ()],
        "vacation": None
        if vacation is None
        else {
            "days": vacation.interval_days,
            "subject": vacation.subject,
            "body": vacation.body or "",
            "start": vacation.start.isoformat() if vacation.start else None,
            "end": vacation.end.isoformat() if vacation.end else None,
        },
    }


def container_header(local: str, script: bytes) -> bytes:
    """The line before a script in the `sieve_scripts` fragment."""
    return f"{SIEVE_HEADER} {local} {len(script)}\n".encode("ascii")


def app_password_lines(domain: DomainFile) -> list[dict[str, str]]:
    """`{key, hash}` per app password and scope of the domain's active mailboxes, sorted by key:
    `<local>@<domain>/<service>/<slot>/<tag>` is what the nodes' passdb for that slot looks up."""
    lines = []
    for local, box in domain.mailboxes.items():
        if not box.active or not box.app_passwords:
            continue
        for entry in box.app_passwords.values():
            for scope in entry.scopes:
                service = ow.SCOPE_SERVICES[scope]
                key = f"{local}@{domain.domain}/{service}/{entry.slot:02d}/{entry.tag}"
                lines.append({"key": key, "hash": entry.hash})
    return sorted(lines, key=lambda line: line["key"])
