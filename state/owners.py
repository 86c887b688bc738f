"""What mailbox owners ask for: vacation replies, filters and app passwords. The rules.

They are three optional keys of a mailbox in its domain file (a mailbox without them is
unchanged, byte for byte):

* `vacation: {enabled, subject, body, start, end, interval_days}`: an autoreply;
* `filters: [{name, field, op, value, action, target, stop}, ...]`: at most MAX_FILTERS rules,
  in order;
* `app_passwords: {<name>: {hash, scopes, slot, tag, created_at}}`: at most MAX_APP_PASSWORDS
  extra passwords, each for some of the protocols in SCOPES.

The compiler turns the first two into ONE Sieve script per mailbox (compiler/sieve.py) and the
third into passwd-file lines (compiler/render.py); docs/owners.md says how the nodes use them.
Every check here runs at write time (the request models), on state files (`mailstate check`,
incoming commits) and, mirrored by the node (pi-pull/pipull/sieve.py, apppass.py), on what a
node accepts: tests/vectors/sieve_values.json holds the three to the same verdicts.

A value never reaches a script unchecked: every string field is refused when it holds a
control character, a line separator or a lone surrogate (only a body may hold newlines and
tabs), and the compiler escapes `"` and `\\`, so no value can end a Sieve string early.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any

from mailstate.state import aliases as al
from mailstate.state import validate as v
from mailstate.state.errors import InvalidInput

MAX_FILTERS = 50
MAX_APP_PASSWORDS = 20
MAX_SUBJECT_CHARS = 200
MAX_BODY_BYTES = 16 * 1024
MAX_FOLDER_CHARS = 200
MAX_VALUE_CHARS = 500
MAX_FILTER_NAME_CHARS = 100
MAX_APP_PASSWORD_NAME_CHARS = 64
MIN_INTERVAL_DAYS = 1
MAX_INTERVAL_DAYS = 365
DEFAULT_INTERVAL_DAYS = 7
SCOPES = ("imap", "smtp")
# The Dovecot service each scope stands for (`%s` in the nodes' passdb): Postfix's SASL asks
# Dovecot with service "smtp", IMAP logins come as "imap".
SCOPE_SERVICES = {"imap": "imap", "smtp": "smtp"}
FIELDS = ("from", "to", "subject")
HEADER_PREFIX = "header:"
OPS = ("contains", "is")
ACTIONS = ("fileinto", "discard", "redirect", "mark_read")
# A header name as the compiler writes it into a Sieve `header` test (RFC 5322 allows more; a
# conservative token is enough for every real header and keeps the node's check simple).
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
# An app password's name: what the owner calls the device ("iPhone Anna", "Thunderbird 2").
APP_PASSWORD_NAME = re.compile(r"^[\w][\w .@()+'-]{0,63}$")
# The generated password: 24 characters of an alphabet without look-alikes (0/o, 1/l/i),
# shown as six groups of four: 120 random bits.
PASSWORD_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PASSWORD_GROUPS = 6
TAG_HEX = 4  # the lookup tag: the first 16 bits of SHA-256(password), see password_tag
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _bad(message: str, code: str, field: str) -> InvalidInput:
    return InvalidInput(message, code=code, field=field)


def forbidden_char(text: str, *, multiline: bool = False) -> str | None:
    """The first character `text` may not hold in a compiled script (a control character, a line
    or paragraph separator, a lone surrogate), or None. A multi-line text may hold \\n and \\t."""
    for ch in text:
        if multiline and ch in "\n\t":
            continue
        if ch in "\u2028\u2029" or unicodedata.category(ch) in ("Cc", "Cs"):
            return ch
    return None


def check_text(value: object, field: str, max_chars: int, code: str, *, what: str) -> str:
    """A one-line text of 1-`max_chars` characters without control characters."""
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string.", code, field)
    if not value:
        raise _bad(f"{what} must not be empty.", code, field)
    if len(value) > max_chars:
        raise _bad(f"{what} may be at most {max_chars} characters; got {len(value)}.", code, field)
    if forbidden_char(value) is not None:
        raise _bad(f"{what} must be one line without control characters.", code, field)
    return value


def check_subject(value: object) -> str:
    return check_text(value, "subject", MAX_SUBJECT_CHARS, "invalid_vacation", what="The vacation subject")


def check_body(value: object) -> str:
    """The reply's text: newlines as \\n (CRLF and CR become \\n), at most MAX_BODY_BYTES in UTF-8."""
    if not isinstance(value, str) or not value.strip():
        raise _bad("The vacation body must be a non-empty string.", "invalid_vacation", "body")
    text = value.replace("\r\n", "\n").replace("\r", "\n")
    if forbidden_char(text, multiline=True) is not None:
        raise _bad(
            "The vacation body may hold newlines and tabs, but no other control characters.", "invalid_vacation", "body"
        )
    size = len(text.encode("utf-8"))
    if size > MAX_BODY_BYTES:
        raise _bad(
            f"The vacation body may be at most {MAX_BODY_BYTES} bytes (16 KiB) in UTF-8; got {size}.",
            "invalid_vacation",
            "body",
        )
    return text


def check_date(value: object, field: str) -> date:
    """An ISO date, `YYYY-MM-DD` (a date object is taken as it is: the state files hold them)."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
        raise _bad(f"{field} must be an ISO date such as 2026-07-01.", "invalid_vacation", field)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _bad(f"{field} is not a real date: {value}.", "invalid_vacation", field) from None


def check_interval(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_INTERVAL_DAYS <= value <= MAX_INTERVAL_DAYS:
        raise _bad(
            f"interval_days must be a whole number of days, {MIN_INTERVAL_DAYS}-{MAX_INTERVAL_DAYS}.",
            "invalid_vacation",
            "interval_days",
        )
    return value


def check_dates(start: date | None, end: date | None) -> None:
    if start is not None and end is not None and end < start:
        raise _bad(f"end ({end}) is before start ({start}).", "invalid_vacation", "end")


# --- filters -------------------------------------------------------------------------------


def check_folder(value: object, field: str = "target") -> str:
    """A folder for fileinto: components separated by `/` (the hierarchy, as mail clients show
    it), each non-empty and not starting or ending with `.`; no `..`, no leading `/`, no IMAP
    wildcard (`*`, `%`), no control character, at most MAX_FOLDER_CHARS characters."""
    text = check_text(value, field, MAX_FOLDER_CHARS, "invalid_folder", what="The folder name")
    if text.startswith("/"):
        raise _bad("The folder name must not start with '/'.", "invalid_folder", field)
    if ".." in text:
        raise _bad("The folder name must not contain '..'.", "invalid_folder", field)
    if any(c in text for c in "*%"):
        raise _bad("The folder name must not contain '*' or '%' (IMAP wildcards).", "invalid_folder", field)
    for part in text.split("/"):
        if not part or part.startswith(".") or part.endswith(".") or part != part.strip():
            raise _bad(
                "Each part of a folder name (between '/') must be non-empty, must not start or end with '.' or a space.",
                "invalid_folder",
                field,
            )
    return text


def sieve_folder(folder: str) -> str:
    """The folder as Sieve's fileinto names it on the nodes: their Maildir++ hierarchy separator is `.`."""
    return folder.replace("/", ".")


def check_field(value: object, field: str) -> str:
    """`from`, `to`, `subject` or `header:<Name>` (Name: letters, digits and `-`)."""
    if isinstance(value, str) and value.lower() in FIELDS:
        return value.lower()
    if isinstance(value, str) and value[: len(HEADER_PREFIX)].lower() == HEADER_PREFIX:
        name = value[len(HEADER_PREFIX) :]
        if HEADER_NAME.fullmatch(name):
            return HEADER_PREFIX + name
    raise _bad(
        "field must be from, to, subject or header:<Name> (a header name of letters, digits and '-', at most 64).",
        "invalid_filter",
        field,
    )


def _choice(value: object, choices: tuple[str, ...], field: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(f"{field.rpartition('.')[2]} must be one of {', '.join(choices)}.", "invalid_filter", field)
    return value


_FILTER_KEYS = ("name", "field", "op", "value", "action", "target", "stop")


def normalize_filter(raw: object, index: int) -> dict[str, Any]:
    """One filter rule, checked and in canonical form; errors name the rule (`filters[3].value`)."""
    at = f"filters[{index}]"
    if not isinstance(raw, Mapping):
        raise _bad(f"{at} must be an object.", "invalid_filter", "filters")
    unknown = sorted(str(k) for k in raw if k not in _FILTER_KEYS)
    if unknown:
        raise _bad(f"{at}: unknown field '{unknown[0]}'.", "invalid_filter", "filters")
    for key in ("name", "field", "op", "value", "action"):
        if key not in raw:
            raise _bad(f"{at}.{key} is required.", "invalid_filter", "filters")
    action = _choice(raw["action"], ACTIONS, f"{at}.action")
    target = raw.get("target")
    if action == "fileinto":
        target = check_folder(target, f"{at}.target") if target is not None else None
        if target is None:
            raise _bad(f"{at}: fileinto needs a target folder.", "invalid_filter", "filters")
    elif action == "redirect":
        if target is None:
            raise _bad(f"{at}: redirect needs a target address.", "invalid_filter", "filters")
        local, domain = v.normalize_email(target, field="filters")
        target = f"{local}@{domain}"
    elif target is not None:
        raise _bad(f"{at}: {action} takes no target.", "invalid_filter", "filters")
    stop = raw.get("stop", False)
    if not isinstance(stop, bool):
        raise _bad(f"{at}.stop must be true or false.", "invalid_filter", "filters")
    return {
        "name": check_text(raw["name"], "filters", MAX_FILTER_NAME_CHARS, "invalid_filter", what=f"{at}.name"),
        "field": check_field(raw["field"], "filters"),
        "op": _choice(raw["op"], OPS, f"{at}.op"),
        "value": check_text(raw["value"], "filters", MAX_VALUE_CHARS, "invalid_filter", what=f"{at}.value"),
        "action": action,
        "target": target,
        # A discarded message needs nothing more (a later fileinto would keep it again).
        "stop": True if action == "discard" else stop,
    }


def normalize_filters(value: object) -> list[dict[str, Any]]:
    """0-MAX_FILTERS rules, in order."""
    if not isinstance(value, (list, tuple)):
        raise _bad("filters must be a list of rules.", "invalid_filter", "filters")
    if len(value) > MAX_FILTERS:
        raise _bad(f"At most {MAX_FILTERS} filters are allowed; got {len(value)}.", "too_many_filters", "filters")
    return [normalize_filter(raw, i) for i, raw in enumerate(value)]


def redirect_targets(filters: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct addresses normalised rules redirect to, in rule order."""
    out: list[str] = []
    for f in filters:
        if f["action"] == "redirect" and f["target"] not in out:
            out.append(f["target"])
    return out


def check_onward(forward_to: list[str] | None, redirects: list[str], field: str = "filters") -> None:
    """Redirects obey the forwarding rules and limits: a mailbox's forwarding and its filters'
    redirects together name at most al.MAX_DESTINATIONS addresses of at most
    al.MAX_DESTINATIONS_CHARS characters (al.onward: each once)."""
    both = al.onward(forward_to, redirects)
    if len(both) > al.MAX_DESTINATIONS or sum(len(a) + 1 for a in both) > al.MAX_DESTINATIONS_CHARS:
        raise _bad(
            f"Forwarding and redirects together may name at most {al.MAX_DESTINATIONS} addresses "
            f"({al.MAX_DESTINATIONS_CHARS} characters); this would make {len(both)}.",
            "too_many_destinations",
            field,
        )


# --- app passwords -----------------------------------------------------------------------------


def check_app_password_name(value: object) -> str:
    if not isinstance(value, str) or not APP_PASSWORD_NAME.fullmatch(value):
        raise _bad(
            f"name must be 1-{MAX_APP_PASSWORD_NAME_CHARS} letters, digits, spaces or . @ ( ) + ' _ -, "
            "starting with a letter or digit.",
            "invalid_app_password",
            "name",
        )
    return value


def normalize_scopes(value: object) -> list[str]:
    """A non-empty subset of SCOPES, sorted."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(f"scopes must be a non-empty list drawn from {', '.join(SCOPES)}.", "invalid_scopes", "scopes")
    out = set()
    for item in value:
        if not isinstance(item, str) or item not in SCOPES:
            raise _bad(f"scopes may only hold {' and '.join(SCOPES)}.", "invalid_scopes", "scopes")
        if item in out:
            raise _bad(f"{item} is listed twice in scopes.", "invalid_scopes", "scopes")
        out.add(item)
    return sorted(out)


def new_app_password() -> str:
    """A fresh app password: six groups of four characters (120 bits), e.g. `k7qm-...`."""
    chars = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(4 * PASSWORD_GROUPS))
    return "-".join(chars[i : i + 4] for i in range(0, len(chars), 4))


def password_tag(password: str) -> str:
    """The first 16 bits of SHA-256(password), as 4 hex digits: the nodes' Dovecot computes the
    same (`%{sha256;truncate=16:password}`) to find the one line a login can match, so a login
    costs one bcrypt however many app passwords the mailbox has. It says nothing usable about a
    120-bit random password; the bcrypt hash is what verifies it."""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()[:TAG_HEX]


def free_slot(used: Iterable[int]) -> int | None:
    """The lowest slot (0..MAX_APP_PASSWORDS-1) no app password of the mailbox holds."""
    taken = set(used)
    return next((s for s in range(MAX_APP_PASSWORDS) if s not in taken), None)
