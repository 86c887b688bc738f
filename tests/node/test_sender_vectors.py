"""One table, two validators, for the sender-login map: pi-pull (sendermap.py) and the server
(sync: rendered/ must equal compile(state)) refuse the same sender_login_maps fragments, and
accept the valid ones (tests/vectors/sender_lines.json). Also: a fragment may list an alias
domain's addresses only when that domain's own alias map says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mailstate.state.sync import validate_incoming
from tests.helpers.pipull import EXIT_OK, EXIT_REFUSED
from tests.helpers.vectors import HASH, VECTORS, node_repo

TABLE: dict[str, Any] = json.loads((VECTORS / "sender_lines.json").read_text())
REL = "rendered/domains/ex/example.com/sender_login_maps"


def text_of(vec: dict[str, Any]) -> str:
    return (
        str(vec["text"])
        .replace("OWNERS501", ",".join(f"u{i}@example.com" for i in range(501)))
        .replace("LONGLINE", ",".join(f"user{i:05d}@example.com" for i in range(400)))
    )


def test_the_node_validator_agrees_with_the_table(pipull: Any) -> None:
    for vec in TABLE["valid"]:
        assert pipull.sendermap.check_bytes("example.com", text_of(vec).encode()).count >= 1, vec["name"]
    for vec in TABLE["hostile"]:
        with pytest.raises(pipull.errors.Refused):
            check = pipull.sendermap.check_bytes("example.com", text_of(vec).encode("utf-8"))
            pipull.sendermap.check_claims({"example.com": check}, {})  # no alias domains here
        # (each hostile entry fails in check_bytes or, for another domain's key, in check_claims)


def test_claims_need_the_alias_domain(pipull: Any) -> None:
    check = pipull.sendermap.check_bytes(
        "example.com", b"info@example.com info@example.com\ninfo@old.example info@example.com\n"
    )
    pipull.sendermap.check_claims({"example.com": check}, {"old.example": "example.com"})
    with pytest.raises(pipull.errors.Refused, match="not an alias domain"):
        pipull.sendermap.check_claims({"example.com": check}, {"old.example": "elsewhere.example"})
    own = pipull.sendermap.check_bytes("old.example", b"info@old.example info@old.example\n")
    with pytest.raises(pipull.errors.Refused, match="listed by both"):
        pipull.sendermap.check_claims({"example.com": check, "old.example": own}, {"old.example": "example.com"})


@pytest.mark.e2e
def test_every_hostile_fragment_is_refused_by_pi_pull(tmp_path: Path) -> None:
    repo, node = node_repo(tmp_path, 2)
    repo.set_mailbox("info@example.com", password_hash=HASH)
    good = repo.commit("good")
    assert node.tick().returncode == EXIT_OK
    wrong = []
    for vec in TABLE["hostile"]:
        (repo.work / REL).write_bytes(text_of(vec).encode("utf-8"))
        repo.commit(vec["name"], write=False)
        r = node.tick()
        if r.returncode != EXIT_REFUSED or node.current() != good or "sender_login_maps" not in r.stderr:
            wrong.append(f"{vec['name']}: rc={r.returncode} {r.stderr.strip()[-300:]}")
    assert not wrong, "\n".join(wrong)
    # A valid fragment is applied, concatenated and postmapped.
    (repo.work / REL).write_text(text_of(TABLE["valid"][1]))
    sha = repo.commit("valid", write=False)
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert node.current() == sha
    assert (node.root / "current/postfix/sender_login_maps").read_text() == text_of(TABLE["valid"][1])
    assert (node.root / "current/postfix/sender_login_maps.db").exists()


@pytest.mark.e2e
def test_every_hostile_fragment_is_refused_by_the_server(mail_store: Any, data_dir: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    accepted = []
    for i, vec in enumerate(TABLE["valid"] + TABLE["hostile"]):
        subprocess.run([*git, "checkout", "-q", "-f", "origin/main"], check=True)
        (work / REL).write_bytes(text_of(vec).encode("utf-8"))
        subprocess.run([*git, "add", REL], check=True)
        subprocess.run([*git, "commit", "-q", "-S", "-m", vec["name"]], check=True)
        subprocess.run([*git, "push", "-q", "origin", f"HEAD:refs/vectors/{i}"], check=True)
        sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
        verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
        # Valid lines too: a hand-made fragment is not what compile() writes for this state.
        if verdict.ok or not any(REL in p for p in verdict.problems):
            accepted.append(f"{vec['name']}: {verdict.problems}")
    assert not accepted, "\n".join(accepted)
