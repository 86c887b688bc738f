"""The alias map: each domain's ``virtual_alias_maps`` fragment, validated line by line and
concatenated into ``<release>/postfix/virtual_alias_maps`` (postmapped like the other maps).

What the compiler writes (compiler/maplines.py alias_lines, templates/rendered/virtual_alias_maps.j2),
and so all a node accepts, one line per key, keys of the fragment's own domain only::

    @<domain> <address>[,<address>...]      the catch-all (first line)
    @<domain> @<target>                     an alias domain: x@domain -> x@target (first line)
    <local>@<domain> <address>[,<address>...]   an alias, a forwarding, or a self-mapping

sorted by local part after the optional ``@<domain>`` line, at most MAX_RESULTS results
(50 destinations plus the mailbox itself when it keeps a copy), each ``<local>@<domain>`` by
the server's local-part and domain rules: no space, tab, comma inside an address, ``:``,
``|`` (a pipe to a command), ``/`` (a file), ``:include:`` or quote can get through, so no
line can deliver into a program or a file, or add a key for another domain.

A domain without aliases has no fragment; the release always has the (maybe empty) map,
because Postfix's main.cf names it.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from .errors import Refused
from .fsutil import open_new
from .mirror import BlobReader
from .rules import is_domain, is_local_part
from .verify import PRINTABLE_ASCII_RE, LineSplitter

ALIAS_MAP = "virtual_alias_maps"
MAX_RESULTS = 51


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at) and is_local_part(local) and is_domain(domain)


class AliasCheck:
    """Validates one domain's virtual_alias_maps fragment, a line at a time."""

    def __init__(self, domain: str) -> None:
        if not is_domain(domain):
            raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
        self.domain = domain
        self.last: bytes | None = None
        self.count = 0

    def _refuse(self, n: int, why: str) -> Refused:
        return Refused(f"{ALIAS_MAP} of {self.domain}, line {n}: {why}")

    def line(self, n: int, raw: bytes) -> None:
        if not PRINTABLE_ASCII_RE.fullmatch(raw):
            raise self._refuse(n, "not printable ASCII (control or non-ASCII bytes)")
        parts = raw.decode("ascii").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise self._refuse(n, "expected '<key> <address>[,<address>...]' with one space")
        key, value = parts
        results = value.split(",")
        if key == "@" + self.domain:
            if n != 1:
                raise self._refuse(n, f"@{self.domain} must be the first line")
            local = b""
            if len(results) == 1 and results[0].startswith("@"):
                target = results[0][1:]
                if not is_domain(target) or target == self.domain:
                    raise self._refuse(n, f"alias-domain target {results[0][:80]!r} is not another domain")
                self._count(local)
                return
        else:
            klocal, at, kdomain = key.rpartition("@")
            if not at or kdomain != self.domain:
                raise self._refuse(n, f"key {key[:80]!r} is not an address in {self.domain}")
            if not is_local_part(klocal):
                raise self._refuse(n, f"bad local part {klocal[:80]!r} (the server allows a-z 0-9 . _ + -)")
            local = klocal.encode()
        if len(results) > MAX_RESULTS:
            raise self._refuse(n, f"{len(results)} results, more than the {MAX_RESULTS} the server allows")
        if len(set(results)) != len(results):
            raise self._refuse(n, "an address is listed twice")
        for result in results:
            if not _is_address(result):
                raise self._refuse(n, f"{result[:80]!r} is not an email address the server accepts")
        self._count(local)

    def _count(self, local: bytes) -> None:
        if self.last is not None and local <= self.last:
            raise Refused(
                f"{ALIAS_MAP} of {self.domain}: {local.decode() or '@' + self.domain} is out of order or listed twice"
            )
        self.last = local
        self.count += 1


def check_bytes(domain: str, data: bytes) -> int:
    """Validate a whole fragment given as bytes; returns its line count (tests, the server's vectors)."""
    check = AliasCheck(domain)
    splitter = LineSplitter(f"{ALIAS_MAP} of {domain}")
    for i, line in enumerate(splitter.feed(data)):
        check.line(i + 1, line)
    splitter.close()
    return check.count


def write_alias_maps(cat: BlobReader, tree: dict[str, dict[str, str]], release: str, max_bytes: int) -> dict[str, str]:
    """Validate and concatenate every domain's fragment (sorted by domain) into
    ``<release>/postfix/virtual_alias_maps``; returns {domain: blob id} for the manifest."""
    out: dict[str, str] = {}
    with open_new(os.path.join(release, "postfix", ALIAS_MAP), 0o644) as target:
        for domain in sorted(tree):
            oid = tree[domain].get(ALIAS_MAP)
            if oid:
                _stream(cat, domain, oid, target, max_bytes)
                out[domain] = oid
    return out


def _stream(cat: BlobReader, domain: str, oid: str, target: BinaryIO, max_bytes: int) -> None:
    check = AliasCheck(domain)
    splitter = LineSplitter(f"{ALIAS_MAP} of {domain}")
    for chunk in cat.stream(oid, f"rendered/domains/{domain[:2]}/{domain}/{ALIAS_MAP}", max_bytes):
        target.write(chunk)
        start = splitter.count
        for i, line in enumerate(splitter.feed(chunk)):
            check.line(start + i + 1, line)
    splitter.close()
