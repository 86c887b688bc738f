"""allowed_signers lines: the one parser the server, the bundle and (through its twin in
pi-pull/pipull/rules.py) the node use. Format (ssh-keygen(1), ALLOWED SIGNERS):

    principals [options] keytype base64-key [comment]

tests/vectors/allowed_signers.json holds the server and the node to the same reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True)
class SignerLine:
    principals: str
    options: str | None
    key_type: str
    key: str


def split_signers_line(line: str) -> list[str]:
    """An allowed_signers line cut into fields; a double-quoted run (an option value) stays whole."""
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


def is_key_type(field: str) -> bool:
    return field.startswith(("ssh-", "ecdsa-", "sk-", "rsa-"))


def parse_signers_line(line: str) -> SignerLine | None:
    """The line's principals, options, key type and key; None for a comment, a blank line or a
    line that names no key."""
    fields = split_signers_line(line)
    if len(fields) < 3:
        return None
    i = 1 if is_key_type(fields[1]) else 2  # options come before the key type when present
    if i + 1 >= len(fields) or not is_key_type(fields[i]) or not _BASE64.fullmatch(fields[i + 1]):
        return None
    return SignerLine(fields[0], fields[1] if i == 2 else None, fields[i], fields[i + 1])
