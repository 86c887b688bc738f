"""One table, two validators, for the fleet: a node proxies, relays and syncs only to the fleet's
registered nodes, and node and server refuse the same rendered fleet content.

tests/vectors/fleet_lines.json lists hostile lines of a passwd-file, a home fragment,
rendered/nodes, rendered/moves and rendered/replicas. The base state is made by a real store (three addressed
nodes with certificates, a domain homed on n1, a domain moving to n3). The node side runs the
real built pi_pull.py against a real git repo whose commits are signed by the server's key and
stated accepted: every hostile line must end in exit 3 with the last release still live. The
server side puts the same line into a commit and asks state/sync.validate_incoming, which must
refuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailstate.state import fleet
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from mailstate.state.validate import certificate_fingerprint
from tests.helpers.certs import certificate
from tests.helpers.mailnode import SigningKey, age_file, publish_statement, require_binaries, run_pi_pull
from tests.helpers.vectors import VECTORS as VECTOR_DIR

FLEET: dict[str, Any] = json.loads((VECTOR_DIR / "fleet_lines.json").read_text())
ADMIN = Actor.admin("test")
ADDRESSES = {"n1": "10.99.0.11", "n2": "10.99.0.12", "n3": "10.99.0.13"}
EXIT_OK, EXIT_REFUSED = 0, 3

pytestmark = pytest.mark.e2e  # git, ssh-keygen and the agent run as processes


@dataclass
class Base:
    store: Store
    work: Path
    values: dict[str, str]
    files: dict[str, str]  # vector file name -> its text in the base commit


@pytest.fixture
def base(store: Store, tmp_path: Path) -> Base:
    for name, address in ADDRESSES.items():
        store.execute("add-node", ADMIN, {"name": name, "address": address, "ip_address": address})
        req = fleet.CertificateReport(name=name, tls_certificate=certificate(name, address))
        store.execute_operation(fleet.SET_CERTIFICATE, fleet.node_actor(name), req, {})
    for domain in ("example.com", "move.example"):
        store.execute("link-domain", ADMIN, {"domain": domain, "project_id": 7})
        store.execute("enable-email", ADMIN, {"domain": domain, "node": "n1"})
    for email in ("info@example.com", "old@example.com", "x@move.example"):
        store.execute("add-user", ADMIN, {"email": email, "password": "vector password"})
    store.execute("remove-user", ADMIN, {"email": "old@example.com"})
    store.execute("move-domain", ADMIN, {"domain": "move.example", "node": "n3"})
    store.execute("set-replica", ADMIN, {"domain": "example.com", "node": "n2"})
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(store.git.path), str(work)], check=True)
    files = {name: (work / rel).read_text() for name, rel in FLEET["files"].items()}
    line = next(x for x in files["passwd"].splitlines() if x.startswith("info@example.com:"))
    old = next(x for x in files["passwd"].splitlines() if x.startswith("old@example.com:"))
    settings = store.snapshot.settings
    values = {
        "hash": line.split(":")[1],
        "root": settings.mail_root,
        "uid": str(settings.uid),
        "gid": str(settings.gid),
        "dir": line.split(":")[5].rsplit("/", 1)[1],
        "old_dir": old.split(":")[5].rsplit("/", 1)[1],
        **ADDRESSES,
        "fp1": certificate_fingerprint(store.snapshot.nodes.nodes["n1"].tls_certificate or ""),
    }
    assert "proxy_maybe=y host=10.99.0.11" in line and "nologin=y" in old  # the base is a fleet's
    return Base(store, work, values, files)


def fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def hostile_text(base: Base, vec: dict[str, Any]) -> str:
    text = base.files[vec["file"]]
    line = fill(vec["line"], base.values)
    if not vec["replace"]:
        return text + line + "\n"
    lines = text.splitlines()
    i = next(i for i, old in enumerate(lines) if old.startswith(vec["replace"]))
    lines[i] = line
    return "\n".join(lines) + "\n"


def _commit(work: Path, key: Path, rel: str, text: str, message: str) -> str:
    git = ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", "-c", "gpg.format=ssh"]
    subprocess.run([*git[:3], "checkout", "-q", "-f", "origin/main"], check=True)
    (work / rel).write_text(text)
    subprocess.run([*git, "-c", f"user.signingkey={key}", "commit", "-q", "-S", "-am", message], check=True)
    return subprocess.run([*git[:3], "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_every_hostile_fleet_line_is_refused_by_the_server(base: Base, data_dir: Any) -> None:
    accepted = []
    for i, vec in enumerate(FLEET["hostile"]):
        rel = FLEET["files"][vec["file"]]
        sha = _commit(base.work, data_dir.key, rel, hostile_text(base, vec), vec["name"])
        subprocess.run(["git", "-C", str(base.work), "push", "-q", "origin", f"HEAD:refs/vectors/{i}"], check=True)
        verdict = validate_incoming(base.store.git, base.store.snapshot, sha)
        if verdict.ok or not any(rel in p for p in verdict.problems):
            accepted.append(f"{vec['name']}: {verdict.problems}")
    assert not accepted, "\n".join(accepted)


def test_every_hostile_fleet_line_is_refused_by_pi_pull(base: Base, data_dir: Any, tmp_path: Path) -> None:
    require_binaries("git", "ssh-keygen", "postmap")
    # The node follows its own copy of the state repo; statements are signed by the server's key.
    bare = tmp_path / "node-remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(base.store.git.path), str(bare)], check=True)
    key = SigningKey(private=data_dir.key, public_line=Path(f"{data_dir.key}.pub").read_text().strip())
    head = base.store.head
    publish_statement(base.work, bare, head, key)
    etc = tmp_path / "postfix-etc"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = vectors.test\n")
    age_file(etc / "main.cf")
    root = tmp_path / "node"
    cfg = tmp_path / "pi-pull.ini"
    settings = base.store.snapshot.settings
    cfg.write_text(
        f"[remote]\nurl = {bare}\n[node]\nname = n2\nallowed_signers = {data_dir.allowed_signers}\n"
        f"[paths]\nroot = {root}\nsync = no\nmail_root = {settings.mail_root}\nmail_uid = {settings.uid}\n"
        f"mail_gid = {settings.gid}\n[services]\npostfix_reload = true\ndovecot_reload = true\nmap_type = hash\n"
        f"map_buckets = 4\npostmap = postmap -c {etc}\n[fleet]\npostmap = postmap -c {etc}\n"
    )
    r = run_pi_pull(cfg)
    assert r.returncode == EXIT_OK, r.stderr
    assert os.readlink(root / "current") == f"releases/{head}"
    # n2 is not the home: its transport sends example.com's mail to n1's relay listener.
    dump = subprocess.run(
        [
            "sh",
            "-c",
            f"for t in {root}/current/postfix/fleet_transport.*.db; do postmap -c {etc} -s hash:${{t%.db}}; done",
        ],
        capture_output=True,
        text=True,
    ).stdout
    assert "example.com\tfleet:[10.99.0.11]:2525" in dump and "move.example\tfleet:[10.99.0.11]:2525" in dump
    wrong = []
    for vec in FLEET["hostile"]:
        rel = FLEET["files"][vec["file"]]
        sha = _commit(base.work, data_dir.key, rel, hostile_text(base, vec), vec["name"])
        subprocess.run(
            ["git", "-C", str(base.work), "push", "-q", "--force", str(bare), "HEAD:refs/heads/main"], check=True
        )
        publish_statement(base.work, bare, sha, key)
        r = run_pi_pull(cfg)
        where = {"passwd": "passwd of example.com", "home": "home of example.com", "nodes": "rendered/nodes",
                 "moves": "rendered/moves", "replicas": "rendered/replicas"}[vec["file"]]  # fmt: skip
        if r.returncode != EXIT_REFUSED or os.readlink(root / "current") != f"releases/{head}" or where not in r.stderr:
            wrong.append(f"{vec['name']}: rc={r.returncode} {r.stderr.strip()[-300:]}")
    assert not wrong, "\n".join(wrong)
