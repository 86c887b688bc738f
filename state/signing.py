"""Commit signers: SSH signatures in the format `git verify-commit` checks (SSHSIG).

A signer turns the commit's raw text into an armored signature for its `gpgsig` header.

* `Ed25519Signer` signs in process with the `cryptography` package (~0.1 ms).
* `SshKeygenSigner` shells out to `ssh-keygen -Y sign` (~6 ms), the reference
  implementation; tests check that both verify with `git verify-commit`.

The SSHSIG wire format is PROTOCOL.sshsig in OpenSSH: the signature covers
"SSHSIG" ‖ string(namespace) ‖ string(reserved) ‖ string(hash_alg) ‖ string(H(message)).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mailstate.state.errors import StoreError

NAMESPACE = "git"
PRINCIPAL = "mailstate"


class Signer(Protocol):
    """Anything that signs a commit buffer for git."""

    def sign(self, payload: bytes) -> str:
        """Armored SSH signature of `payload`."""
        ...


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _armor(blob: bytes) -> str:
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"


class Ed25519Signer:
    """In-process SSHSIG signer for an OpenSSH ed25519 private key file."""

    def __init__(self, key_path: Path | str) -> None:
        try:
            key = serialization.load_ssh_private_key(Path(key_path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise StoreError(f"Cannot load the signing key {key_path}.") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise StoreError(f"The signing key {key_path} is not an ed25519 key.")
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public_blob = _string(b"ssh-ed25519") + _string(raw)

    def sign(self, payload: bytes) -> str:
        digest = hashlib.sha512(payload).digest()
        signed = b"SSHSIG" + _string(NAMESPACE.encode()) + _string(b"") + _string(b"sha512") + _string(digest)
        raw_sig = self._key.sign(signed)
        sig = _string(b"ssh-ed25519") + _string(raw_sig)
        blob = (
            b"SSHSIG"
            + (1).to_bytes(4, "big")
            + _string(self._public_blob)
            + _string(NAMESPACE.encode())
            + _string(b"")
            + _string(b"sha512")
            + _string(sig)
        )
        return _armor(blob)


class SshKeygenSigner:
    """Signs with `ssh-keygen -Y sign`, exactly as `git commit -S` does with gpg.format=ssh."""

    def __init__(self, key_path: Path | str) -> None:
        self.key_path = str(key_path)

    def sign(self, payload: bytes) -> str:
        with tempfile.TemporaryDirectory(prefix="mailstate-sign-") as tmp:
            data = Path(tmp) / "commit"
            data.write_bytes(payload)
            try:
                subprocess.run(
                    ["ssh-keygen", "-Y", "sign", "-n", NAMESPACE, "-f", self.key_path, str(data)],
                    check=True,
                    capture_output=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                raise StoreError("ssh-keygen could not sign the commit.") from exc
            return (Path(tmp) / "commit.sig").read_text()


def generate_key(path: Path, comment: str = PRINCIPAL) -> str:
    """Create an ed25519 key pair with ssh-keygen at `path`; return the public key line."""
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StoreError("ssh-keygen could not create the signing key.") from exc
    path.chmod(0o600)
    return Path(f"{path}.pub").read_text().strip()


def allowed_signers_line(public_key: str, principal: str = PRINCIPAL) -> str:
    """One allowed_signers line trusting `public_key` for git signatures."""
    keytype, b64 = public_key.split()[:2]
    return f'{principal} namespaces="{NAMESPACE}" {keytype} {b64}\n'
