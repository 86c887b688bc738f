"""One table, two validators: the node (pi-pull) and the server refuse the same rendered lines.

tests/vectors/rendered_lines.json lists hostile passwd and map lines (each replaces
info@example.com's line). The node side runs the real built pi_pull.py against a real git repo
whose commits are signed by a trusted key and stated accepted by a valid statement: every
hostile line must end in exit 3 with the last release still live. The server side puts the same
line into a commit of a real data dir and asks state/sync.validate_incoming, which must refuse
it. tests/vectors/local_parts.json and domains.json hold the name rules of both to one table.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mailstate.compiler.render import render_domain
from mailstate.state import validate
from mailstate.state.errors import InvalidInput
from mailstate.state.models import DomainFile, Mailbox, Settings
from mailstate.state.sync import validate_incoming
from tests.helpers.vectors import HASH, LINES, VECTORS, node_repo

LOCAL_PARTS: dict[str, Any] = json.loads((VECTORS / "local_parts.json").read_text())
DOMAINS: dict[str, Any] = json.loads((VECTORS / "domains.json").read_text())
FILES = {
    "passwd": "rendered/domains/ex/example.com/passwd",
    "virtual_mailbox_maps": "rendered/domains/ex/example.com/virtual_mailbox_maps",
    "mailboxes": "rendered/domains/ex/example.com/mailboxes",  # state format 2 only
}
EXIT_OK, EXIT_REFUSED = 0, 3


def fill(template: str, *, root: str, uid: int, gid: int, dir: str, **more: object) -> str:
    text = template
    for key, value in {"hash": HASH, "root": root, "uid": uid, "gid": gid, "dir": dir, **more}.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def replace_line(path: Path, base: str, prefix: str, line: str) -> None:
    """``base`` with its line starting with ``prefix`` replaced by ``line``."""
    lines = base.split("\n")
    i = next(i for i, old in enumerate(lines) if old.startswith(prefix))
    lines[i] = line
    path.write_bytes("\n".join(lines).encode("utf-8"))


# --------------------------------------------------------------------------- the node


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", [1, 2])
def test_every_hostile_line_is_refused_by_pi_pull(tmp_path: Path, fmt: int) -> None:
    repo, node = node_repo(tmp_path, fmt)
    repo.set_mailbox("info@example.com", password_hash=HASH)
    repo.set_mailbox("sales@example.com", password_hash=HASH)
    good = repo.commit("good")
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    info = repo.domains["example.com"]["info"]
    values = {
        "root": repo.mail_root,
        "uid": repo.uid,
        "gid": repo.gid,
        "dir": repo.mailbox_dir("info", info),
        "id": info.id,
    }
    base = {name: (repo.work / rel).read_text() for name, rel in FILES.items() if (repo.work / rel).exists()}
    wrong: list[str] = []
    for vec in LINES["hostile"]:
        if vec["file"] not in base:
            continue  # a mailboxes line in a format-1 repo
        for name, rel in FILES.items():
            if name in base:
                (repo.work / rel).write_text(base[name])
        replace_line(repo.work / FILES[vec["file"]], base[vec["file"]], "info", fill(vec["line"], **values))
        repo.commit(vec["name"], write=False)  # signed by the trusted key, stated accepted
        r = node.tick()
        if r.returncode != EXIT_REFUSED or node.current() != good or f"{vec['file']} of example.com" not in r.stderr:
            wrong.append(f"{vec['file']}: {vec['name']}: rc={r.returncode} {r.stderr.strip()[-300:]}")
    assert not wrong, "\n".join(wrong)
    assert sorted(os.listdir(node.root / "releases")) == [good]
    assert json.loads((node.root / "state.json").read_text())["applied_commit"] == good


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", [1, 2])
def test_valid_vector_lines_are_what_pi_pull_applies(tmp_path: Path, fmt: int) -> None:
    repo, node = node_repo(tmp_path, fmt)
    for v in LINES["valid"]:
        repo.set_mailbox(f"{v['local']}@example.com", password_hash=HASH, quota_mb=v["quota_mb"])
    sha = repo.commit("valid")
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert node.current() == sha
    boxes = repo.domains["example.com"]
    expected = sorted(
        fill(
            LINES["valid_passwd"],
            root=repo.mail_root,
            uid=repo.uid,
            gid=repo.gid,
            dir=repo.mailbox_dir(v["local"], boxes[v["local"]]),
            **v,
        )
        for v in LINES["valid"]
    )
    assert (node.root / "current/dovecot/passwd.d/example.com").read_text().splitlines() == expected


# --------------------------------------------------------------------------- the server


@pytest.mark.e2e
def test_every_hostile_line_is_refused_by_the_server(mail_store: Any, data_dir: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    base = {name: (work / rel).read_text() for name, rel in FILES.items()}  # the server writes format 2
    info_line = next(line for line in base["passwd"].splitlines() if line.startswith("info@example.com:"))
    home = info_line.split(":")[5]
    settings = mail_store.snapshot.settings
    folder = home.rsplit("/", 1)[1]
    values = {
        "root": settings.mail_root,
        "uid": settings.uid,
        "gid": settings.gid,
        "dir": folder,
        "id": folder.partition("~")[2],
    }
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    accepted: list[str] = []
    for i, vec in enumerate(LINES["hostile"]):
        subprocess.run([*git, "checkout", "-q", "-f", "origin/main"], check=True)
        replace_line(work / FILES[vec["file"]], base[vec["file"]], "info", fill(vec["line"], **values))
        subprocess.run([*git, "commit", "-q", "-S", "-am", vec["name"]], check=True)
        subprocess.run([*git, "push", "-q", "origin", f"HEAD:refs/vectors/{i}"], check=True)
        sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
        verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
        if verdict.ok or not any(FILES[vec["file"]] in p for p in verdict.problems):
            accepted.append(f"{vec['file']}: {vec['name']}: {verdict.problems}")
    assert not accepted, "\n".join(accepted)


@pytest.mark.parametrize("fmt", [1, 2])
def test_valid_vector_lines_are_what_the_compiler_writes(fmt: int) -> None:
    settings = Settings(format=fmt, mail_root="/var/vmail", uid=5000, gid=5000)
    ids = {v["local"]: f"20261201-{i:06x}" for i, v in enumerate(LINES["valid"])}
    boxes = {
        v["local"]: Mailbox(id=ids[v["local"]] if fmt == 2 else None, password=HASH, quota_mb=v["quota_mb"])
        for v in LINES["valid"]
    }
    out = render_domain(DomainFile(domain="example.com", email_enabled=True, mailboxes=boxes), settings)

    def dir_of(local: str) -> str:
        return f"{local}~{ids[local]}" if fmt == 2 else local

    for key, rel in (("valid_passwd", FILES["passwd"]), ("valid_map", FILES["virtual_mailbox_maps"])):
        expected = sorted(
            fill(LINES[key], root="/var/vmail", uid=5000, gid=5000, dir=dir_of(v["local"]), **v) for v in LINES["valid"]
        )
        assert out[rel].decode().splitlines() == expected


# --------------------------------------------------------------------------- names: one rule for both


def _server_domain_ok(name: str) -> bool:
    try:
        return validate.normalize_domain(name) == name
    except InvalidInput:
        return False


def test_local_parts_agree(pipull: Any) -> None:
    for local in LOCAL_PARTS["valid"]:
        assert validate.is_local_part(local), local
        assert pipull.rules.is_local_part(local), local
    for local in LOCAL_PARTS["invalid"]:
        assert not validate.is_local_part(local), local
        assert not pipull.rules.is_local_part(local), local


def test_domains_agree(pipull: Any) -> None:
    for name in DOMAINS["valid"]:
        assert _server_domain_ok(name), name
        assert pipull.rules.is_domain(name), name
    for name in DOMAINS["invalid"]:
        assert not _server_domain_ok(name), name
        assert not pipull.rules.is_domain(name), name
