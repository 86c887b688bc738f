"""The server's rules that the node applies too, in one place.

The agent cannot import mailstate (it runs on the node's own Python with the standard library
only), so it keeps its own copy of every rule it shares with the server. Each rule names its
server twin; a table in ``tests/vectors/`` holds both to the same verdicts, so a change to
one side that the other does not follow fails the tests.
"""

from __future__ import annotations

import re

# state/validate.py normalize_domain: RFC 1035 labels, at least two, at most 253 characters,
# a top-level label that is not all digits (vectors: domains.json).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)" + _LABEL + r"(?:\." + _LABEL + r")*\.(?![0-9]+$)" + _LABEL + r"$")

# state/validate.py is_local_part: a conservative lowercase dot-atom (vectors: local_parts.json).
LOCAL_RE = re.compile(r"^(?=.{1,64}$)[a-z0-9](?:[a-z0-9_+-]|\.(?=[a-z0-9_+-]))*$")

# state/validate.py MAILBOX_ID: <yyyymmdd>-<6 lowercase hex> (vectors: rendered_lines.json).
MAILBOX_ID_RE = re.compile(r"^[0-9]{8}-[0-9a-f]{6}$")

# state/validate.py validate_password_hash: bcrypt as Dovecot's {BLF-CRYPT} (vectors: rendered_lines.json).
BCRYPT_RE = re.compile(r"^\{BLF-CRYPT\}\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")

# state/validate.py validate_quota and MAX_QUOTA_MB (vectors: rendered_lines.json).
QUOTA_RE = re.compile(r"^storage=([1-9][0-9]{0,6})M$")
MAX_QUOTA_MB = 1_048_576

# state/validate.py validate_node_name: 1-59 lowercase letters, digits or hyphens, no hyphen at
# either end, so that the DKIM selectors ms1-<name> and ms2-<name> are DNS labels (<= 63)
# (vectors: node_names.json).
NODE_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,57}[a-z0-9])?$")
NODE_NAME_RULE = "1-59 lowercase letters, digits or hyphens, not starting or ending with a hyphen"

# state/signers.py is_key_type: the key types an allowed_signers line may name (vectors:
# allowed_signers.json).
KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-", "rsa-")


def is_domain(name: str) -> bool:
    """True for a domain in the server's canonical form (lowercase ASCII, punycode for IDN)."""
    return bool(DOMAIN_RE.fullmatch(name))


def is_local_part(local: str) -> bool:
    """True for a local part the server accepts."""
    return bool(LOCAL_RE.fullmatch(local))


def is_node_name(name: str) -> bool:
    """True for a node name the server accepts."""
    return bool(NODE_NAME_RE.fullmatch(name))


_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class SignerLine:
    """One allowed_signers line that names a key (state/signers.py SignerLine)."""

    __slots__ = ("key", "key_type", "options", "principals")

    def __init__(self, principals: str, options: str | None, key_type: str, key: str) -> None:
        self.principals = principals
        self.options = options
        self.key_type = key_type
        self.key = key


def is_key_type(field: str) -> bool:
    """True for an allowed_signers field that is a key type (the field before the key)."""
    return field.startswith(KEY_TYPE_PREFIXES)


def split_signers_line(line: str) -> list[str]:
    """An allowed_signers line cut into fields; a double-quoted run (an option value) stays
    whole. Comments and blank lines give no fields (state/signers.py split_signers_line)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return []
    fields: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch in " \t" and not quoted:
            if cur:
                fields.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        fields.append("".join(cur))
    return fields


def parse_signers_line(line: str) -> SignerLine | None:
    """The line's principals, options, key type and key; None for a comment, a blank line or a
    line that names no key (state/signers.py parse_signers_line)."""
    fields = split_signers_line(line)
    if len(fields) < 3:
        return None
    i = 1 if is_key_type(fields[1]) else 2  # options come before the key type when present
    if i + 1 >= len(fields) or not is_key_type(fields[i]) or not _BASE64.fullmatch(fields[i + 1]):
        return None
    return SignerLine(fields[0], fields[1] if i == 2 else None, fields[i], fields[i + 1])
