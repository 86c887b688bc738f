"""Accepted-head statements (format 1): "the server accepted commit X", signed by a server key.

A node must apply only commits a server validated. A commit that reaches state.git or the git
host by another road (an admin push, a hand-edited file) may be signed by a trusted admin key
and still be refused by the server; the statement is what tells the two apart. It is an
annotated tag object in exactly the form `git tag -s` writes with gpg.format=ssh, so
`git verify-tag` checks it too:

    object <accepted commit sha>
    type commit
    tag mailstate-accepted
    tagger mailstate <mailstate@localhost> <unix-seconds> +0000

    mailstate accepted head <sha12>

    Accepted-Head: <full sha, same as object>
    Issued-At: <unix seconds>
    Key-Endorsement: <base64>   (0 to 8 lines: server key rotation, state/keyrotation.py)
    -----BEGIN SSH SIGNATURE-----
    ...
    -----END SSH SIGNATURE-----

The signature (SSHSIG, namespace "git") covers the text up to the BEGIN line. Only keys with
the principal `mailstate` (server keys, state/signing.py PRINCIPAL) in allowed_signers may sign
a statement; admin keys sign commits, never statements. The statement lives at REF
(`refs/mailstate/accepted`) in state.git, and in upstream mode on the git host too.

    statement_payload(head, issued_at)          the signed text
    create_statement(repo, signer, head, t)     write the tag object, return its id
    write_statement(repo, signer, head, t)      the same, and point REF at it (tests, tools)
    parse_statement(raw)                        Statement, or StatementInvalid
    verify_statement(raw, allowed_signers)      parse + `ssh-keygen -Y verify -I mailstate`
    read_statement(repo)                        (tag id, raw tag bytes) at REF, or None
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pygit2

from mailstate.state.errors import StatementInvalid, StoreError
from mailstate.state.signing import NAMESPACE, PRINCIPAL, Signer

REF = "refs/mailstate/accepted"
TAG_NAME = "mailstate-accepted"
TAGGER = "mailstate <mailstate@localhost>"
SIG_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"
SIG_END = b"-----END SSH SIGNATURE-----\n"
MAX_STATEMENT_BYTES = 8192

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
MAX_ENDORSEMENTS = 8
_ARMOR = re.compile(rb"-----BEGIN SSH SIGNATURE-----\n[A-Za-z0-9+/=\n]+-----END SSH SIGNATURE-----\n")


@dataclass(frozen=True)
class Statement:
    """A parsed statement: the accepted head, when it was issued, and what was signed."""

    head: str
    issued_at: int
    payload: bytes
    signature: bytes
    # Server key rotation: each an old server key's signed word for its successor (state/keyrotation.py).
    endorsements: tuple[bytes, ...] = ()


def statement_payload(head: str, issued_at: int, endorsements: tuple[bytes, ...] = ()) -> bytes:
    """The exact text a server signs to state that `head` (a full commit sha) is accepted;
    `endorsements` (raw, oldest first, the last MAX_ENDORSEMENTS) ride along as base64 lines."""
    if not re.fullmatch(r"[0-9a-f]{40}", head):
        raise StatementInvalid(f"{head!r} is not a full commit sha.")
    if issued_at < 0:
        raise StatementInvalid("Issued-At must not be negative.")
    lines = "".join(f"Key-Endorsement: {base64.b64encode(e).decode()}\n" for e in endorsements[-MAX_ENDORSEMENTS:])
    return (
        f"object {head}\n"
        "type commit\n"
        f"tag {TAG_NAME}\n"
        f"tagger {TAGGER} {issued_at} +0000\n"
        "\n"
        f"mailstate accepted head {head[:12]}\n"
        "\n"
        f"Accepted-Head: {head}\n"
        f"Issued-At: {issued_at}\n"
        f"{lines}"
    ).encode()


def create_statement(
    repo: pygit2.Repository,
    signer: Signer,
    head: str,
    issued_at: int | None = None,
    *,
    write: Callable[[bytes, bytes], str] | None = None,
) -> str:
    """Sign a statement for `head` and write it as a tag object into `repo`; its object id.

    No ref moves. `issued_at` defaults to now (unix seconds). `signer` is any state/signing.py
    signer (Ed25519Signer, SshKeygenSigner); it must be a SERVER key for nodes to accept it.
    `write(kind, data)` writes the object instead of libgit2 (the store's GitRepo.write_object).
    """
    # A data dir's signer (state/keyrotation.py DataDirSigner) carries the key endorsements.
    endorsements_of = getattr(signer, "endorsements", None)
    endorsements: tuple[bytes, ...] = endorsements_of() if callable(endorsements_of) else ()
    payload = statement_payload(head, int(time.time()) if issued_at is None else issued_at, endorsements)
    try:
        signature = signer.sign(payload)
    except StoreError:
        raise
    except Exception as exc:  # any signer failure is a store failure
        raise StoreError("The accepted-head statement could not be signed.") from exc
    try:
        if write is not None:
            return write(b"tag", payload + signature.encode())
        return str(repo.odb.write(pygit2.GIT_OBJECT_TAG, payload + signature.encode()))
    except (pygit2.GitError, OSError) as exc:  # libgit2 reports file system failures as OSError
        raise StoreError("git could not write the accepted-head statement.") from exc


def write_statement(
    repo: pygit2.Repository | Path | str, signer: Signer, head: str, issued_at: int | None = None, *, ref: str = REF
) -> str:
    """create_statement, then point `ref` at it unconditionally; the tag id (for tests and tools;
    the store moves the ref with its forward-only compare-and-swap instead)."""
    r = repo if isinstance(repo, pygit2.Repository) else pygit2.Repository(str(repo))
    tag = create_statement(r, signer, head, issued_at)
    r.references.create(ref, pygit2.Oid(hex=tag), force=True)
    return tag


def parse_statement(raw: bytes) -> Statement:
    """The statement in the raw tag object `raw`, checked field by field (no signature check)."""
    if len(raw) > MAX_STATEMENT_BYTES:
        raise StatementInvalid("The accepted-head statement is too large.")
    cut = raw.rfind(SIG_BEGIN)
    if cut < 0 or (cut > 0 and raw[cut - 1 : cut] != b"\n"):
        raise StatementInvalid("The accepted-head statement carries no SSH signature.")
    payload, signature = raw[:cut], raw[cut:]
    m = _PAYLOAD.fullmatch(payload)
    if m is None:
        raise StatementInvalid("The accepted-head statement is not in format 1.")
    if not _ARMOR.fullmatch(signature):
        raise StatementInvalid("The accepted-head statement's signature is malformed.")
    head = m["head"].decode()
    if m["object"].decode() != head or not head.startswith(m["short"].decode()) or m["tagged"] != m["issued"]:
        raise StatementInvalid("The accepted-head statement's fields disagree.")
    try:
        endorsements = tuple(
            base64.b64decode(line.split(b": ", 1)[1], validate=True) for line in m["endorsements"].splitlines()
        )
    except (binascii.Error, ValueError) as exc:
        raise StatementInvalid("The accepted-head statement carries a malformed Key-Endorsement.") from exc
    return Statement(
        head=head, issued_at=int(m["issued"]), payload=payload, signature=signature, endorsements=endorsements
    )


def verify_statement(raw: bytes, allowed_signers: Path) -> Statement:
    """parse_statement, then check the signature is by a SERVER key (principal `mailstate`).

    The check is `ssh-keygen -Y verify -f allowed_signers -I mailstate -n git`, the same one a
    node runs against its local allowed_signers; an admin key (any other principal) fails it.
    """
    st = parse_statement(raw)
    with tempfile.TemporaryDirectory(prefix="mailstate-statement-") as tmp:
        sig = Path(tmp) / "statement.sig"
        sig.write_bytes(st.signature)
        try:
            proc = subprocess.run(
                [
                    "ssh-keygen",
                    "-Y",
                    "verify",
                    "-f",
                    os.path.abspath(allowed_signers),
                    "-I",
                    PRINCIPAL,
                    "-n",
                    NAMESPACE,
                    "-s",
                    str(sig),
                ],
                input=st.payload,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StoreError("ssh-keygen could not check the accepted-head statement.") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()
        reason = detail[-1][:200] if detail else "bad signature"
        raise StatementInvalid(f"The accepted-head statement is not signed by a server key ({reason}).")
    return st


def read_statement(repo: pygit2.Repository, ref: str = REF) -> tuple[str, bytes] | None:
    """(tag object id, raw tag bytes) that `ref` points at, or None when there is no such tag."""
    try:
        reference = repo.references.get(ref)
    except (pygit2.GitError, ValueError, OSError):
        return None  # a damaged ref file (a power cut while it was written) is no statement
    if reference is None:
        return None
    target = reference.target
    if not isinstance(target, pygit2.Oid):
        return None  # a symbolic ref is not a statement
    try:
        obj = repo.odb.read(target)
    except (KeyError, ValueError, pygit2.GitError):
        return None
    kind, data = obj[0], obj[1]
    if kind != pygit2.GIT_OBJECT_TAG:
        return None
    return str(target), bytes(data)
