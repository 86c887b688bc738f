"""The shared vector tables (tests/vectors/*.json) and a pi-pull node that follows a signed
state repo, for the tests that hold the node and the server to the same verdicts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers.mailnode import (
    StateRepo,
    age_file,
    make_signing_key,
    require_binaries,
    run_pi_pull,
    write_allowed_signers,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
LINES: dict[str, Any] = json.loads((VECTORS / "rendered_lines.json").read_text())
HASH = LINES["hash"]


class Node:
    """A pi-pull node (release root, config) following a StateRepo."""

    def __init__(self, tmp: Path, repo: StateRepo, signers: Path) -> None:
        self.root = tmp / "node"
        etc = tmp / "postfix-etc"
        etc.mkdir(exist_ok=True)
        (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = vectors.test\n")
        age_file(etc / "main.cf")
        self.cfg = tmp / "pi-pull.ini"
        self.cfg.write_text(
            f"[remote]\nurl = {repo.bare}\n[node]\nname = vectors\nallowed_signers = {signers}\n"
            f"[paths]\nroot = {self.root}\nsync = no\nmail_root = {repo.mail_root}\nmail_uid = {repo.uid}\nmail_gid = {repo.gid}\n"
            f"[services]\npostfix_reload = true\ndovecot_reload = true\nmap_type = hash\npostmap = postmap -c {etc}\n"
        )

    def tick(self) -> subprocess.CompletedProcess[str]:
        return run_pi_pull(self.cfg)

    def current(self) -> str | None:
        link = self.root / "current"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def node_repo(tmp: Path, fmt: int) -> tuple[StateRepo, Node]:
    require_binaries("git", "ssh-keygen", "postmap")
    key = make_signing_key(tmp / "keys", "trusted")
    signers = write_allowed_signers(tmp / "allowed_signers", [key])
    repo = StateRepo(tmp / "repo", key, format=fmt)
    return repo, Node(tmp, repo, signers)
