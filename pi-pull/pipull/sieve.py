"""Sieve scripts from the server: a node runs only what the mailstate compiler writes.

A domain's ``sieve_scripts`` fragment holds the scripts of its mailboxes (compiler/sieve.py,
templates/rendered/sieve_script.j2 on the server), each as ``sieve <local> <length>`` and then
exactly <length> bytes of script, sorted by local part. A script is these lines and no others::

    # mailstate: the filters and vacation reply of <local>@<domain> (compiled by the server; do not edit)
    require ["date", "envelope", "fileinto", "imap4flags", "mailbox", "relational", "vacation"];
    if header :contains|:is "<header>" "<value>" {        (or: if address :all :is "from"|"to" "<value>" {)
      fileinto :create "<folder>";  |  redirect "<address>";  |  addflag "\\\\Seen";  |  discard;
      stop;                                                  (optional; always after discard)
    }
    ...                                                      (at most MAX_FILTERS rules)
    if allof (not exists "list-id", ..., not envelope :all :is "from" "<the mailbox>"[, currentdate ... "ge" "date" "<start>"][, ... "le" ... "<end>"]) {
      vacation :days <1-365>[ :subject "<subject>"] text:
    <the reply, dot-stuffed>
    .
    ;
    }

No other extension can be required (no ``vnd.dovecot.*``, ``include``, ``execute``, ``pipe``),
no other command or test appears. A string is a quoted string whose only escapes are ``\\"`` and
``\\\\``, and holds no control character or line separator; a header name, a folder, an address,
a date and every length follow the server's rules (state/owners.py), and tests/vectors/sieve_*.json
holds the two to the same verdicts. The node's Dovecot allows exactly these extensions too
(``sieve_extensions``), so even a script that slipped past this check could do no more.
"""

from __future__ import annotations

import re
from datetime import date

from .errors import Refused
from .rules import is_domain, is_local_part

SIEVE_FRAGMENT = "sieve_scripts"
MAX_FILTERS = 50
MAX_VALUE_CHARS = 500
MAX_FOLDER_CHARS = 200
MAX_SUBJECT_CHARS = 200
MAX_BODY_BYTES = 16 * 1024
MAX_INTERVAL_DAYS = 365
MAX_SCRIPT_BYTES = 256 * 1024  # 50 rules of the longest values and a 16 KiB reply fit with room to spare
EXTENSIONS = ("date", "envelope", "fileinto", "imap4flags", "mailbox", "relational", "vacation")
REQUIRE = "require [{}];".format(", ".join(f'"{e}"' for e in EXTENSIONS))
_FORBIDDEN = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029"
_STRING = f'"(?:[^"\\\\{_FORBIDDEN}]|\\\\["\\\\])*"'
_BODY_LINE = re.compile("^[^\\x00-\\x08\\x0a-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_IF_HEADER = re.compile(f"^if header :(contains|is) ({_STRING}) ({_STRING}) \\{{$")
_IF_ADDRESS = re.compile(f'^if address :all :is "(from|to)" ({_STRING}) \\{{$')
_FILEINTO = re.compile(f"^  fileinto :create ({_STRING});$")
_REDIRECT = re.compile(f"^  redirect ({_STRING});$")
_FLAG = '  addflag "\\\\Seen";'
_GUARDS = (
    'if allof (not exists "list-id", not exists "list-post", not exists "list-unsubscribe", '
    'not header :is "precedence" ["bulk", "junk", "list"], not header :contains "auto-submitted" "auto-", '
    'not envelope :all :is "from" '
)
_DATES = re.compile(
    f'^({_STRING})(?:, currentdate :zone "\\+0000" :value "ge" "date" ({_STRING}))?'
    f'(?:, currentdate :zone "\\+0000" :value "le" "date" ({_STRING}))?\\) \\{{$'
)
_VACATION = re.compile(f"^  vacation :days ([1-9][0-9]{{0,2}})(?: :subject ({_STRING}))? text:$")
_CONTAINER = re.compile(rb"^sieve ([a-z0-9][a-z0-9._+-]{0,63}) ([1-9][0-9]{0,8})$")


def header_line(address: str) -> str:
    return f"# mailstate: the filters and vacation reply of {address} (compiled by the server; do not edit)"


def unquote(token: str) -> str:
    """The value of a quoted string the patterns above matched."""
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at) and is_local_part(local) and is_domain(domain)


def check_folder(folder: str) -> str | None:
    """Why a compiled folder (levels joined by ".", the nodes' Maildir++ separator) is refused, or None."""
    if not folder or len(folder) > MAX_FOLDER_CHARS:
        return f"a folder name must be 1-{MAX_FOLDER_CHARS} characters"
    if folder.startswith((".", "/")) or folder.endswith(".") or ".." in folder:
        return "a folder name may not start with '.' or '/', end with '.' or hold '..'"
    if any(c in folder for c in "/*%") or folder != folder.strip():
        return "a folder name may not hold '/', '*' or '%', or start or end with a space"
    return None


class _Script:
    """One script, checked line by line (``Refused`` naming the mailbox and the line)."""

    def __init__(self, domain: str, local: str, lines: list[str]) -> None:
        self.address = f"{local}@{domain}"
        self.lines = lines
        self.i = 0
        self.rules = 0

    def refuse(self, why: str) -> Refused:
        return Refused(
            f"{SIEVE_FRAGMENT} of {self.address.partition('@')[2]}: script of {self.address}, line {self.i}: {why}"
        )

    def next(self) -> str:
        if self.i >= len(self.lines):
            raise self.refuse("the script ends early")
        line = self.lines[self.i]
        self.i += 1
        return line

    def value(self, token: str, what: str, limit: int) -> str:
        text = unquote(token)
        if not text or len(text) > limit:
            raise self.refuse(f"{what} must be 1-{limit} characters")
        return text

    def check(self) -> None:
        if self.next() != header_line(self.address):
            raise self.refuse("not the compiler's first line for this mailbox")
        if self.next() != REQUIRE:
            raise self.refuse(f"the only extensions allowed are {', '.join(EXTENSIONS)}, required in one line")
        while self.i < len(self.lines):
            line = self.next()
            if line.startswith(_GUARDS):
                self.vacation(line[len(_GUARDS) :])
                if self.i != len(self.lines):
                    raise self.refuse("nothing may follow the vacation block")
                return
            self.rule(line)

    def rule(self, line: str) -> None:
        m = _IF_HEADER.fullmatch(line)
        a = _IF_ADDRESS.fullmatch(line) if m is None else None
        if m is None and a is None:
            raise self.refuse("not a filter or the vacation block the compiler writes")
        self.rules += 1
        if self.rules > MAX_FILTERS:
            raise self.refuse(f"more than {MAX_FILTERS} filters")
        if m is not None:
            header = unquote(m.group(2))
            if not _HEADER_NAME.fullmatch(header):
                raise self.refuse("a header name is letters, digits and '-', at most 64")
            self.value(m.group(3), "a filter value", MAX_VALUE_CHARS)
        elif a is not None:
            self.value(a.group(2), "a filter value", MAX_VALUE_CHARS)
        self.action(self.next())

    def action(self, line: str) -> None:
        f = _FILEINTO.fullmatch(line)
        r = _REDIRECT.fullmatch(line)
        if f is not None:
            why = check_folder(unquote(f.group(1)))
            if why is not None:
                raise self.refuse(why)
        elif r is not None:
            target = unquote(r.group(1))
            if not _is_address(target) or target == self.address:
                raise self.refuse("redirect must name another address by the server's rules")
        elif line not in (_FLAG, "  discard;"):
            raise self.refuse("not an action the compiler writes (fileinto, redirect, addflag \\Seen, discard)")
        end = self.next()
        if end == "  stop;":
            end = self.next()
        elif line == "  discard;":
            raise self.refuse("discard is always followed by stop")
        if end != "}":
            raise self.refuse("expected '}' after the action")

    def vacation(self, rest: str) -> None:
        m = _DATES.fullmatch(rest)
        if m is None or unquote(m.group(1)) != self.address:
            raise self.refuse("not the vacation guards the compiler writes for this mailbox")
        start, end = (self.date(m.group(k)) if m.group(k) else None for k in (2, 3))
        if start is not None and end is not None and end < start:
            raise self.refuse("the vacation ends before it starts")
        v = _VACATION.fullmatch(self.next())
        if v is None or not 1 <= int(v.group(1)) <= MAX_INTERVAL_DAYS:
            raise self.refuse(f"expected 'vacation :days <1-{MAX_INTERVAL_DAYS}>[ :subject \"...\"] text:'")
        if v.group(2) is not None:
            self.value(v.group(2), "the vacation subject", MAX_SUBJECT_CHARS)
        self.body()
        if self.next() != ";" or self.next() != "}":
            raise self.refuse("expected ';' and '}' after the reply's text")

    def date(self, token: str) -> date:
        text = unquote(token)
        try:
            if _DATE.fullmatch(text):
                return date.fromisoformat(text)
        except ValueError:
            pass
        raise self.refuse(f"{text[:20]!r} is not an ISO date")

    def body(self) -> None:
        size = -1
        while True:
            line = self.next()
            if line == ".":
                break
            if not _BODY_LINE.fullmatch(line):
                raise self.refuse("the reply's text may hold tabs but no other control character")
            if line.startswith("."):
                if not line.startswith(".."):
                    raise self.refuse("a line of the reply that starts with '.' must be dot-stuffed")
                line = line[1:]
            size += len(line.encode("utf-8")) + 1
        if size < 0 or size > MAX_BODY_BYTES:
            raise self.refuse(f"the reply's text must be 1-{MAX_BODY_BYTES} bytes")


def check_script(domain: str, local: str, data: bytes) -> None:
    """Refused unless ``data`` is a script the compiler writes for ``local@domain``."""
    where = f"{SIEVE_FRAGMENT} of {domain}: script of {local}@{domain}"
    if len(data) > MAX_SCRIPT_BYTES:
        raise Refused(f"{where}: over {MAX_SCRIPT_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(f"{where}: not UTF-8") from None
    if "\r" in text or not text.endswith("\n"):
        raise Refused(f"{where}: lines must end with a newline (no carriage return)")
    _Script(domain, local, text[:-1].split("\n")).check()


def parse_fragment(domain: str, data: bytes) -> dict[str, bytes]:
    """{local part: script} of a domain's ``sieve_scripts`` fragment, every script checked."""
    if not is_domain(domain):
        raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
    out: dict[str, bytes] = {}
    pos = 0
    last = ""
    while pos < len(data):
        end = data.find(b"\n", pos, pos + 128)
        m = _CONTAINER.fullmatch(data[pos:end]) if end >= 0 else None
        if m is None:
            raise Refused(f"{SIEVE_FRAGMENT} of {domain}: expected 'sieve <local> <length>' at byte {pos}")
        local, length = m.group(1).decode("ascii"), int(m.group(2))
        if not is_local_part(local) or (out and local <= last):
            raise Refused(f"{SIEVE_FRAGMENT} of {domain}: {local[:64]!r} is not a local part in order")
        script = data[end + 1 : end + 1 + length]
        if len(script) != length:
            raise Refused(f"{SIEVE_FRAGMENT} of {domain}: the script of {local} is cut short")
        check_script(domain, local, script)
        out[local] = script
        last = local
        pos = end + 1 + length
    if not out:
        raise Refused(f"{SIEVE_FRAGMENT} of {domain}: empty (the compiler writes none without a script)")
    return out
