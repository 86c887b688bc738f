"""A `mailstate serve` set up for a real mail node, and a node provisioned against it.

Shared by the end-to-end tests (tests/e2e/test_e2e_serve.py, tests/e2e/test_lifecycle_node.py): the
server's settings match the node's (mail root, uid, gid; bcrypt cost 4 for speed), and the
node is registered through the API like an operator would (add-node, whitelisted to loopback).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers.mailnode import MailNode, run_pi_pull
from tests.helpers.server import LiveServer

P1, P2 = "first password", "second password"


def start_server_for(
    node: MailNode, root: Path, *, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> tuple[LiveServer, httpx.Client, httpx.Client]:
    """A started server initialised for `node`, with an admin client and a project-42 client."""
    server = LiveServer(root)
    server.cli(
        "init", "--data", str(server.data.root), "--bcrypt-cost", "4",
        "--mail-root", str(node.mail_root), "--uid", str(node.uid), "--gid", str(node.gid),
    )  # fmt: skip
    server.admin_token = server.create_token(name="admin")
    project_token = server.create_token(project=42, name="dashboard")
    server.env.update(env or {})
    server.extra_args = list(extra_args)
    server.start()
    return server, server.client(server.admin_token), server.client(project_token)


def provision_node(node: MailNode, server: LiveServer, admin: httpx.Client, etc: Path, name: str = "mpi01") -> Path:
    """Register `name` through add-node and write its pi-pull.ini under `etc`; returns the ini."""
    added = admin.post("/v1/email-account/add-node", json={"name": name, "ip_address": "127.0.0.1"})
    assert added.status_code == 201, added.text
    etc.mkdir(parents=True, exist_ok=True)
    key_file = etc / "sync_key"
    key_file.write_text(added.json()["sync_key"] + "\n")
    key_file.chmod(0o600)
    # The node trusts the keys installed at provisioning: a copy, not the server's live file.
    signers = etc / "allowed_signers"
    shutil.copy(server.data.allowed_signers, signers)
    return node.write_pi_pull_config(
        etc / "pi-pull.ini",
        f"{server.url}/v1/nodes/state.git",
        signers,
        name=name,
        sync_key_file=key_file,
        report_url=f"{server.url}/v1/nodes/report",
    )


@dataclass
class Fleet:
    server: LiveServer
    node: MailNode
    cfg: Path
    admin: httpx.Client
    project: httpx.Client
    tmp: Path

    def call(
        self, client: httpx.Client, op: str, body: dict[str, object] | None = None, status: int = 200
    ) -> dict[str, object]:
        r = (
            client.get(f"/v1/email-account/{op}", params=body)
            if op.startswith("list-")
            else client.post(f"/v1/email-account/{op}", json=body or {})
        )
        assert r.status_code == status, r.text
        return r.json()  # type: ignore[no-any-return]

    def tick(self) -> subprocess.CompletedProcess[str]:
        return run_pi_pull(self.cfg, "--once")

    def node_row(self) -> dict[str, object]:
        rows = self.call(self.admin, "list-nodes")["nodes"]
        assert isinstance(rows, list)
        return next(r for r in rows if r["name"] == "mpi01")

    def head(self) -> str:
        return self.server.git("rev-parse", "main").strip()

    def push_into_server(self, edit, *, key: Path | None) -> str:  # type: ignore[no-untyped-def]
        """Someone bypasses the API and pushes straight into the server's repo."""
        work = self.tmp / f"work-{len(list(self.tmp.glob('work-*')))}"
        subprocess.run(["git", "clone", "-q", str(self.server.data.repo), str(work)], check=True, env=self.server.env)
        edit(work)
        base = ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org"]
        subprocess.run([*base, "add", "-A"], check=True, env=self.server.env)
        sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S"] if key else ["commit"]
        subprocess.run([*base, *sign, "-qm", "bypass"], check=True, env=self.server.env, capture_output=True)
        subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True, env=self.server.env)
        return self.head()
