"""The accepted-head statement (format 1): "a mailstate server accepted commit X".

A node applies only commits a server validated. The server says which with an annotated tag
object at ``refs/mailstate/accepted``, SSH-signed (namespace ``git``) by a SERVER key, in
exactly the form ``git tag -s`` writes with gpg.format=ssh (the server's state/statement.py
writes it; docs/security.md)::

    object <sha>
    type commit
    tag mailstate-accepted
    tagger mailstate <mailstate@localhost> <unix-seconds> +0000

    mailstate accepted head <sha12>

    Accepted-Head: <sha>
    Issued-At: <unix-seconds>
    Key-Endorsement: <base64>        (0 to 8 lines, after a server key rotation: pipull/trust.py)
    -----BEGIN SSH SIGNATURE-----
    ...

The node checks it with ``ssh-keygen -Y verify -f <its own allowed_signers> -I mailstate -n
git``: only keys whose principal is ``mailstate`` (server keys) pass; an admin key that may
sign commits cannot sign a statement.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from dataclasses import dataclass

from .config import Config
from .errors import Refused, TickError
from .runner import Runner, short

REMOTE_REF = "refs/mailstate/accepted"
PRINCIPAL = "mailstate"
NAMESPACE = "git"
TAG_NAME = "mailstate-accepted"
TAGGER = "mailstate <mailstate@localhost>"
MAX_STATEMENT_BYTES = 8192
SIG_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"

_PAYLOAD = re.compile(
    rb"object (?P<object>[0-9a-f]{40})\n"
    rb"type commit\n"
    rb"tag " + TAG_NAME.encode() + rb"\n"
    rb"tagger " + re.escape(TAGGER.encode()) + rb" (?P<tagged>0|[1-9][0-9]{0,11}) \+0000\n"
    rb"\n"
    rb"mailstate accepted head (?P<short>[0-9a-f]{12})\n"
    rb"\n"
    rb"Accepted-Head: (?P<head>[0-9a-f]{40})\n"
    rb"Issued-At: (?P<issued>0|[1-9][0-9]{0,11})\n"
    rb"(?P<endorsements>(?:Key-Endorsement: [A-Za-z0-9+/]{4,4096}={0,2}\n){0,8})"
)
_ARMOR = re.compile(rb"-----BEGIN SSH SIGNATURE-----\n[A-Za-z0-9+/=\n]+-----END SSH SIGNATURE-----\n")


@dataclass(frozen=True)
class Statement:
    """A parsed statement: the tag object's id, the accepted head and when it was issued."""

    tag: str
    head: str
    issued_at: int
    payload: bytes
    signature: bytes
    # Server key rotation: each an old server key's signed word for its successor (pipull/trust.py).
    endorsements: tuple[bytes, ...] = ()


def parse_statement(tag: str, raw: bytes) -> Statement:
    """Check the raw tag object field by field (no signature check yet); Refused on anything else."""
    if len(raw) > MAX_STATEMENT_BYTES:
        raise Refused(f"the accepted-head statement {tag[:12]} is larger than {MAX_STATEMENT_BYTES} bytes")
    cut = raw.rfind(SIG_BEGIN)
    if cut <= 0 or raw[cut - 1 : cut] != b"\n":
        raise Refused(f"the accepted-head statement {tag[:12]} carries no SSH signature")
    payload, signature = raw[:cut], raw[cut:]
    m = _PAYLOAD.fullmatch(payload)
    if m is None:
        raise Refused(f"the accepted-head statement {tag[:12]} is not in format 1")
    if not _ARMOR.fullmatch(signature):
        raise Refused(f"the accepted-head statement {tag[:12]} has a malformed signature")
    head = m.group("head").decode()
    if (
        m.group("object").decode() != head
        or not head.startswith(m.group("short").decode())
        or m.group("tagged") != m.group("issued")
    ):
        raise Refused(f"the accepted-head statement {tag[:12]}: its fields disagree (object, Accepted-Head, Issued-At)")
    try:
        endorsements = tuple(
            base64.b64decode(line.split(b": ", 1)[1], validate=True) for line in m.group("endorsements").splitlines()
        )
    except (binascii.Error, ValueError):
        raise Refused(f"the accepted-head statement {tag[:12]} carries a malformed Key-Endorsement") from None
    return Statement(
        tag=tag,
        head=head,
        issued_at=int(m.group("issued")),
        payload=payload,
        signature=signature,
        endorsements=endorsements,
    )


def verify_statement(runner: Runner, cfg: Config, st: Statement, signers: str | None = None) -> None:
    """``ssh-keygen -Y verify -I mailstate`` against the node's allowed_signers (or ``signers``,
    the file with the keys learned from endorsements); Refused unless a server key signed it."""
    with tempfile.TemporaryDirectory(prefix="pi-pull-statement-") as tmp:
        sig = os.path.join(tmp, "statement.sig")
        with open(sig, "wb") as fh:
            fh.write(st.signature)
        argv = [
            cfg.ssh_keygen,
            "-Y",
            "verify",
            "-f",
            signers or cfg.allowed_signers,
            "-I",
            PRINCIPAL,
            "-n",
            NAMESPACE,
            "-s",
            sig,
        ]
        if cfg.revoked_signers:
            argv += ["-r", cfg.revoked_signers]
        r = runner.run(argv, input=st.payload, timeout=60)
    if r.returncode == 127:
        raise TickError(f"cannot check the accepted-head statement: {short(r.stderr)}")
    if r.returncode != 0:
        detail = short(r.stderr + r.stdout, 200) or f"rc={r.returncode}"
        raise Refused(
            f"the accepted-head statement {st.tag[:12]} is not signed by a server key "
            f"(principal {PRINCIPAL} in allowed_signers): {detail}"
        )
