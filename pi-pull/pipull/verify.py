"""Trust checks: the commit's SSH signature (local allowed_signers only) and rendered content."""

from __future__ import annotations

import os
import posixpath
import re

from .config import Config
from .errors import Refused, TickError
from .mirror import Mirror
from .runner import short

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)" + _LABEL + r"(?:\." + _LABEL + r")+$")
LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
CONTROL_EXCEPT_NL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
WS_RE = re.compile(r"\s")


def verify_commit(mirror: Mirror, cfg: Config, sha: str) -> None:
    """``git verify-commit`` against the node's own allowed_signers; Refused with the reason."""
    if not os.path.isfile(cfg.allowed_signers) or os.path.getsize(cfg.allowed_signers) == 0:
        raise TickError(f"allowed_signers {cfg.allowed_signers} is missing or empty; refusing to trust anything")
    args = ["-c", "gpg.ssh.allowedSignersFile=" + cfg.allowed_signers,
            "-c", "gpg.ssh.program=" + cfg.ssh_keygen]
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


def _lines(domain: str, data: bytes, what: str) -> list[str]:
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(f"{what} of {domain} is not UTF-8") from None
    if CONTROL_EXCEPT_NL_RE.search(s):
        raise Refused(f"{what} of {domain} contains control characters")
    return [line for line in s.split("\n") if line != ""]


def _address_ok(address: str, suffix: str) -> bool:
    return address.endswith(suffix) and bool(LOCAL_RE.match(address[: -len(suffix)]))


def _map_users(domain: str, vmm: bytes) -> set[str]:
    suffix = "@" + domain
    users: set[str] = set()
    for line in _lines(domain, vmm, "virtual_mailbox_maps"):
        parts = line.split()
        if len(parts) != 2:
            raise Refused(f"virtual_mailbox_maps of {domain}: malformed line {line[:80]!r}")
        key, value = parts
        if not _address_ok(key, suffix):
            raise Refused(f"virtual_mailbox_maps of {domain}: bad address {key[:80]!r}")
        if value.startswith("/") or ".." in value.split("/"):
            raise Refused(f"virtual_mailbox_maps of {domain}: unsafe path {value[:80]!r}")
        if key in users:
            raise Refused(f"virtual_mailbox_maps of {domain}: duplicate {key}")
        users.add(key)
    return users


def _passwd_user(domain: str, line: str, mail_root: str, seen: set[str]) -> str:
    """Check one passwd-file line; return its user (not yet in ``seen``)."""
    fields = line.split(":", 7)
    if len(fields) < 7:
        raise Refused(f"passwd of {domain}: line has {len(fields)} fields, expected at least 7")
    user, password, uid, gid, gecos, home, shell = fields[:7]
    extra = fields[7] if len(fields) > 7 else ""
    if not _address_ok(user, "@" + domain):
        raise Refused(f"passwd of {domain}: bad user {user[:80]!r}")
    if user in seen:
        raise Refused(f"passwd of {domain}: duplicate user {user}")
    if not password or WS_RE.search(password):
        raise Refused(f"passwd of {domain}: bad password field for {user}")
    if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0 or int(gid) == 0:
        raise Refused(f"passwd of {domain}: uid/gid for {user} must be non-zero numbers")
    if (not home.startswith("/") or posixpath.normpath(home) != home or home == "/"
            or ".." in home.split("/") or WS_RE.search(home)):
        raise Refused(f"passwd of {domain}: unsafe home {home[:80]!r} for {user}")
    if mail_root and not home.startswith(mail_root.rstrip("/") + "/"):
        raise Refused(f"passwd of {domain}: home of {user} is outside mail_root {mail_root}")
    if shell or gecos:
        raise Refused(f"passwd of {domain}: gecos/shell must be empty for {user}")
    for item in extra.split():
        if "=" not in item:
            raise Refused(f"passwd of {domain}: bad extra field {item[:80]!r} for {user}")
    return user


def validate_domain(domain: str, passwd: bytes, vmm: bytes, vmd: bytes, mail_root: str = "") -> int:
    """Validate one domain's rendered fragments. Returns the mailbox count.

    Raises Refused with a one-line reason on anything unexpected.
    """
    if not DOMAIN_RE.match(domain):
        raise Refused(f"unsafe domain name {domain!r} in rendered/")
    vmd_lines = _lines(domain, vmd, "virtual_mailbox_domains")
    if len(vmd_lines) != 1 or len(vmd_lines[0].split()) != 2 or vmd_lines[0].split()[0] != domain:
        raise Refused(f"virtual_mailbox_domains of {domain} must be exactly one line '{domain} OK'")
    map_users = _map_users(domain, vmm)
    pw_users: set[str] = set()
    for line in _lines(domain, passwd, "passwd"):
        pw_users.add(_passwd_user(domain, line, mail_root, pw_users))
    if pw_users != map_users:
        diff = sorted(pw_users ^ map_users)
        raise Refused(f"{domain}: passwd and virtual_mailbox_maps disagree (e.g. {diff[0]})")
    return len(pw_users)
