"""Outbound limits on the node: what the state says about sending, kept where the policy service reads it.

The compiler writes (the server's state/sending.py; tests/vectors/sending_lines.json holds both
to one table of verdicts):

    rendered/sending                          node-wide defaults (only with mailstate.yaml's `sending:`)
        send_per_hour <n|none>
        send_per_day <n|none>
        auto_suspend_factor <x|none>
    rendered/domains/<bb>/<domain>/sending    only for a domain with something to say
        @limits <n|default> <n|default>       the domain's (or its project's) limits, first, optional
        <local> <ok|suspended> <yyyymmddTHHMMSSZ>   mailboxes with a sending state, sorted by local part

``check`` validates every such file a tick would bring live, before the swap (a bad line is
Refused like any rendered line). ``Sync.step`` copies them, after the release is live, to
``<root>/policy/`` (``defaults`` and ``domains/<domain>``; atomic writes, only what changed),
where the policy service (pipull/policy.py) reads them on each query.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from .config import Config
from .errors import Refused, TickError
from .fsutil import atomic_write
from .mirror import Mirror
from .rules import is_domain, is_local_part
from .runner import short
from .verify import MAX_LINE_BYTES, PRINTABLE_ASCII_RE

SETTINGS_PATH = "rendered/sending"
FRAGMENT = "sending"
LIMITS_KEY = "@limits"
MAX_PER_HOUR = 1_000_000
MAX_PER_DAY = 24_000_000
_INT = re.compile(r"^(?:0|[1-9][0-9]{0,8})$")
_FACTOR = re.compile(r"^[1-9][0-9]{0,3}(?:\.[0-9]{1,6})?$")
_STAMP = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")


DEFAULT_FACTOR = 3.0  # the server's SendingSettings.auto_suspend_factor, for a state without rendered/sending


@dataclass(frozen=True)
class Defaults:
    """rendered/sending: every mailbox's limits unless its domain says otherwise (None: no limit)."""

    per_hour: int | None = None
    per_day: int | None = None
    factor: float | None = DEFAULT_FACTOR


@dataclass(frozen=True)
class DomainSending:
    """One domain's fragment: its limits (None: the default) and each mailbox's token."""

    per_hour: int | None = None
    per_day: int | None = None
    tokens: dict[str, str] = field(default_factory=dict)


def _lines(what: str, data: bytes) -> list[str]:
    if not data.endswith(b"\n"):
        raise Refused(f"{what}: the last line does not end with a newline")
    out = []
    for n, raw in enumerate(data[:-1].split(b"\n"), 1):
        if len(raw) > MAX_LINE_BYTES or not PRINTABLE_ASCII_RE.fullmatch(raw):
            raise Refused(f"{what}, line {n}: not printable ASCII, or too long")
        out.append(raw.decode("ascii"))
    return out


def _count(what: str, text: str, high: int, none: str) -> int | None:
    if text == none:
        return None
    if not _INT.fullmatch(text) or int(text) > high:
        raise Refused(f"{what}: {text[:20]!r} is not {none} or a whole number up to {high}")
    return int(text)


def parse_defaults(data: bytes) -> Defaults:
    """rendered/sending, exactly as the compiler writes it; Refused otherwise."""
    what = SETTINGS_PATH
    lines = _lines(what, data)
    keys = ["send_per_hour", "send_per_day", "auto_suspend_factor"]
    if (
        len(lines) != 3
        or [line.split(" ", 1)[0] for line in lines] != keys
        or any(line.count(" ") != 1 for line in lines)
    ):
        raise Refused(f"{what}: expected the lines send_per_hour, send_per_day and auto_suspend_factor, in that order")
    values = [line.split(" ", 1)[1] for line in lines]
    factor = None
    if values[2] != "none":
        if not _FACTOR.fullmatch(values[2]) or not 1 <= float(values[2]) <= 1000:
            raise Refused(f"{what}: auto_suspend_factor {values[2][:20]!r} is not none or a number from 1 to 1000")
        factor = float(values[2])
    return Defaults(
        _count(f"{what}: send_per_hour", values[0], MAX_PER_HOUR, "none"),
        _count(f"{what}: send_per_day", values[1], MAX_PER_DAY, "none"),
        factor,
    )


def parse_domain(domain: str, data: bytes) -> DomainSending:
    """A domain's `sending` fragment, exactly as the compiler writes it; Refused otherwise."""
    if not is_domain(domain):
        raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
    what = f"sending of {domain}"
    lines = _lines(what, data)
    if not lines:
        raise Refused(f"{what}: empty (the compiler writes no fragment then)")
    hour = day = None
    if lines[0].startswith(LIMITS_KEY + " "):
        parts = lines.pop(0).split(" ")
        if len(parts) != 3 or parts[1:] == ["default", "default"]:
            raise Refused(f"{what}, line 1: expected '@limits <n|default> <n|default>', not both default")
        hour = _count(f"{what}, line 1", parts[1], MAX_PER_HOUR, "default")
        day = _count(f"{what}, line 1", parts[2], MAX_PER_DAY, "default")
    tokens: dict[str, str] = {}
    last = ""
    for n, line in enumerate(lines, 2 if hour is not None or day is not None else 1):
        parts = line.split(" ")
        if (
            len(parts) != 3
            or not is_local_part(parts[0])
            or parts[1] not in ("ok", "suspended")
            or not _STAMP.fullmatch(parts[2])
        ):
            raise Refused(f"{what}, line {n}: expected '<local> <ok|suspended> <yyyymmddTHHMMSSZ>'")
        if parts[0] <= last:
            raise Refused(
                f"{what}, line {n}: {parts[0]} is out of order or listed twice (the compiler sorts by local part)"
            )
        last = parts[0]
        tokens[parts[0]] = f"{parts[1]} {parts[2]}"
    return DomainSending(hour, day, tokens)


# --- what a tick brings live ----------------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """The sending files that differ between the live commit and the tip: blob ids ("" = gone)."""

    defaults: str | None  # None: unchanged
    domains: dict[str, str]


class Sync:
    """Check (before the swap) and copy (after it) the sending files; see the module docstring.

    pipull/spampolicy.py copies its files the same way (its own ``settings_path``, ``fragment``, ``label``)."""

    settings_path = SETTINGS_PATH
    fragment = FRAGMENT
    label = "sending limits"

    def __init__(self, cfg: Config, mirror: Mirror, log: logging.Logger) -> None:
        self.cfg = cfg
        self.mirror = mirror
        self.log = log
        self.dir = os.path.join(cfg.root, "policy")

    def changes(self, old: str | None, new: str) -> Changes:
        """What differs between ``old`` (None: nothing synced yet, everything) and ``new``."""
        if old is None:
            r = self.mirror.git("ls-tree", "-r", "-z", new, "--", "rendered/")
        else:
            r = self.mirror.git("diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new, "--", "rendered/")
        if r.returncode != 0:
            raise TickError(f"git {'ls-tree' if old is None else 'diff-tree'} failed: {short(r.stderr)}")
        fields = r.stdout.split(b"\0")
        entries: list[tuple[str, str]] = []
        if old is None:
            for entry in fields:
                if entry:
                    head, _, name = entry.partition(b"\t")
                    entries.append((name.decode("utf-8", "replace"), head.decode("ascii", "replace").split()[2]))
        else:
            for i in range(0, len(fields) - 1, 2):
                meta, path = fields[i].decode("ascii", "replace"), fields[i + 1].decode("utf-8", "replace")
                oid = meta.lstrip(":").split()[3]
                entries.append((path, "" if not oid.strip("0") else oid))
        defaults: str | None = None
        domains: dict[str, str] = {}
        for path, oid in entries:
            parts = path.split("/")
            if path == self.settings_path:
                defaults = oid
            elif len(parts) == 5 and parts[1] == "domains" and parts[4] == self.fragment:
                if not is_domain(parts[3]) or parts[2] != parts[3][:2]:
                    raise Refused("unsafe or misplaced domain directory {!r}".format("/".join(parts[:4])))
                domains[parts[3]] = oid
        if old is None and defaults is None:
            defaults = ""
        return Changes(defaults, domains)

    def _blob(self, oid: str) -> bytes:
        r = self.mirror.git("cat-file", "blob", oid)
        if r.returncode != 0:
            raise TickError(f"git cat-file {oid[:12]} failed: {short(r.stderr)}")
        if len(r.stdout) > self.cfg.max_file_bytes:
            raise Refused(f"a {self.fragment} file is over [limits] max_file_mb ({self.cfg.max_file_mb} MB)")
        return r.stdout

    def check(self, old: str | None, new: str) -> Changes:
        """Validate every sending file `new` changes (Refused before anything goes live)."""
        found = self.changes(old, new)
        if found.defaults:
            parse_defaults(self._blob(found.defaults))
        for domain, oid in found.domains.items():
            if oid:
                parse_domain(domain, self._blob(oid))
        return found

    def synced(self) -> str | None:
        try:
            with open(os.path.join(self.dir, "synced"), encoding="ascii") as fh:
                value = fh.read().strip()
        except OSError:
            return None
        return value if re.fullmatch(r"[0-9a-f]{40}", value) else None

    def step(self, live: str | None) -> int:
        """Bring ``<root>/policy`` to the live commit; returns the files written or removed.

        A failure is logged and tried again next tick; the policy service keeps the last files."""
        if not live:
            return 0
        base = self.synced()
        if base == live:
            return 0
        try:
            if base is not None and not self.mirror.is_ancestor(base, live):
                base = None  # not a descendant (a rebuilt mirror): copy everything again
            found = self.check(base, live)
            return self._write(found, live, full=base is None)
        except (Refused, TickError, OSError) as e:
            self.log.error(f"{self.label} not updated (the last ones stay in use): {e}")
            return 0

    def _write(self, found: Changes, live: str, *, full: bool) -> int:
        domains_dir = os.path.join(self.dir, "domains")
        os.makedirs(domains_dir, mode=0o755, exist_ok=True)
        written = 0
        if found.defaults is not None:
            path = os.path.join(self.dir, "defaults")
            if found.defaults:
                atomic_write(path, self._blob(found.defaults))
            elif os.path.exists(path):
                os.unlink(path)
            written += 1
        keep = set(found.domains) if full else None
        for domain, oid in sorted(found.domains.items()):
            path = os.path.join(domains_dir, domain)
            if oid:
                atomic_write(path, self._blob(oid))
            elif os.path.exists(path):
                os.unlink(path)
            written += 1
        if keep is not None:
            for name in os.listdir(domains_dir):
                if name not in keep and is_domain(name):
                    os.unlink(os.path.join(domains_dir, name))
                    written += 1
        atomic_write(os.path.join(self.dir, "synced"), (live + "\n").encode())
        if written:
            self.log.info(f"{self.label}: {written} file(s) updated for {live[:12]}")
        return written
