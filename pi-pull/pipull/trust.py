"""Server signing-key rotation on the node: learning a new server key from its predecessor's word.

When a server rotates its key (``mailstate key rotate``), the OLD key signs an endorsement of
the new one, and every statement the server writes from then on carries the endorsements
(oldest first, ``Key-Endorsement:`` lines, see statement.py), so a node that was offline at
the moment still follows the chain A -> B -> C. An endorsement (SSHSIG, namespace ``git``:
never valid as a commit or statement signature) is::

    mailstate key endorsement 1
    Old-Key: ssh-ed25519 <base64>
    New-Key: ssh-ed25519 <base64>
    Issued-At: <unix seconds>
    -----BEGIN SSH SIGNATURE-----   (by Old-Key)

A node takes an endorsement only when Old-Key signed it, Old-Key is a server key
(principal ``mailstate``) of its trust NOW (a retired key endorses nothing, so a stolen old
key cannot fork the chain), and New-Key is not known yet. It then learns New-Key as a server
key and retires Old-Key at the endorsement's Issued-At (``valid-before``): commits the old key
signed before the rotation still verify (at their committer time), nothing it signs after.

What was learned is kept in ``<root>/trust.json`` (atomic writes, across restarts); the file
ssh-keygen checks against is then ``<root>/allowed_signers.effective``: the provisioned
allowed_signers (never modified) with retired keys given ``valid-before``, plus the learned
keys. Without learned keys the provisioned file is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .chain import signature_key, signers_by_key
from .config import Config
from .errors import Refused, TickError
from .fsutil import atomic_write
from .rules import is_key_type, split_signers_line
from .runner import Runner, short
from .statement import PRINCIPAL, Statement

# The "git" namespace: allowed_signers lines say namespaces="git", so any other namespace fails
# them. The payload keeps it apart: it parses as neither a commit nor a tag, so its signature
# can never pass for one.
NAMESPACE = "git"
TRUST_FORMAT = 1
_ENDORSEMENT = re.compile(
    rb"mailstate key endorsement 1\n"
    rb"Old-Key: (?P<old>ssh-ed25519 [A-Za-z0-9+/]{4,200}={0,2})\n"
    rb"New-Key: (?P<new>ssh-ed25519 [A-Za-z0-9+/]{4,200}={0,2})\n"
    rb"Issued-At: (?P<issued>0|[1-9][0-9]{0,11})\n"
)
_ARMOR = re.compile(rb"-----BEGIN SSH SIGNATURE-----\n[A-Za-z0-9+/=\n]+-----END SSH SIGNATURE-----\n")


@dataclass(frozen=True)
class Endorsement:
    """``old_key`` vouches for ``new_key`` (both ``ssh-ed25519 <base64>``) from ``issued_at`` on."""

    old_key: str
    new_key: str
    issued_at: int
    payload: bytes
    signature: bytes

    @property
    def old_b64(self) -> str:
        return self.old_key.split()[1]

    @property
    def new_b64(self) -> str:
        return self.new_key.split()[1]


def parse_endorsement(raw: bytes) -> Endorsement:
    """Check an endorsement field by field (no signature check); Refused when malformed."""
    cut = raw.find(b"-----BEGIN SSH SIGNATURE-----\n")
    payload, signature = (raw[:cut], raw[cut:]) if cut > 0 else (raw, b"")
    m = _ENDORSEMENT.fullmatch(payload)
    if m is None or not _ARMOR.fullmatch(signature):
        raise Refused("a Key-Endorsement of the accepted-head statement is not in format 1")
    return Endorsement(
        old_key=m.group("old").decode(),
        new_key=m.group("new").decode(),
        issued_at=int(m.group("issued")),
        payload=payload,
        signature=signature,
    )


def valid_before(ts: int) -> str:
    """An allowed_signers ``valid-before`` timestamp (UTC)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(ts)) + "Z"


def effective_signers(provisioned: str, data: dict[str, Any]) -> str:
    """The provisioned allowed_signers text with retired keys given ``valid-before``, plus the learned keys."""
    retired: dict[str, int] = data.get("retired", {})
    out: list[str] = []
    for line in provisioned.splitlines():
        fields = split_signers_line(line)
        has_options = len(fields) >= 2 and not is_key_type(fields[1])
        if len(fields) < (4 if has_options else 3):
            out.append(line)
            continue
        key = fields[3] if has_options else fields[2]
        if key in retired:
            fields = _retire(fields, has_options, retired[key])
        out.append(" ".join(fields))
    for entry in data.get("learned", []):
        kt, b64 = str(entry["key"]).split()[:2]
        options = 'namespaces="git"'
        if b64 in retired:
            options += f',valid-before="{valid_before(retired[b64])}"'
        out.append(f"{PRINCIPAL} {options} {kt} {b64} learned-from-endorsement")
    return "\n".join(out) + "\n"


def _retire(fields: list[str], has_options: bool, ts: int) -> list[str]:
    option = f'valid-before="{valid_before(ts)}"'
    if not has_options:
        return [fields[0], option, *fields[1:]]
    if "valid-before=" in fields[1]:
        return fields  # the provisioned limit stays (retiring a key twice changes nothing)
    return [fields[0], fields[1] + "," + option, *fields[2:]]


class Trust:
    """The node's server keys beyond the provisioned ones (see the module docstring)."""

    def __init__(self, cfg: Config, runner: Runner, log: logging.Logger) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.path = os.path.join(cfg.root, "trust.json")
        self.effective = os.path.join(cfg.root, "allowed_signers.effective")

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {"format": TRUST_FORMAT, "learned": [], "retired": {}}
        except (OSError, ValueError) as e:
            raise TickError(f"cannot read {self.path}: {e} (remove it to trust only the provisioned keys)") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("learned"), list)
            or not isinstance(data.get("retired"), dict)
        ):
            raise TickError(f"{self.path} is not a pi-pull trust file (remove it to trust only the provisioned keys)")
        return data

    def _provisioned(self) -> str:
        try:
            with open(self.cfg.allowed_signers, encoding="utf-8", errors="replace") as fh:
                return fh.read(4 << 20)
        except OSError as e:
            raise TickError(f"cannot read allowed_signers {self.cfg.allowed_signers}: {e.strerror or e}") from None

    def signers_file(self, data: dict[str, Any] | None = None) -> str:
        """The allowed_signers file to verify against: the provisioned one, or the effective one."""
        data = self.load() if data is None else data
        if not data.get("learned") and not data.get("retired"):
            return self.cfg.allowed_signers
        return self._render_to(data, self.effective)

    def candidate(self, data: dict[str, Any]) -> str:
        """The effective file for trust data not saved yet (a statement is verified against it first)."""
        return self._render_to(data, self.effective + ".candidate")

    def _render_to(self, data: dict[str, Any], path: str) -> str:
        text = effective_signers(self._provisioned(), data).encode()
        try:
            with open(path, "rb") as fh:
                if fh.read() == text:
                    return path
        except OSError:
            pass
        atomic_write(path, text, 0o644)
        return path

    def follow(self, st: Statement, now: float, clock_skew: float) -> dict[str, Any] | None:
        """Take the statement's endorsements the node does not know yet; the new trust data
        (not saved: ``save()`` once the statement verified), or None when nothing changed."""
        if not st.endorsements:
            return None
        data = self.load()
        changed = False
        for raw in st.endorsements:
            e = parse_endorsement(raw)
            signers = self.candidate(data) if changed else self.signers_file(data)
            known = signers_by_key(signers)
            if e.issued_at > now + clock_skew:
                raise Refused(f"a Key-Endorsement is dated {e.issued_at - int(now)} s in the future")
            if PRINCIPAL in _principals(known.get(e.new_b64, [])) and e.new_b64 not in data["retired"]:
                continue  # known already (provisioned, or learned on an earlier tick)
            if e.old_b64 in data["retired"] or signature_key(e.signature) != e.old_b64:
                self.log.warning("ignoring a Key-Endorsement not signed by a current server key")
                continue
            reason = self._verify(e, signers)
            if reason is not None:
                self.log.warning(f"ignoring a Key-Endorsement of {e.new_key[:40]}...: {reason}")
                continue
            data["learned"].append({"key": e.new_key, "endorsed_by": e.old_key, "issued_at": e.issued_at})
            data["retired"][e.old_b64] = e.issued_at
            changed = True
            self.log.info(
                f"learned server key {e.new_key[:40]}... (endorsed by the retiring {e.old_key[:40]}..., "
                f"valid until {valid_before(e.issued_at)})"
            )
        return data if changed else None

    def _verify(self, e: Endorsement, signers: str) -> str | None:
        with tempfile.TemporaryDirectory(prefix="pi-pull-endorsement-") as tmp:
            sig = os.path.join(tmp, "endorsement.sig")
            with open(sig, "wb") as fh:
                fh.write(e.signature)
            argv = [self.cfg.ssh_keygen, "-Y", "verify", "-f", signers, "-I", PRINCIPAL, "-n", NAMESPACE, "-s", sig]
            if self.cfg.revoked_signers:
                argv += ["-r", self.cfg.revoked_signers]
            r = self.runner.run(argv, input=e.payload, timeout=60)
        if r.returncode == 0:
            return None
        return short(r.stderr + r.stdout, 200) or f"rc={r.returncode}"

    def save(self, data: dict[str, Any]) -> None:
        """Keep what was learned (atomic: a crash leaves the old file or the new one)."""
        atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o644)
        self.signers_file(data)


def _principals(fields: list[str]) -> set[str]:
    return {p for f in fields for p in f.split(",")}
