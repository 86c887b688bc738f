"""What the nodes' reports change in the signed state, and the credentials nodes use with each other.

Three commits come from node reports, each only when the state allows it (a report never
changes anything a node is not entitled to):

* `set-node-certificate <node>`: the node reported a TLS certificate that differs from the one
  nodes.yaml holds. The other nodes verify the node against it (Postfix pins its SHA-256 for
  the relay, Dovecot trusts it for the IMAP proxy), so it travels in the signed state.
* `switch-home <domain>`: the node a domain is moving to reported that it copied every mailbox
  (`moves: [{"domain", "step": "copied"}]`). The home becomes that node, and `moved_from`
  records the old one.
* `moved <domain>`: the old home reported that it synced what it still held to the new home
  and set its copy aside (`"step": "drained"`); `moved_from` goes.

Node-to-node credentials (doveadm): every node's doveadm service has its own password,
HMAC-SHA256 under the data dir's `fleet_key` (never in git) of the node's name, its sync key's
digest and the set of addressed nodes. A node gets its own, and the password of a peer only
while the signed state gives it a reason (state.placement.grants: it copies from that peer, or
hands a domain over to it). Rotating a node's sync key, or adding or removing an addressed
node, gives every affected node a new password, so a removed node's credentials stop working
as soon as the nodes apply that commit.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from mailstate.state import models as m
from mailstate.state import placement
from mailstate.state.errors import StoreError
from mailstate.state.nodes import NodeReport
from mailstate.state.ops import Context, Operation, Prepared
from mailstate.state.snapshot import Actor, Change, Outcome, Snapshot
from mailstate.state.store import Store

FLEET_KEY_BYTES = 32


class CertificateReport(m.Request):
    name: str
    tls_certificate: str


class MoveStep(m.Request):
    name: str
    domain: str


def _set_certificate(ctx: Context, req: CertificateReport, _: Prepared) -> Outcome:
    node = ctx.state.nodes.nodes.get(req.name)
    result = {"name": req.name}
    if node is None or node.tls_certificate == req.tls_certificate:
        return Outcome(result, target=req.name)
    nodes = {**ctx.state.nodes.nodes, req.name: node.model_copy(update={"tls_certificate": req.tls_certificate})}
    return Outcome(result, change=Change(nodes=m.NodesFile(nodes=nodes)), target=req.name)


def _switch_home(ctx: Context, req: MoveStep, _: Prepared) -> Outcome:
    dom = ctx.state.domains.get(req.domain)
    result = {"domain": req.domain, "home": dom.home if dom else None}
    if dom is None or dom.moving_to != req.name or not dom.email_enabled:
        return Outcome(result, target=req.domain)  # no such move (any more): nothing to switch
    # A move to the replica swaps them: the old home becomes the replica (and syncs what it holds as moved_from).
    replica = dom.home if dom.replica == req.name else dom.replica
    new = dom.model_copy(update={"home": req.name, "moving_to": None, "moved_from": dom.home, "replica": replica})
    return Outcome({**result, "home": req.name}, change=Change(domains={req.domain: new}), target=req.domain,
                   project=dom.project_id)  # fmt: skip


def _drained(ctx: Context, req: MoveStep, _: Prepared) -> Outcome:
    dom = ctx.state.domains.get(req.domain)
    result = {"domain": req.domain}
    if dom is None or dom.moved_from != req.name:
        return Outcome(result, target=req.domain)
    new = dom.model_copy(update={"moved_from": None})
    return Outcome(result, change=Change(domains={req.domain: new}), target=req.domain, project=dom.project_id)


SET_CERTIFICATE = Operation("set-node-certificate", CertificateReport, _set_certificate, admin=True, in_spec=False)
SWITCH_HOME = Operation("switch-home", MoveStep, _switch_home, admin=True, in_spec=False)
MOVED = Operation("moved", MoveStep, _drained, admin=True, in_spec=False)


def node_actor(name: str) -> Actor:
    """The actor of the commits a node's report makes (the `Actor:` trailer says which node)."""
    return Actor.admin(f"node:{name}")


def apply_report(store: Store, name: str, report: NodeReport) -> list[str]:
    """The commits node `name`'s report (authenticated, validated and recorded by state.nodes)
    calls for; their shas. Each is a no-op when the state does not call for it (any more)."""
    made: list[str] = []
    actor = node_actor(name)
    if report.tls_certificate is not None:
        req = CertificateReport(name=name, tls_certificate=report.tls_certificate)
        out = store.execute_operation(SET_CERTIFICATE, actor, req, {})
        made += [out.result["commit"]] if out.result.get("commit") else []
    for step in report.moves or []:
        op = SWITCH_HOME if step.step == "copied" else MOVED
        out = store.execute_operation(op, actor, MoveStep(name=name, domain=step.domain), {})
        made += [out.result["commit"]] if out.result.get("commit") else []
    return made


# --- node-to-node credentials --------------------------------------------------------------


def fleet_key(root: Path) -> bytes:
    """The data dir's fleet key (`DIR/fleet_key`, 0600), made on first use. Servers sharing one
    fleet (upstream mode) need the same file: copy it."""
    path = Path(root) / "fleet_key"
    try:
        data = path.read_bytes()
        if len(data) == FLEET_KEY_BYTES:
            return data
        raise StoreError(f"{path} is not a fleet key ({len(data)} bytes); delete it to make a new one.")
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(FLEET_KEY_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fleet_key-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        return fleet_key(root)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return key


def doveadm_password(key: bytes, snap: Snapshot, name: str) -> str:
    """Node `name`'s doveadm password (see the module docstring); KeyError for an unknown node."""
    node = snap.nodes.nodes[name]
    members = ",".join(placement.addressed(snap.nodes))
    msg = f"mailstate doveadm 1\0{name}\0{node.sync_key_sha256}\0{members}".encode()
    return "msd_" + hmac.new(key, msg, hashlib.sha256).hexdigest()


def credentials(key: bytes, snap: Snapshot, name: str) -> dict[str, Any]:
    """What `GET /v1/nodes/fleet` answers node `name`: its own doveadm password and those of the
    peers the state lets it use now, with their addresses."""
    peers = {}
    for peer in sorted(placement.grants(snap.moves, name, snap.replicas)):
        node = snap.nodes.nodes.get(peer)
        if node is not None and node.address is not None:
            peers[peer] = {"address": node.address, "doveadm_password": doveadm_password(key, snap, peer)}
    return {"name": name, "doveadm_password": doveadm_password(key, snap, name), "peers": peers}
