"""Commit signers: both produce SSHSIG signatures that OpenSSH and git accept, and only those."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstate.state.datadir import DataDir
from mailstate.state.errors import StoreError
from mailstate.state.gitrepo import GitRepo
from mailstate.state.signing import Ed25519Signer, SshKeygenSigner, allowed_signers_line, generate_key

pytestmark = pytest.mark.e2e

SIGNERS = [Ed25519Signer, SshKeygenSigner]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    generate_key(path)
    return path


@pytest.fixture
def allowed(tmp_path: Path, key: Path) -> Path:
    path = tmp_path / "allowed_signers"
    path.write_text(allowed_signers_line(Path(f"{key}.pub").read_text()))
    return path


def ssh_verify(
    allowed: Path, signature: str, payload: bytes, tmp_path: Path, namespace: str = "git"
) -> subprocess.CompletedProcess[bytes]:
    sig = tmp_path / "payload.sig"
    sig.write_text(signature)
    return subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "mailstate", "-n", namespace, "-s", str(sig)],
        input=payload,
        capture_output=True,
    )


@pytest.mark.parametrize("signer_cls", SIGNERS)
def test_signature_verifies_with_ssh_keygen(signer_cls: type, key: Path, allowed: Path, tmp_path: Path) -> None:
    payload = b"tree 0000\nauthor someone\n\nadd-user info@example.com\n"
    signature = signer_cls(key).sign(payload)
    assert signature.startswith("-----BEGIN SSH SIGNATURE-----\n")
    assert signature.rstrip().endswith("-----END SSH SIGNATURE-----")
    proc = ssh_verify(allowed, signature, payload, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert b'Good "git" signature for mailstate' in proc.stdout + proc.stderr


@pytest.mark.parametrize("signer_cls", SIGNERS)
def test_signature_does_not_verify_for_other_data_namespace_or_key(
    signer_cls: type, key: Path, allowed: Path, tmp_path: Path
) -> None:
    payload = b"the commit\n"
    signature = signer_cls(key).sign(payload)
    assert ssh_verify(allowed, signature, payload + b"x", tmp_path).returncode != 0
    assert ssh_verify(allowed, signature, payload, tmp_path, namespace="file").returncode != 0
    other = tmp_path / "other"
    generate_key(other)
    other_allowed = tmp_path / "other_allowed"
    other_allowed.write_text(allowed_signers_line(Path(f"{other}.pub").read_text()))
    assert ssh_verify(other_allowed, signature, payload, tmp_path).returncode != 0


def test_in_process_signer_matches_the_reference_format(key: Path) -> None:
    """Ed25519 is deterministic: the in-process signer must produce ssh-keygen's exact bytes."""
    payload = b"same payload\n"
    assert Ed25519Signer(key).sign(payload) == SshKeygenSigner(key).sign(payload)


@pytest.mark.parametrize("signer_cls", SIGNERS)
def test_git_verify_commit_accepts_the_commit(signer_cls: type, key: Path, allowed: Path, tmp_path: Path) -> None:
    repo = GitRepo.init_bare(tmp_path / "repo.git")
    tree = repo.build_tree(None, {"mailstate.yaml": b"format: 1\n"})
    when = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    first = repo.commit(tree, None, "init mailstate\n", signer_cls(key), when)
    repo.move_branch(first, None)
    tree2 = repo.build_tree(first, {"nodes.yaml": b"nodes: {}\n"})
    second = repo.commit(tree2, first, "add-node x\n\nAction: add-node\n", signer_cls(key), when)
    repo.move_branch(second, first)
    for sha in (first, second):
        proc = subprocess.run(
            ["git", "-C", str(repo.path), "-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", sha],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    # with nobody trusted, the same commit fails
    empty = tmp_path / "empty_allowed"
    empty.write_text("")
    proc = subprocess.run(
        ["git", "-C", str(repo.path), "-c", f"gpg.ssh.allowedSignersFile={empty}", "verify-commit", second],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0


def test_unsigned_commit_fails_verify_commit(tmp_path: Path, allowed: Path) -> None:
    """The check in the other tests is real: git refuses an unsigned commit."""
    work = tmp_path / "w"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "f").write_text("x\n")
    subprocess.run(["git", "-C", str(work), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "unsigned"], check=True)
    proc = subprocess.run(
        ["git", "-C", str(work), "-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", "HEAD"],
        capture_output=True,
    )
    assert proc.returncode != 0


def test_init_data_dir_first_commit_and_allowed_signers(data_dir: DataDir) -> None:
    line = data_dir.allowed_signers.read_text()
    assert line.startswith('mailstate namespaces="git" ssh-ed25519 ')
    assert line.split()[-1] == Path(f"{data_dir.key}.pub").read_text().split()[1]
    assert oct(data_dir.key.stat().st_mode & 0o777) == "0o600"
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(data_dir.repo),
            "-c",
            f"gpg.ssh.allowedSignersFile={data_dir.allowed_signers}",
            "verify-commit",
            "main",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        subprocess.run(
            ["git", "-C", str(data_dir.repo), "rev-list", "--count", "main"], capture_output=True, text=True
        ).stdout.strip()
        == "1"
    )


def test_allowed_signers_line_format() -> None:
    line = allowed_signers_line("ssh-ed25519 AAAAC3Nza fake@host", principal="p")
    assert line == 'p namespaces="git" ssh-ed25519 AAAAC3Nza\n'


def test_bad_keys_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        Ed25519Signer(tmp_path / "missing")
    garbage = tmp_path / "garbage"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(StoreError):
        Ed25519Signer(garbage)
    rsa = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    with pytest.raises(StoreError) as info:
        Ed25519Signer(rsa)
    assert "ed25519" in info.value.message
    with pytest.raises(StoreError):
        SshKeygenSigner(tmp_path / "missing").sign(b"payload")
