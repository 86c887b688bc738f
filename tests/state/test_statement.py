"""Accepted-head statements (state/statement.py): the exact format, and who may sign one.

Real keys (ssh-keygen), real `git verify-tag`, real `ssh-keygen -Y verify` run the way a node
runs it (-I mailstate -n git). An admin key is trusted for commits but must never pass as a
statement signer.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pygit2
import pytest

from mailstate.state.datadir import DataDir
from mailstate.state.errors import StatementInvalid
from mailstate.state.signing import Ed25519Signer, SshKeygenSigner, allowed_signers_line, generate_key
from mailstate.state.statement import (
    REF,
    create_statement,
    parse_statement,
    read_statement,
    statement_payload,
    verify_statement,
    write_statement,
)

ISSUED = 1767225600


@pytest.fixture
def repo(data_dir: DataDir) -> pygit2.Repository:
    return pygit2.Repository(str(data_dir.repo))


@pytest.fixture
def admin_key(data_dir: DataDir, tmp_path: Path) -> Path:
    """An admin key, trusted in allowed_signers for commits under its own principal."""
    key = tmp_path / "admin_key"
    pub = generate_key(key, "admin@example.org")
    with data_dir.allowed_signers.open("a") as fh:
        fh.write(allowed_signers_line(pub, "admin@example.org"))
    return key


def head_of(repo: pygit2.Repository) -> str:
    return str(repo.references["refs/heads/main"].target)


def raw_object(repo: pygit2.Repository, oid: str) -> bytes:
    return bytes(repo.odb.read(oid)[1])


def node_verify(allowed: Path, raw: bytes, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    """What a node runs: ssh-keygen -Y verify -I mailstate -n git over the payload."""
    cut = raw.rfind(b"-----BEGIN SSH SIGNATURE-----")
    sig = tmp / "statement.sig"
    sig.write_bytes(raw[cut:])
    return subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "mailstate", "-n", "git", "-s", str(sig)],
        input=raw[:cut],
        capture_output=True,
    )


def test_the_tag_object_is_exactly_format_1(data_dir: DataDir, repo: pygit2.Repository) -> None:
    head = head_of(repo)
    raw = raw_object(repo, create_statement(repo, Ed25519Signer(data_dir.key), head, ISSUED))
    text = raw.decode()
    expected_head = (
        f"object {head}\ntype commit\ntag mailstate-accepted\ntagger mailstate <mailstate@localhost> {ISSUED} +0000\n\n"
        f"mailstate accepted head {head[:12]}\n\nAccepted-Head: {head}\nIssued-At: {ISSUED}\n"
    )
    assert text.startswith(expected_head)
    assert raw[: len(expected_head)] == statement_payload(head, ISSUED)
    assert re.fullmatch(
        r"-----BEGIN SSH SIGNATURE-----\n[A-Za-z0-9+/=\n]+-----END SSH SIGNATURE-----\n", text[len(expected_head) :]
    )
    st = parse_statement(raw)
    assert (st.head, st.issued_at) == (head, ISSUED)


@pytest.mark.e2e
@pytest.mark.parametrize("signer_cls", [Ed25519Signer, SshKeygenSigner])
def test_git_verify_tag_and_the_node_check_accept_a_server_statement(
    data_dir: DataDir, repo: pygit2.Repository, tmp_path: Path, signer_cls: type
) -> None:
    head = head_of(repo)
    tag = write_statement(repo, signer_cls(data_dir.key), head, ISSUED)
    assert str(repo.references[REF].target) == tag
    git = ["git", "-C", str(data_dir.repo), "-c", f"gpg.ssh.allowedSignersFile={data_dir.allowed_signers}"]
    proc = subprocess.run([*git, "verify-tag", tag], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'Good "git" signature for mailstate' in proc.stderr
    assert (
        subprocess.run(
            ["git", "-C", str(data_dir.repo), "fsck", "--strict", "--no-dangling"], capture_output=True
        ).returncode
        == 0
    )
    raw = raw_object(repo, tag)
    assert node_verify(data_dir.allowed_signers, raw, tmp_path).returncode == 0
    st = verify_statement(raw, data_dir.allowed_signers)
    assert st.head == head and st.issued_at == ISSUED
    assert read_statement(repo) == (tag, raw)


@pytest.mark.e2e
def test_an_admin_key_cannot_sign_a_statement(
    data_dir: DataDir, repo: pygit2.Repository, admin_key: Path, tmp_path: Path
) -> None:
    tag = write_statement(repo, SshKeygenSigner(admin_key), head_of(repo), ISSUED)
    raw = raw_object(repo, tag)
    # git itself trusts the admin key (it may sign commits), which is why the principal matters:
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(data_dir.repo),
            "-c",
            f"gpg.ssh.allowedSignersFile={data_dir.allowed_signers}",
            "verify-tag",
            tag,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "admin@example.org" in proc.stderr
    assert node_verify(data_dir.allowed_signers, raw, tmp_path).returncode != 0
    with pytest.raises(StatementInvalid, match="not signed by a server key"):
        verify_statement(raw, data_dir.allowed_signers)


@pytest.mark.e2e
def test_an_unknown_key_cannot_sign_a_statement(data_dir: DataDir, repo: pygit2.Repository, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    generate_key(stranger, "mailstate")  # claims the server principal, but is not in allowed_signers
    raw = raw_object(repo, create_statement(repo, Ed25519Signer(stranger), head_of(repo), ISSUED))
    with pytest.raises(StatementInvalid, match="not signed by a server key"):
        verify_statement(raw, data_dir.allowed_signers)


def _tampered(raw: bytes, how: str, other: str) -> bytes:
    cut = raw.rfind(b"-----BEGIN")
    payload, sig = raw[:cut], raw[cut:]
    head = re.search(rb"Accepted-Head: ([0-9a-f]{40})", payload)
    assert head is not None
    h = head.group(1)
    if how == "object-differs":
        return payload.replace(b"object " + h, b"object " + other.encode()) + sig
    if how == "head-differs":
        return payload.replace(b"Accepted-Head: " + h, b"Accepted-Head: " + other.encode()) + sig
    if how == "short-differs":
        return payload.replace(b"head " + h[:12], b"head " + other[:12].encode()) + sig
    if how == "time-differs":
        return payload.replace(f"{ISSUED} +0000".encode(), f"{ISSUED + 1} +0000".encode()) + sig
    if how == "extra-line":
        return payload + b"Note: hello\n" + sig
    if how == "other-tag-name":
        return payload.replace(b"tag mailstate-accepted", b"tag v1.0") + sig
    if how == "unsigned":
        return payload
    if how == "trailing":
        return raw + b"junk\n"
    if how == "bad-armor":
        return payload + sig.replace(b"-----END SSH SIGNATURE-----", b"-----END PGP SIGNATURE-----")
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "object-differs",
        "head-differs",
        "short-differs",
        "time-differs",
        "extra-line",
        "other-tag-name",
        "unsigned",
        "trailing",
        "bad-armor",
    ],
)
def test_malformed_statements_are_refused(data_dir: DataDir, repo: pygit2.Repository, how: str) -> None:
    raw = raw_object(repo, create_statement(repo, Ed25519Signer(data_dir.key), head_of(repo), ISSUED))
    bad = _tampered(raw, how, "1" * 40)
    with pytest.raises(StatementInvalid):
        parse_statement(bad)
    with pytest.raises(StatementInvalid):
        verify_statement(bad, data_dir.allowed_signers)


@pytest.mark.e2e
def test_a_resigned_payload_for_another_head_fails_the_signature(data_dir: DataDir, repo: pygit2.Repository) -> None:
    """Consistent fields but a signature over a different payload: only ssh-keygen catches it."""
    head = head_of(repo)
    raw = raw_object(repo, create_statement(repo, Ed25519Signer(data_dir.key), head, ISSUED))
    other = statement_payload("2" * 40, ISSUED)
    forged = other + raw[raw.rfind(b"-----BEGIN") :]
    assert parse_statement(forged).head == "2" * 40
    with pytest.raises(StatementInvalid, match="not signed by a server key"):
        verify_statement(forged, data_dir.allowed_signers)


def test_payload_refuses_bad_input() -> None:
    with pytest.raises(StatementInvalid):
        statement_payload("abc", ISSUED)
    with pytest.raises(StatementInvalid):
        statement_payload("a" * 40, -1)


def test_read_statement_without_a_tag(data_dir: DataDir, repo: pygit2.Repository) -> None:
    assert read_statement(repo, "refs/mailstate/nothing") is None
    repo.references.create("refs/mailstate/not-a-tag", repo.references["refs/heads/main"].target)
    assert read_statement(repo, "refs/mailstate/not-a-tag") is None
