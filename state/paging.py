"""Keyset pagination for the list operations (list-users, list-domains, list-aliases, list-nodes).

A page is asked for with `limit` (1-PAGE_MAX entries) and/or `cursor` (the `next_cursor` of
the page before). The cursor is the last key the previous page listed (a domain name; a
(domain, local part) pair; ...) with the listing and filter it belongs to, as base64url JSON.
It is opaque to callers but not secret: forging one only moves where a listing starts, and
every entry is still checked against the caller's project.

Why a key and not an offset: every page is read from the snapshot current when it is asked
for, and writes land between pages. An offset shifts when an earlier entry is added or
removed, so entries would be listed twice or skipped; "everything after key K", in the
listing's order, does not move. So an entry that exists from the first page to the last is
listed exactly once, entries added meanwhile appear if they sort after the cursor, and
entries removed meanwhile may or may not appear.

Without `limit` and `cursor` a listing answers everything, as the spec's "List all ..." says,
and its answer has no `next_cursor` key at all (exactly the spec's shape). With either, the
answer carries `next_cursor`: a string while entries remain, null on the last page. A
`cursor` without `limit` lists everything after the cursor.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailstate.state.errors import InvalidInput

PAGE_MAX = 1000
MAX_CURSOR_CHARS = 1024
CURSOR_VERSION = 1
_CURSOR_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")
_LIMIT_TEXT = re.compile(r"^[0-9]{1,7}$")


def _bad_cursor() -> InvalidInput:
    return InvalidInput(
        "The cursor is not one this listing gave out (from another listing or filter, or altered); "
        "list again without a cursor to start from the beginning.",
        code="invalid_cursor",
        field="cursor",
    )


def check_limit(value: object) -> int | None:
    """`limit` as given in a query string ("50") or JSON (50): a whole number 1-PAGE_MAX."""
    if value is None:
        return None
    if isinstance(value, str) and _LIMIT_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PAGE_MAX:
        raise InvalidInput(f"limit must be a whole number from 1 to {PAGE_MAX}.", code="invalid_limit", field="limit")
    return value


def check_cursor_text(value: object) -> str | None:
    """The cursor's outer form (base64url text, at most MAX_CURSOR_CHARS); its content is
    checked against the listing by `decode`."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_CURSOR_CHARS or not _CURSOR_CHARS.fullmatch(value):
        raise _bad_cursor()
    return value


def encode(listing: str, scope: str, key: Sequence[str]) -> str:
    """The cursor naming `key` as the last entry listed of `listing` under filter `scope`."""
    raw = json.dumps([CURSOR_VERSION, listing, scope, *key], separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(raw.encode("ascii")).rstrip(b"=").decode("ascii")


def decode(cursor: str, listing: str, scope: str, parts: int) -> tuple[str, ...]:
    """The key a cursor of `listing`/`scope` names (`parts` strings), or InvalidInput invalid_cursor."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise _bad_cursor() from None
    if (
        not isinstance(raw, list)
        or len(raw) != 3 + parts
        or raw[:3] != [CURSOR_VERSION, listing, scope]
        or not all(isinstance(part, str) for part in raw[3:])
    ):
        raise _bad_cursor()
    return tuple(raw[3:])


@dataclass(frozen=True)
class Page:
    """What a list request asks for: at most `limit` entries (None: all) after key `after`."""

    listing: str
    scope: str
    limit: int | None
    after: tuple[str, ...] | None
    paged: bool

    @classmethod
    def of(cls, req: Any, listing: str, scope: str = "", parts: int = 1) -> Page:
        """The page `req` (a state.models.PageRequest) asks for; a bad cursor is InvalidInput."""
        after = decode(req.cursor, listing, scope, parts) if req.cursor is not None else None
        return cls(listing, scope, req.limit, after, paged=req.limit is not None or req.cursor is not None)

    def finish(self, result: dict[str, Any], last: Sequence[str] | None, more: bool) -> dict[str, Any]:
        """`result` with `next_cursor` when paging was asked for: the cursor after `last`
        while `more` entries remain, else null."""
        if self.paged:
            result["next_cursor"] = encode(self.listing, self.scope, last) if more and last is not None else None
        return result
