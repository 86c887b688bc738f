"""Server signing-key rotation without re-provisioning nodes: the old key vouches for the new one.

`mailstate key rotate --data DIR` (rotate_key below):

1. makes a new ed25519 key (DIR/signing_key.next, then DIR/signing_key);
2. has the OLD key sign an endorsement of it (SSHSIG, namespace `git`; its text is neither a
   commit nor a tag, so its signature passes for neither):

       mailstate key endorsement 1
       Old-Key: ssh-ed25519 <base64>
       New-Key: ssh-ed25519 <base64>
       Issued-At: <unix seconds>
       -----BEGIN SSH SIGNATURE-----   (by Old-Key)

   and appends it (base64, one a line) to DIR/key_endorsements;
3. retires the old key in DIR/allowed_signers with `valid-before=<Issued-At>` (commits it
   signed before still verify at their committer time; nothing it signs after does) and adds
   the new key's line; the old private key moves to DIR/retired_keys/.

Every statement the server signs from then on carries the endorsements (the last
MAX_ENDORSEMENTS, oldest first: `Key-Endorsement:` lines, state/statement.py), so a node that
missed the moment still follows A -> B -> C (pi-pull/pipull/trust.py): it checks each
endorsement with the key it trusts, learns the new key into its own trust file and retires
the old one the same way. A running server picks the new key up at its next signature
(DataDirSigner re-reads the key file when it changed): no restart, no node touched by hand.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from mailstate.state.chain import signature_key, signers_by_key
from mailstate.state.errors import StoreError
from mailstate.state.signers import is_key_type, split_signers_line
from mailstate.state.signing import PRINCIPAL, Ed25519Signer, allowed_signers_line, generate_key
from mailstate.state.statement import MAX_ENDORSEMENTS

# The "git" namespace: allowed_signers lines say namespaces="git", so any other namespace fails
# them. The payload keeps it apart: it parses as neither a commit nor a tag, so its signature
# can never pass for one.
NAMESPACE = "git"
ENDORSEMENTS_FILE = "key_endorsements"
RETIRED_DIR = "retired_keys"


def endorsement_payload(old_key: str, new_key: str, issued_at: int) -> bytes:
    """The text the old key signs: `old_key` vouches for `new_key` (both `ssh-ed25519 <base64>`)."""
    for key in (old_key, new_key):
        if not re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/]+=*", key):
            raise StoreError(f"{key[:40]!r} is not an ssh-ed25519 public key.")
    return f"mailstate key endorsement 1\nOld-Key: {old_key}\nNew-Key: {new_key}\nIssued-At: {issued_at}\n".encode()


def sign_endorsement(old_private: Path, payload: bytes) -> bytes:
    """`payload` plus the old key's SSHSIG signature in namespace `git` (ssh-keygen -Y sign)."""
    with tempfile.TemporaryDirectory(prefix="mailstate-endorse-") as tmp:
        data = Path(tmp) / "endorsement"
        data.write_bytes(payload)
        try:
            subprocess.run(
                ["ssh-keygen", "-Y", "sign", "-n", NAMESPACE, "-f", str(old_private), str(data)],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise StoreError("ssh-keygen could not sign the key endorsement.") from exc
        return payload + (Path(tmp) / "endorsement.sig").read_bytes()


def public_key(pub_path: Path) -> str:
    """`ssh-ed25519 <base64>` of a .pub file (its comment dropped)."""
    return " ".join(pub_path.read_text().split()[:2])


def read_endorsements(root: Path) -> tuple[bytes, ...]:
    """The data dir's endorsements, oldest first (the last MAX_ENDORSEMENTS)."""
    try:
        lines = (root / ENDORSEMENTS_FILE).read_text().split()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise StoreError(f"Cannot read {root / ENDORSEMENTS_FILE}.") from exc
    return tuple(base64.b64decode(line) for line in lines[-MAX_ENDORSEMENTS:])


def valid_before(ts: int) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(ts)) + "Z"


def retire_in_signers(text: str, key_b64: str, ts: int) -> str:
    """allowed_signers text with every line of `key_b64` given `valid-before=<ts>` (unless it has one)."""
    out = []
    for line in text.splitlines():
        fields = split_signers_line(line)
        has_options = len(fields) >= 2 and not is_key_type(fields[1])
        if len(fields) >= (4 if has_options else 3):
            if (fields[3] if has_options else fields[2]) == key_b64:
                option = f'valid-before="{valid_before(ts)}"'
                if not has_options:
                    fields = [fields[0], option, *fields[1:]]
                elif "valid-before=" not in fields[1]:
                    fields = [fields[0], fields[1] + "," + option, *fields[2:]]
                line = " ".join(fields)
        out.append(line)
    return "\n".join(out) + "\n"


def _write(path: Path, data: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def rotate_key(root: Path, *, now: int | None = None) -> tuple[str, str]:
    """Rotate the data dir's signing key (see the module docstring); (old, new) public keys.

    Order, so that a crash leaves something a re-run finishes and nothing signed is refused:
    the new key joins allowed_signers first, then the endorsement is written, then the key
    files move, and the old key is retired last (a re-run finds signing_key.next and the
    endorsement naming it, and completes)."""
    key = root / "signing_key"
    nxt = root / "signing_key.next"
    signers = root / "allowed_signers"
    if not key.exists():
        raise StoreError(f"{root} has no signing key; is it a mailstate data dir?", code="not_initialised")
    issued = int(time.time()) if now is None else now
    old_pub = public_key(Path(f"{key}.pub"))
    if nxt.exists() and Path(f"{nxt}.pub").exists():
        new_pub = public_key(Path(f"{nxt}.pub"))  # an interrupted rotation: finish it
    else:
        for stale in (nxt, Path(f"{nxt}.pub")):
            stale.unlink(missing_ok=True)
        new_pub = " ".join(generate_key(nxt).split()[:2])
    Ed25519Signer(nxt)  # loads: the new key is usable before anything depends on it
    text = signers.read_text()
    if new_pub.split()[1] not in text:
        _write(signers, text.rstrip("\n") + "\n" + allowed_signers_line(new_pub, PRINCIPAL))
    existing = read_endorsements(root)
    if not any(f"New-Key: {new_pub}\n".encode() in e for e in existing):
        raw = sign_endorsement(key, endorsement_payload(old_pub, new_pub, issued))
        with open(root / ENDORSEMENTS_FILE, "a") as fh:
            fh.write(base64.b64encode(raw).decode() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    retired = root / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(issued))
    os.replace(key, retired / f"signing_key-{stamp}")
    os.replace(Path(f"{key}.pub"), retired / f"signing_key-{stamp}.pub")
    os.replace(Path(f"{nxt}.pub"), Path(f"{key}.pub"))
    os.replace(nxt, key)
    _write(signers, retire_in_signers(signers.read_text(), old_pub.split()[1], issued))
    return old_pub, new_pub


class DataDirSigner:
    """The data dir's signer: signs with DIR/signing_key, re-read when the file changed (a
    rotation while the server runs), and hands the endorsements to the statements it signs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._stamp: tuple[int, int] | None = None
        self._signer: Ed25519Signer | None = None
        self._endorsements: tuple[bytes, ...] = ()
        self._reload()

    def _reload(self) -> Ed25519Signer:
        key = self.root / "signing_key"
        try:
            st = key.stat()
        except OSError as exc:
            raise StoreError(f"Cannot read the signing key {key}.") from exc
        stamp = (st.st_ino, st.st_mtime_ns)
        if self._signer is None or stamp != self._stamp:
            self._signer = Ed25519Signer(key)
            self._endorsements = read_endorsements(self.root)
            self._stamp = stamp
        return self._signer

    def sign(self, payload: bytes) -> str:
        return self._reload().sign(payload)

    def endorsements(self) -> tuple[bytes, ...]:
        """The endorsements to carry in statements (oldest first)."""
        self._reload()
        return self._endorsements


_ENDORSEMENT = re.compile(
    rb"mailstate key endorsement 1\n"
    rb"Old-Key: (?P<old>ssh-ed25519 [A-Za-z0-9+/]{4,200}={0,2})\n"
    rb"New-Key: (?P<new>ssh-ed25519 [A-Za-z0-9+/]{4,200}={0,2})\n"
    rb"Issued-At: (?P<issued>0|[1-9][0-9]{0,11})\n"
)


def learn_endorsements(allowed_signers: Path, endorsements: tuple[bytes, ...]) -> list[str]:
    """Another server rotated its key: follow its endorsements into `allowed_signers`, as a node does.

    An endorsement counts only when its Old-Key is a server key (principal `mailstate`) that
    `allowed_signers` trusts NOW and that signed it (`ssh-keygen -Y verify` at the current time,
    so a key already retired with valid-before endorses nothing) and its New-Key is not trusted
    yet. Then New-Key is added and Old-Key retired at the endorsement's Issued-At. Returns the
    keys learned (their `ssh-ed25519 <base64>`)."""
    learned: list[str] = []
    for raw in endorsements:
        cut = raw.find(b"-----BEGIN SSH SIGNATURE-----\n")
        m = _ENDORSEMENT.fullmatch(raw[:cut]) if cut > 0 else None
        if m is None:
            continue
        old, new, issued = m["old"].decode(), m["new"].decode(), int(m["issued"])
        known = signers_by_key(allowed_signers)
        if (
            any(PRINCIPAL in f.split(",") for f in known.get(new.split()[1], []))
            or signature_key(raw[cut:]) != old.split()[1]
        ):
            continue
        with tempfile.TemporaryDirectory(prefix="mailstate-endorsement-") as tmp:
            sig = Path(tmp) / "endorsement.sig"
            sig.write_bytes(raw[cut:])
            try:
                proc = subprocess.run(
                    ["ssh-keygen", "-Y", "verify", "-f", os.path.abspath(allowed_signers), "-I", PRINCIPAL, "-n", NAMESPACE, "-s", str(sig)],
                    input=raw[:cut], capture_output=True, timeout=30,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise StoreError("ssh-keygen could not check a key endorsement.") from exc
        if proc.returncode != 0:
            continue
        text = allowed_signers.read_text()
        _write(allowed_signers, text.rstrip("\n") + "\n" + allowed_signers_line(new, PRINCIPAL))
        _write(allowed_signers, retire_in_signers(allowed_signers.read_text(), old.split()[1], issued))
        learned.append(new)
    return learned
