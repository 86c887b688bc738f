"""App passwords: each domain's ``app_passwords`` fragment, and when they were last used.

The fragment is a passwd-file for Dovecot's app-password passdbs (the bundle's Dovecot snippet:
one passdb per slot, tried before the mailbox's own password). What the compiler writes
(compiler/sieve.py app_password_lines, templates/rendered/app_passwords.j2), and so all a node
accepts, sorted by key, one line per app password and scope::

    <local>@<domain>/<imap|smtp>/<slot 00-19>/<tag: 4 hex>:{BLF-CRYPT}$2b$NN$<53 chars>

The key is what the slot's passdb looks up (``%u/%s/<slot>/%{sha256;truncate=16:password}``):
the login, the service (so a scope is enforced: an imap-only password has no ``smtp`` line), the
slot and a 16-bit tag of the password, so a login costs one bcrypt at most. No other field, no
other scheme, no key of another domain.

Use: the snippet's ``mailstate_app_logins`` metric counts successful logins per user and slot
(Dovecot's stats); ``logins()`` reads them with ``doveadm stats dump`` and ``new_uses()``
compares with the counts seen before, so the report can say which app passwords logged in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import Refused
from .rules import BCRYPT_RE, is_domain, is_local_part
from .verify import PRINTABLE_ASCII_RE

APP_FRAGMENT = "app_passwords"
SERVICES = ("imap", "smtp")
MAX_SLOTS = 20
METRIC = "mailstate_app_logins"
PASSDB_PREFIX = "mailstate-app-"
_LINE = re.compile(r"^([^@/:]+)@([^@/:]+)/([a-z]+)/([0-9]{2})/([0-9a-f]{4}):(.*)$")
_STAT = re.compile(r"^" + METRIC + r"_(\S+@\S+)_" + PASSDB_PREFIX + r"([0-9]{2})\s+duration\s+([0-9]+)\s")


def check_fragment(domain: str, data: bytes) -> int:
    """Refused unless ``data`` is an ``app_passwords`` fragment the compiler writes for ``domain``;
    the number of lines."""
    if not is_domain(domain):
        raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
    if not data.endswith(b"\n"):
        raise Refused(f"{APP_FRAGMENT} of {domain}: empty, or the last line does not end with a newline")
    last = ""
    lines = data[:-1].split(b"\n")
    for n, raw in enumerate(lines, 1):
        where = f"{APP_FRAGMENT} of {domain}, line {n}"
        if len(raw) > 512 or not PRINTABLE_ASCII_RE.fullmatch(raw):
            raise Refused(f"{where}: not printable ASCII of at most 512 bytes")
        m = _LINE.fullmatch(raw.decode("ascii"))
        if m is None:
            raise Refused(f"{where}: expected '<local>@<domain>/<service>/<slot>/<tag>:{{BLF-CRYPT}}<hash>'")
        local, dom, service, slot, _tag, password = m.groups()
        if dom != domain or not is_local_part(local):
            raise Refused(f"{where}: the key is not an address of {domain}")
        if service not in SERVICES or int(slot) >= MAX_SLOTS:
            raise Refused(f"{where}: the service must be {' or '.join(SERVICES)} and the slot 00-{MAX_SLOTS - 1:02d}")
        if not BCRYPT_RE.fullmatch(password):
            raise Refused(f"{where}: the password is not a {{BLF-CRYPT}}$2b$ bcrypt hash (and nothing may follow it)")
        key = raw.decode("ascii").partition(":")[0]
        if key <= last:
            raise Refused(f"{where}: out of order or listed twice (the compiler sorts by key)")
        last = key
    return len(lines)


def logins(dump: bytes) -> dict[str, int]:
    """{"<user> <slot>": successful logins} from ``doveadm stats dump`` (the snippet's metric,
    grouped by user and passdb name; Dovecot forgets the counts when it restarts or reloads)."""
    out: dict[str, int] = {}
    for line in dump.decode("utf-8", "replace").splitlines():
        m = _STAT.match(line)
        if m is not None and is_local_part(m.group(1).rpartition("@")[0]) and is_domain(m.group(1).rpartition("@")[2]):
            out[f"{m.group(1)} {int(m.group(2))}"] = int(m.group(3))
    return out


def new_uses(before: Mapping[str, int], now: Mapping[str, int]) -> list[tuple[str, int]]:
    """(user, slot) of every app password that logged in between two dumps: its count went up, or
    went down (Dovecot restarted since, and it logged in after), or it is new."""
    out = []
    for key, count in sorted(now.items()):
        old = before.get(key)
        if count > 0 and (old is None or count != old):
            user, _, slot = key.partition(" ")
            out.append((user, int(slot)))
    return out
