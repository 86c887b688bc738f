"""Trust checks: the commit's SSH signature (local allowed_signers only) and rendered content.

A node applies only what the mailstate compiler can produce (compiler/render.py and
templates/rendered/), checked line by line with the node's OWN mail_root, uid and gid:

    passwd                   <local>@<domain>:{BLF-CRYPT}$2b$NN$<53>:<uid>:<gid>::<mail_root>/<domain>/<dir>::userdb_quota_rule=*:storage=<N>M
    virtual_mailbox_maps     <local>@<domain> <domain>/<dir>/
    virtual_mailbox_domains  <domain> OK
    mailboxes (format 2)     <local> <yyyymmdd-xxxxxx> <active|inactive>

``<dir>`` is ``<local>`` (format 1) or ``<local>~<id>`` (format 2: the domain has a
``mailboxes`` fragment, whose active lines must be exactly the passwd and map entries). Each
file is sorted by local part, every line ends in a newline, nothing else is allowed: no
``{PLAIN}`` or scheme-less password, no ``nopassword``/``userdb_uid``/``userdb_home``/``proxy``
field, no home outside the mail root. Local parts and domains follow the server's rules
(state/validate.py); tests/vectors/ holds both to the same table.

The checker is streaming: it keeps a running digest of each file's (local, dir) sequence
instead of sets, so a domain of any size validates in constant memory.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import Refused, TickError
from .mirror import Mirror
from .rules import BCRYPT_RE, MAILBOX_ID_RE, MAX_QUOTA_MB, QUOTA_RE, is_domain, is_local_part
from .runner import short

PRINTABLE_ASCII_RE = re.compile(rb"^[\x20-\x7e]*$")
# One match for a line exactly as the compiler writes it (the common case, ~4x faster than the
# field-by-field checks, which then run only to say what is wrong with a line that failed it).
_LOCAL = r"(?=[a-z0-9._+-]{1,64}[:@ ])[a-z0-9](?:[a-z0-9_+-]|\.(?=[a-z0-9_+-]))*"
_PASSWD_FAST = re.compile(
    r"(" + _LOCAL + r")@([a-z0-9.-]+):\{BLF-CRYPT\}\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}"
    r":([0-9]+):([0-9]+)::([!-9;-~]+)::userdb_quota_rule=\*:storage=([1-9][0-9]{0,6})M"
    r"( proxy_maybe=y host=[0-9a-z.:-]+| nologin=y)?"
)
_MAP_FAST = re.compile(r"(" + _LOCAL + r")@([a-z0-9.-]+) ([a-z0-9.-]+)/([!-.0-~]+)/")
_MAILBOXES_FAST = re.compile(r"(" + _LOCAL + r") ([0-9]{8}-[0-9a-f]{6}) (active|inactive)")
# No line the compiler writes comes near this; a longer one is refused before it is parsed.
MAX_LINE_BYTES = 8192
MAX_COMMIT_BYTES = 1024 * 1024
ID_SEPARATOR = "~"


def check_allowed_signers(cfg: Config) -> None:
    if not os.path.isfile(cfg.allowed_signers) or os.path.getsize(cfg.allowed_signers) == 0:
        raise TickError(f"allowed_signers {cfg.allowed_signers} is missing or empty; refusing to trust anything")


def verify_commit(mirror: Mirror, cfg: Config, sha: str) -> None:
    """``git verify-commit`` against the node's own allowed_signers; Refused with the reason."""
    check_allowed_signers(cfg)
    size = mirror.object_size(sha, "commit")
    if size > MAX_COMMIT_BYTES:
        raise Refused(f"commit {sha[:12]} is {size} bytes, over the {MAX_COMMIT_BYTES} a state commit may weigh")
    args = ["-c", "gpg.ssh.allowedSignersFile=" + cfg.allowed_signers, "-c", "gpg.ssh.program=" + cfg.ssh_keygen]
    if cfg.revoked_signers:
        args += ["-c", "gpg.ssh.revocationFile=" + cfg.revoked_signers]
    r = mirror.git(*args, "verify-commit", sha)
    if r.returncode == 0:
        return
    raw = mirror.git("cat-file", "commit", sha).stdout
    header = raw.split(b"\n\n", 1)[0]
    if b"\ngpgsig " not in header and b"\ngpgsig-sha256 " not in header:
        raise Refused(f"commit {sha[:12]} is not signed")
    if b"BEGIN SSH SIGNATURE" not in raw:
        raise Refused(f"commit {sha[:12]} is not SSH-signed (only ssh signatures are trusted)")
    detail = short(r.stderr + r.stdout, 200) or f"rc={r.returncode}"
    raise Refused(f"commit {sha[:12]} is not signed by a trusted key ({detail})")


class LineSplitter:
    """Cuts a stream of chunks into lines (without the newline), bounding each line's length."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.rest = b""
        self.count = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self.rest + chunk
        lines = data.split(b"\n")
        self.rest = lines.pop()
        if len(self.rest) > MAX_LINE_BYTES or any(len(line) > MAX_LINE_BYTES for line in lines):
            raise Refused(f"{self.what}: a line is longer than {MAX_LINE_BYTES} bytes")
        self.count += len(lines)
        return lines

    def close(self) -> None:
        if self.rest:
            raise Refused(f"{self.what}: the last line does not end with a newline")


@dataclass
class _Seq:
    """A file's (local, dir) sequence: strictly sorted by local part, kept as a digest."""

    what: str
    last: bytes = b""
    count: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def add(self, local: str, value: str) -> None:
        key = local.encode()
        if self.count and key <= self.last:
            raise Refused(f"{self.what}: {local} is out of order or listed twice (the compiler sorts by local part)")
        self.last = key
        self.count += 1
        self.digest.update(key + b"\0" + value.encode() + b"\n")


class DomainCheck:
    """Validates one domain's rendered fragments line by line (feed the lines of each file, then
    ``finish()``). Every failure is Refused with the file, the line number and the reason; a
    password hash never appears in a message."""

    def __init__(self, domain: str, cfg: Config, *, format2: bool, home: tuple[str, str] | None = None) -> None:
        if not is_domain(domain):
            raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
        if home is not None and not format2:
            raise Refused(f"{domain}: a home fragment needs state format 2 (a mailboxes fragment)")
        self.domain = domain
        # (home node, its address) from the domain's validated home fragment (pipull/fleetfiles.py):
        # then every active mailbox's line proxies there and every soft-deleted one has nologin.
        self.home = home
        self.proxy_suffix = f" proxy_maybe=y host={home[1]}" if home else None
        self.root = cfg.mail_root.rstrip("/")
        self.uid = str(cfg.mail_uid)
        self.gid = str(cfg.mail_gid)
        self.format2 = format2
        self.passwd = _Seq(f"passwd of {domain}")
        self.maps = _Seq(f"virtual_mailbox_maps of {domain}")
        self.active = _Seq(f"mailboxes of {domain}")
        self.inactive = _Seq(f"mailboxes of {domain}")
        self.passwd_inactive = _Seq(f"passwd of {domain}")
        self.listed = _Seq(f"mailboxes of {domain}")
        self.vmd_lines = 0
        self.passwd_prefix = f"{self.root}/{domain}/"

    # ---- helpers

    def _text(self, what: str, n: int, line: bytes) -> str:
        if not PRINTABLE_ASCII_RE.fullmatch(line):
            raise Refused(f"{what} of {self.domain}, line {n}: not printable ASCII (control or non-ASCII bytes)")
        return line.decode("ascii")

    def _address(self, what: str, n: int, address: str) -> str:
        local, at, dom = address.rpartition("@")
        if not at or dom != self.domain:
            raise Refused(f"{what} of {self.domain}, line {n}: {address[:80]!r} is not an address in {self.domain}")
        if not is_local_part(local):
            raise Refused(
                f"{what} of {self.domain}, line {n}: bad local part {local[:80]!r} (the server allows a-z 0-9 . _ + -)"
            )
        return local

    def _dir(self, what: str, n: int, local: str, d: str) -> None:
        if self.format2:
            mlocal, sep, mid = d.partition(ID_SEPARATOR)
            if mlocal != local or not sep or not MAILBOX_ID_RE.fullmatch(mid):
                raise Refused(
                    f"{what} of {self.domain}, line {n}: mailbox directory {d[:80]!r} of {local} is not {local}~<id>"
                )
        elif d != local:
            raise Refused(f"{what} of {self.domain}, line {n}: mailbox directory {d[:80]!r} of {local} is not {local}")

    # ---- the four files

    def _fast_dir(self, local: str, d: str) -> bool:
        if self.format2:
            return (
                d[: len(local) + 1] == local + ID_SEPARATOR and MAILBOX_ID_RE.fullmatch(d[len(local) + 1 :]) is not None
            )
        return d == local

    def passwd_line(self, n: int, raw: bytes) -> None:
        try:
            m = _PASSWD_FAST.fullmatch(raw.decode("ascii"))
        except UnicodeDecodeError:
            m = None
        if m is not None:
            local, dom, uid, gid, home, quota, extra = m.groups()
            prefix = self.passwd_prefix
            d = home[len(prefix) :]
            if (
                dom == self.domain
                and uid == self.uid
                and gid == self.gid
                and home.startswith(prefix)
                and self._fast_dir(local, d)
                and int(quota) <= MAX_QUOTA_MB
                and (extra is None) == (self.home is None)
            ):
                if extra is None or extra == self.proxy_suffix:
                    self.passwd.add(local, d)
                    return
                if extra == " nologin=y":
                    self.passwd_inactive.add(local, d)
                    return
        self._passwd_line_slow(n, raw)
        raise Refused(f"passwd of {self.domain}, line {n}: not a line the compiler writes")  # pragma: no cover

    def _passwd_line_slow(self, n: int, raw: bytes) -> None:
        what = "passwd"
        text = self._text(what, n, raw)
        fields = text.split(":")
        if len(fields) < 7:
            raise Refused(
                f"passwd of {self.domain}, line {n}: {len(fields)} fields, expected "
                "user:password:uid:gid::home::userdb_quota_rule=*:storage=<N>M"
            )
        user, password, uid, gid, gecos, home, shell = fields[:7]
        local = self._address(what, n, user)
        if not BCRYPT_RE.fullmatch(password):
            raise Refused(
                f"passwd of {self.domain}, line {n} ({user}): the password is not a {{BLF-CRYPT}}$2b$ bcrypt hash "
                "(plain text and other schemes are refused)"
            )
        if uid != self.uid or gid != self.gid:
            raise Refused(
                f"passwd of {self.domain}, line {n} ({user}): uid/gid {uid[:12]}:{gid[:12]} are not the configured "
                f"[paths] mail_uid/mail_gid {self.uid}:{self.gid}"
            )
        if gecos or shell:
            raise Refused(f"passwd of {self.domain}, line {n} ({user}): gecos and shell must be empty")
        prefix = f"{self.root}/{self.domain}/"
        if not home.startswith(prefix) or "/" in home[len(prefix) :]:
            raise Refused(
                f"passwd of {self.domain}, line {n} ({user}): home {home[:120]!r} is not under "
                f"[paths] mail_root {self.root}/{self.domain}/"
            )
        self._dir(what, n, local, home[len(prefix) :])
        extra = ":".join(fields[7:]).split(" ")
        quota = extra[0].split(":")
        m = QUOTA_RE.fullmatch(quota[1]) if len(quota) == 2 and quota[0] == "userdb_quota_rule=*" else None
        if m is None or int(m.group(1)) > MAX_QUOTA_MB:
            raise Refused(
                f"passwd of {self.domain}, line {n} ({user}): extra fields must be exactly "
                "userdb_quota_rule=*:storage=<N>M (nopassword, userdb_uid, userdb_home, userdb_mail, proxy, host ... "
                "are refused)"
            )
        if self._fleet_fields(n, user, extra[1:]):
            self.passwd.add(local, home[len(prefix) :])
        else:
            self.passwd_inactive.add(local, home[len(prefix) :])

    def _fleet_fields(self, n: int, user: str, fields: list[str]) -> bool:
        """Check the extra fields after the quota rule: True for an active mailbox's line, False for
        a soft-deleted one's (nologin=y); Refused saying what is wrong otherwise."""
        where = f"passwd of {self.domain}, line {n} ({user})"
        if self.home is None:
            if fields:
                raise Refused(
                    f"{where}: {' '.join(fields)[:80]!r}: a domain without a home fragment has no other extra fields "
                    "(nopassword, userdb_uid, userdb_home, userdb_mail, proxy, host ... are refused)"
                )
            return True
        if fields == ["proxy_maybe=y", f"host={self.home[1]}"]:
            return True
        if fields == ["nologin=y"]:
            return False
        hosts = [f[5:] for f in fields if f.startswith("host=")]
        if hosts and hosts[0] != self.home[1]:
            raise Refused(
                f"{where}: host={hosts[0][:80]} is not the address of the domain's home {self.home[0]} "
                "(a node proxies only to its fleet's nodes)"
            )
        raise Refused(
            f"{where}: the extra fields must be exactly 'proxy_maybe=y host={self.home[1]}' (an active mailbox) or "
            "'nologin=y' (a soft-deleted one)"
        )

    def map_line(self, n: int, raw: bytes) -> None:
        try:
            m = _MAP_FAST.fullmatch(raw.decode("ascii"))
        except UnicodeDecodeError:
            m = None
        if m is not None:
            local, dom, vdom, d = m.groups()
            if dom == self.domain and vdom == self.domain and self._fast_dir(local, d):
                self.maps.add(local, d)
                return
        self._map_line_slow(n, raw)
        raise Refused(
            f"virtual_mailbox_maps of {self.domain}, line {n}: not a line the compiler writes"
        )  # pragma: no cover

    def _map_line_slow(self, n: int, raw: bytes) -> None:
        what = "virtual_mailbox_maps"
        text = self._text(what, n, raw)
        parts = text.split(" ")
        if len(parts) != 2:
            raise Refused(f"virtual_mailbox_maps of {self.domain}, line {n}: expected '<address> <domain>/<dir>/'")
        local = self._address(what, n, parts[0])
        value = parts[1]
        prefix = self.domain + "/"
        if not value.startswith(prefix) or not value.endswith("/") or "/" in value[len(prefix) : -1]:
            raise Refused(f"virtual_mailbox_maps of {self.domain}, line {n}: unsafe path {value[:80]!r} for {parts[0]}")
        d = value[len(prefix) : -1]
        self._dir(what, n, local, d)
        self.maps.add(local, d)

    def domains_line(self, n: int, raw: bytes) -> None:
        if raw != f"{self.domain} OK".encode() or n != 1:
            raise Refused(f"virtual_mailbox_domains of {self.domain} must be exactly one line '{self.domain} OK'")
        self.vmd_lines += 1

    def mailboxes_line(self, n: int, raw: bytes) -> None:
        try:
            m = _MAILBOXES_FAST.fullmatch(raw.decode("ascii"))
        except UnicodeDecodeError:
            m = None
        if m is None:
            self._mailboxes_line_slow(n, raw)
            raise Refused(f"mailboxes of {self.domain}, line {n}: not a line the compiler writes")  # pragma: no cover
        local, mid, state = m.groups()
        self.listed.add(local, mid)
        if state == "active":
            self.active.add(local, local + ID_SEPARATOR + mid)
        else:
            self.inactive.add(local, local + ID_SEPARATOR + mid)

    def _mailboxes_line_slow(self, n: int, raw: bytes) -> None:
        what = "mailboxes"
        text = self._text(what, n, raw)
        parts = text.split(" ")
        if (
            len(parts) != 3
            or not is_local_part(parts[0])
            or not MAILBOX_ID_RE.fullmatch(parts[1])
            or parts[2] not in ("active", "inactive")
        ):
            raise Refused(
                f"mailboxes of {self.domain}, line {n}: expected '<local> <yyyymmdd-xxxxxx> <active|inactive>'"
            )
        self.listed.add(parts[0], parts[1])
        if parts[2] == "active":
            self.active.add(parts[0], parts[0] + ID_SEPARATOR + parts[1])
        else:
            self.inactive.add(parts[0], parts[0] + ID_SEPARATOR + parts[1])

    def finish(self) -> int:
        """Cross-file checks once every file was fed; returns the mailbox (login) count."""
        if self.vmd_lines != 1:
            raise Refused(f"virtual_mailbox_domains of {self.domain} must be exactly one line '{self.domain} OK'")
        if (self.passwd.count, self.passwd.digest.digest()) != (self.maps.count, self.maps.digest.digest()):
            raise Refused(
                f"passwd of {self.domain} and virtual_mailbox_maps of {self.domain} disagree ({self.passwd.count} vs "
                f"{self.maps.count} "
                "entries, or different mailboxes)"
            )
        if self.format2 and (self.passwd.count, self.passwd.digest.digest()) != (
            self.active.count,
            self.active.digest.digest(),
        ):
            raise Refused(
                f"mailboxes of {self.domain}: its active lines disagree with passwd ({self.active.count} vs "
                f"{self.passwd.count} entries, or other ids)"
            )
        if self.home is not None and (self.passwd_inactive.count, self.passwd_inactive.digest.digest()) != (
            self.inactive.count,
            self.inactive.digest.digest(),
        ):
            raise Refused(
                f"mailboxes of {self.domain}: its inactive lines disagree with the nologin lines of passwd "
                f"({self.inactive.count} vs {self.passwd_inactive.count} entries, or other ids)"
            )
        return self.passwd.count


def feed(check: DomainCheck, fname: str, chunks: Iterable[bytes]) -> None:
    """Feed one file's content (any chunking) to ``check``."""
    method = {
        "passwd": check.passwd_line,
        "virtual_mailbox_maps": check.map_line,
        "virtual_mailbox_domains": check.domains_line,
        "mailboxes": check.mailboxes_line,
    }[fname]
    if isinstance(chunks, tuple) and len(chunks) == 1:
        # The whole file at once (a first apply's many small blobs): the same checks in the same
        # order as LineSplitter's (over-long lines, then each line, then the final newline).
        lines = chunks[0].split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE_BYTES or any(len(line) > MAX_LINE_BYTES for line in lines):
            raise Refused(f"{fname} of {check.domain}: a line is longer than {MAX_LINE_BYTES} bytes")
        for i, line in enumerate(lines, 1):
            method(i, line)
        if rest:
            raise Refused(f"{fname} of {check.domain}: the last line does not end with a newline")
        return
    splitter = LineSplitter(f"{fname} of {check.domain}")
    for chunk in chunks:
        start = splitter.count
        for i, line in enumerate(splitter.feed(chunk)):
            method(start + i + 1, line)
    splitter.close()


def validate_domain(
    domain: str, cfg: Config, passwd: bytes, vmm: bytes, vmd: bytes, mailboxes: bytes | None = None
) -> int:
    """Validate one domain's rendered fragments given as bytes; returns the mailbox count.

    Raises Refused with a one-line reason on anything the compiler would not have written.
    """
    check = DomainCheck(domain, cfg, format2=mailboxes is not None)
    for fname, data in (
        ("passwd", passwd),
        ("virtual_mailbox_maps", vmm),
        ("virtual_mailbox_domains", vmd),
        ("mailboxes", mailboxes),
    ):
        if data is not None:
            feed(check, fname, (data,))
    return check.finish()
