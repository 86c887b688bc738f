"""Placement: which node is a domain's home, and the rules that tie domain files to nodes.yaml.

Every email-enabled domain of a fleet with addressed nodes has a `home`: the node whose
Maildirs hold its mail. Every node accepts and serves every domain and passes what is not its
own on to the home (Postfix transport, Dovecot proxy; docs/fleet.md, "Running a fleet").

* Only a node with an `address` is ever a home or a move's target (the other nodes reach it
  there). A domain file may name a node only if nodes.yaml registers it with an address;
  `problems()` says where a state breaks that, for `mailstate check`, incoming commits and the
  loaders alike.
* A move (`move-domain`) records `moving_to`: the target copies the mail with `doveadm sync`
  and reports; the server then switches `home` in a signed commit and records `moved_from`,
  the old home, which syncs what it still holds to the new one and reports; the server then
  clears `moved_from` (state.fleet, from the nodes' reports).
* A replica (`set-replica`) is a second addressed node, never the home, that keeps a copy of
  the domain's mailboxes in two-way `doveadm sync` with the home (pi-pull's replication);
  `failover-node` swaps home and replica of every domain homed on a dead node. Which replica a
  domain may have is `replica_problem`, for writes, `mailstate check` and incoming commits.
* A fleet without addressed nodes places nothing: `home` stays absent and every node works
  as it always did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mailstate.state.errors import Conflict
from mailstate.state.files import NODES_PATH, domain_path
from mailstate.state.models import DomainFile, Node, NodesFile


def addressed(nodes: NodesFile) -> dict[str, str]:
    """name -> address of every node that can be a home, sorted by name."""
    return {name: node.address for name, node in sorted(nodes.nodes.items()) if node.address is not None}


def usable_node(nodes: NodesFile, name: str) -> Node:
    """The node `name` if it may be a home; 409 node_not_usable otherwise."""
    node = nodes.nodes.get(name)
    if node is None:
        raise Conflict(f"Node {name} is not registered.", code="node_not_usable", target=name)
    if node.address is None:
        raise Conflict(
            f"Node {name} has no address, so no other node can reach it: it cannot be a home. Give it one with "
            "set-node-address.",
            code="node_not_usable",
            target=name,
        )
    return node


def choose_home(nodes: NodesFile, home_boxes: Mapping[str, int]) -> str | None:
    """The addressed node with the fewest mailboxes (ties: the first name), or None without one."""
    names = list(addressed(nodes))
    if not names:
        return None
    return min(names, key=lambda name: (home_boxes.get(name, 0), name))


def node_refs(dom: DomainFile) -> list[tuple[str, str]]:
    """(key, node) for every node a domain file names."""
    keys = ("home", "moving_to", "moved_from", "replica")
    return [(key, getattr(dom, key)) for key in keys if getattr(dom, key) is not None]


def replica_problem(dom: DomainFile, nodes: NodesFile) -> str | None:
    """Why `dom` may not have its replica (None when it may, or has none): the replica keeps a copy
    of the mail of a domain that has a home, on another node that the home can reach."""
    if dom.replica is None:
        return None
    if dom.alias_of is not None:
        return f"{dom.domain} is an alias domain of {dom.alias_of}: it holds no mail, so it has no replica"
    if dom.home is None:
        return f"{dom.domain} has no home (no node with an address holds its mail), so it cannot have a replica"
    if dom.replica == dom.home:
        return f"node {dom.replica} is the home of {dom.domain}; a replica must be another node"
    node = nodes.nodes.get(dom.replica)
    if node is None:
        return f"node {dom.replica} is not registered"
    if node.address is None:
        return f"node {dom.replica} has no address, so the home cannot reach it (give it one with set-node-address)"
    return None


def problems(domains: Mapping[str, DomainFile], nodes: NodesFile, names: Iterable[str]) -> list[str]:
    """What the domains `names` break: a home or move target that is not a registered node with an
    address (moved_from must name a registered node)."""
    out: list[str] = []
    for name in sorted(names):
        dom = domains.get(name)
        if dom is None:
            continue
        why = replica_problem(dom, nodes)
        if why is not None:
            out.append(f"{domain_path(name)}: replica: {why}")
        for key, node_name in node_refs(dom):
            if key == "replica":
                continue  # replica_problem said it
            node = nodes.nodes.get(node_name)
            if node is None:
                out.append(f"{domain_path(name)}: {key}: {node_name} is not a node of nodes.yaml")
            elif node.address is None and key != "moved_from":
                out.append(
                    f"{domain_path(name)}: {key}: node {node_name} has no address (only addressed nodes are homes)"
                )
    return out


def nodes_problems(
    nodes: NodesFile,
    homes: Mapping[str, frozenset[str]],
    moves: Mapping[str, tuple[str, str | None, str | None]],
    replicas: Mapping[str, tuple[str, str]] | None = None,
) -> list[str]:
    """What nodes.yaml breaks against the domains (the snapshot's placement index): a node that is a
    home or in a move must stay registered, and a home or move target keeps its address."""
    out: list[str] = []
    needed: dict[str, str] = {}
    for home, doms in homes.items():
        if doms:
            needed[home] = f"home of {min(doms)}"
    for dom, (_home, moving_to, moved_from) in sorted(moves.items()):
        if moving_to is not None:
            needed.setdefault(moving_to, f"the target of {dom}'s move")
        if moved_from is not None:
            needed.setdefault(f"\0{moved_from}", f"the previous home of {dom}")
    for dom, (_home, replica) in sorted((replicas or {}).items()):
        needed.setdefault(replica, f"the replica of {dom}")
    for key, why in sorted(needed.items()):
        node_name = key.lstrip("\0")
        node = nodes.nodes.get(node_name)
        if node is None:
            out.append(f"{NODES_PATH}: node {node_name} is missing but it is {why}")
        elif node.address is None and not key.startswith("\0"):
            out.append(f"{NODES_PATH}: node {node_name} has no address but it is {why}")
    return out


def in_use(
    homes: Mapping[str, frozenset[str]],
    moves: Mapping[str, tuple[str, str | None, str | None]],
    name: str,
    replicas: Mapping[str, tuple[str, str]] | None = None,
) -> str | None:
    """Why node `name` cannot go (or lose its address), or None."""
    doms = homes.get(name)
    if doms:
        more = f" and {len(doms) - 1} more" if len(doms) > 1 else ""
        return f"it is the home of {min(doms)}{more}"
    for dom, (_home, moving_to, moved_from) in sorted(moves.items()):
        if name in (moving_to, moved_from):
            return f"it takes part in the move of {dom}"
    for dom, (_home, replica) in sorted((replicas or {}).items()):
        if name == replica:
            return f"it is the replica of {dom}"
    return None


def grants(
    moves: Mapping[str, tuple[str, str | None, str | None]],
    node: str,
    replicas: Mapping[str, tuple[str, str]] | None = None,
) -> set[str]:
    """The peers whose doveadm service `node` may use now (docs/fleet.md): the home of a domain it is
    moving to (it copies the mail from there), the new home of a domain it was home to (it syncs
    what it still holds there), and the replica of a domain it is home to (it keeps it in sync)."""
    out: set[str] = set()
    for home, moving_to, moved_from in moves.values():
        if node in (moving_to, moved_from):
            out.add(home)
    for home, replica in (replicas or {}).values():
        if node == home:
            out.add(replica)
    return out
