"""The sender-login map: each domain's ``sender_login_maps`` fragment, validated line by line
and concatenated into ``<release>/postfix/sender_login_maps`` (postmapped like the other maps).
Postfix's submission services (master.cf.mailstate) refuse a MAIL FROM the SASL login does not
own (``reject_sender_login_mismatch``).

What the compiler writes (compiler/maplines.py, templates/rendered/sender_login_maps.j2), and so
all a node accepts, one line per address, sorted by address::

    <local>@<domain> <login>[,<login>...]      who may send as that address

The key is an address of the fragment's own domain, or of one of its alias domains: a key
``x@A`` in domain T's fragment is taken only when A's own virtual_alias_maps says
``@A @T`` (so no fragment can grant sender rights over another domain's addresses), and never
twice across the map. Each login is an address by the server's rules (no space, comma inside
an address, ``:`` or control byte), at most MAX_OWNERS, none listed twice.

A domain without such lines has no fragment; the release always has the (maybe empty) map,
because Postfix's main.cf names it.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from .aliasmap import ALIAS_MAP
from .errors import Refused
from .fsutil import open_new
from .mirror import BlobReader
from .rules import is_domain, is_local_part
from .verify import PRINTABLE_ASCII_RE, LineSplitter

SENDER_MAP = "sender_login_maps"
# The compiler's walk (compiler.maplines) stops at state.aliases.MAX_EXPANSION addresses.
MAX_OWNERS = 500


def _split(text: str) -> tuple[str, str] | None:
    local, at, domain = text.rpartition("@")
    if at and is_local_part(local) and is_domain(domain):
        return local, domain
    return None


class SenderCheck:
    """Validates one domain's sender_login_maps fragment, a line at a time.

    ``claims`` collects the keys of other domains (``{alias domain: {local, ...}}``): the
    caller checks each claimed domain is an alias domain of this one and that no key repeats.
    """

    def __init__(self, domain: str) -> None:
        if not is_domain(domain):
            raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
        self.domain = domain
        self.last: str | None = None
        self.count = 0
        self.keys: set[str] = set()
        self.claims: dict[str, set[str]] = {}

    def _refuse(self, n: int, why: str) -> Refused:
        return Refused(f"{SENDER_MAP} of {self.domain}, line {n}: {why}")

    def line(self, n: int, raw: bytes) -> None:
        if not PRINTABLE_ASCII_RE.fullmatch(raw):
            raise self._refuse(n, "not printable ASCII (control or non-ASCII bytes)")
        parts = raw.decode("ascii").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise self._refuse(n, "expected '<address> <login>[,<login>...]' with one space")
        key, value = parts
        place = _split(key)
        if place is None:
            raise self._refuse(n, f"key {key[:80]!r} is not an email address the server accepts")
        local, domain = place
        owners = value.split(",")
        if len(owners) > MAX_OWNERS:
            raise self._refuse(n, f"{len(owners)} logins, more than the {MAX_OWNERS} the server allows")
        if len(set(owners)) != len(owners):
            raise self._refuse(n, "a login is listed twice")
        for owner in owners:
            if _split(owner) is None:
                raise self._refuse(n, f"{owner[:80]!r} is not an email address the server accepts")
        if self.last is not None and key <= self.last:
            raise Refused(f"{SENDER_MAP} of {self.domain}: {key[:80]} is out of order or listed twice")
        self.last = key
        if domain == self.domain:
            self.keys.add(local)
        else:
            self.claims.setdefault(domain, set()).add(local)
        self.count += 1


def check_bytes(domain: str, data: bytes) -> SenderCheck:
    """Validate a whole fragment given as bytes (tests, the server's vectors); the finished check."""
    check = SenderCheck(domain)
    splitter = LineSplitter(f"{SENDER_MAP} of {domain}")
    for i, line in enumerate(splitter.feed(data)):
        check.line(i + 1, line)
    splitter.close()
    return check


def check_claims(checks: dict[str, SenderCheck], alias_targets: dict[str, str]) -> None:
    """Every claimed key ``x@A`` in T's fragment: A is an alias domain of T (``alias_targets``:
    {A: T} from the alias map) and neither A's own fragment nor a third one has ``x@A``."""
    for domain in sorted(checks):
        for other, locals_ in sorted(checks[domain].claims.items()):
            if alias_targets.get(other) != domain:
                raise Refused(
                    f"{SENDER_MAP} of {domain}: lists addresses of {other[:80]}, which is not an alias domain of {domain}"
                )
            own = checks.get(other)
            twice = sorted(locals_ & own.keys) if own is not None else []
            if twice:
                raise Refused(f"{SENDER_MAP}: {twice[0]}@{other} is listed by both {other} and {domain}")


def alias_target(cat: BlobReader, domain: str, oid: str, max_bytes: int) -> str | None:
    """The target T of an alias domain (its virtual_alias_maps starts ``@domain @T``), else None."""
    head = b""
    for chunk in cat.stream(oid, f"rendered/domains/{domain[:2]}/{domain}/{ALIAS_MAP}", max_bytes):
        if len(head) < 1024:
            head += chunk[:1024]
    first = head.split(b"\n", 1)[0].decode("ascii", "replace").split(" ")
    if len(first) == 2 and first[0] == f"@{domain}" and first[1].startswith("@") and is_domain(first[1][1:]):
        return first[1][1:]
    return None


def write_sender_maps(cat: BlobReader, tree: dict[str, dict[str, str]], release: str, max_bytes: int) -> dict[str, str]:
    """Validate and concatenate every domain's fragment (sorted by domain) into
    ``<release>/postfix/sender_login_maps``; returns {domain: blob id} for the manifest."""
    out: dict[str, str] = {}
    checks: dict[str, SenderCheck] = {}
    with open_new(os.path.join(release, "postfix", SENDER_MAP), 0o644) as target:
        for domain in sorted(tree):
            oid = tree[domain].get(SENDER_MAP)
            if oid:
                checks[domain] = _stream(cat, domain, oid, target, max_bytes)
                out[domain] = oid
    claimed = sorted({other for check in checks.values() for other in check.claims})
    targets: dict[str, str] = {}
    for other in claimed:
        alias_oid = tree.get(other, {}).get(ALIAS_MAP)
        found = alias_target(cat, other, alias_oid, max_bytes) if alias_oid else None
        if found:
            targets[other] = found
    check_claims(checks, targets)
    return out


def _stream(cat: BlobReader, domain: str, oid: str, target: BinaryIO, max_bytes: int) -> SenderCheck:
    check = SenderCheck(domain)
    splitter = LineSplitter(f"{SENDER_MAP} of {domain}")
    for chunk in cat.stream(oid, f"rendered/domains/{domain[:2]}/{domain}/{SENDER_MAP}", max_bytes):
        target.write(chunk)
        start = splitter.count
        for i, line in enumerate(splitter.feed(chunk)):
            check.line(start + i + 1, line)
    splitter.close()
    return check
