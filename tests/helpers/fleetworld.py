"""A whole fleet on one machine: one `mailstate serve` and N nodes in network namespaces.

``fleet_world(["n1", "n2", "n3"])`` starts the server on the bridge of a fresh network
(tests/netns.py), registers every node through the API with its address (add-node, `address` and
`ip_address` both the node's address), provisions each from its own bundle, starts its Postfix
and Dovecot, and ticks every node until each one serves the server's head and has published its
certificate. Shared by tests/test_fleet_e2e.py and bench/bench_fleet.py.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.mailnode import make_public_tmpdir
from tests.helpers.netns import FleetNode, Network, cleanup, fleet_network, new_workdir, vmail
from tests.helpers.server import LiveServer

PROJECT = 42
PASSWORD = "fleet password 1"


@dataclass
class World:
    net: Network
    server: LiveServer
    admin: httpx.Client
    project: httpx.Client
    nodes: dict[str, FleetNode]
    tmp: Path
    followers: list[Any] = field(default_factory=list)

    def call(self, op: str, body: dict[str, Any] | None = None, status: int = 200, *, admin: bool = True) -> Any:
        client = self.admin if admin else self.project
        r = (
            client.get(f"/v1/email-account/{op}", params=body)
            if op.startswith("list-") or op == "dns-records"
            else client.post(f"/v1/email-account/{op}", json=body or {})
        )
        assert r.status_code == status, f"{op} {body}: {r.status_code} {r.text}"
        return r.json()

    def head(self) -> str:
        return self.server.git("rev-parse", "main").strip()

    def tick(self, *names: str) -> None:
        """One tick of each node named (all when none), in order; each must succeed."""
        for name in names or list(self.nodes):
            r = self.nodes[name].tick()
            assert r.returncode == 0, f"tick of {name}: rc={r.returncode}\n{r.stderr[-3000:]}"

    def settle(self, rounds: int = 6) -> None:
        """Tick every node until each serves the server's head and the head stops moving (a report
        can make a commit: a certificate, a move's switch)."""
        for _ in range(rounds):
            head = self.head()
            self.tick()
            nodes = {n["name"]: n for n in self.call("list-nodes")["nodes"]}
            if self.head() == head and all(n["applied_commit"] == head for n in nodes.values()):
                return
        raise AssertionError(f"the fleet did not settle: {self.call('list-nodes')}")

    def domain(self, name: str) -> dict[str, Any]:
        return next(d for d in self.call("list-domains")["domains"] if d["domain"] == name)


def _server(
    net: Network, tmp: Path, state_root: str, uid: int, gid: int, bcrypt_cost: int
) -> tuple[LiveServer, httpx.Client, httpx.Client]:
    server = LiveServer(tmp / "server", bcrypt_cost=bcrypt_cost)
    server.host = net.gateway
    server.cli(
        "init", "--data", str(server.data.root), "--bcrypt-cost", str(bcrypt_cost),
        "--mail-root", state_root, "--uid", str(uid), "--gid", str(gid),
    )  # fmt: skip
    server.admin_token = server.create_token(name="admin")
    project_token = server.create_token(project=PROJECT, name="dashboard")
    server.start()
    return server, server.client(server.admin_token), server.client(project_token)


@contextlib.contextmanager
def fleet_world(names: Sequence[str], tmp: Path, *, bcrypt_cost: int = 4) -> Iterator[World]:
    uid, gid = vmail()
    with fleet_network() as net:
        state_root = make_public_tmpdir("fleet-vmail-")  # every node's own vmail is mounted here, in its namespace
        nodes: list[FleetNode] = []
        followers: list[Any] = []  # the world's: follow-mode agents a test started
        server: LiveServer | None = None
        try:
            server, admin, project = _server(net, tmp, str(state_root), uid, gid, bcrypt_cost)
            signers = server.data.allowed_signers.read_text()
            for i, name in enumerate(names, 1):
                ns, address = net.add(i)
                r = admin.post(
                    "/v1/email-account/add-node", json={"name": name, "ip_address": address, "address": address}
                )
                assert r.status_code == 201, r.text
                node = FleetNode(name, ns, address, new_workdir(name), uid, gid, str(state_root))
                nodes.append(node)
                node.configure(server.url, signers, r.json()["sync_key"])
                node.enter()
                node.start()
            world = World(net, server, admin, project, {n.name: n for n in nodes}, tmp, followers)
            world.settle()
            published = {n["name"]: n["tls_fingerprint"] for n in world.call("list-nodes")["nodes"]}
            assert all(published.values()), published
            yield world
        finally:
            for proc in followers:
                proc.terminate()
            cleanup(nodes)
            if server is not None:
                server.stop()
            shutil.rmtree(state_root, ignore_errors=True)


def wait(what: str, check: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll `check()` until it returns something truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
