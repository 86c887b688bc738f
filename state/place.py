"""Placing an existing state on a fleet: every email-enabled domain without a home gets one, in
exactly one signed commit (`mailstate place --data DIR`).

A state made before its nodes had addresses has domains without a home: every node delivers
them locally, as a fleet of islands. Once nodes have addresses, this gives each such domain the
addressed node with the fewest mailboxes, counting the domains it placed already, the rule
enable-email follows for a new domain (state.placement.choose_home); `--node NAME` puts them
all on one node instead, the node that holds their mail. No mail is copied (docs/fleet.md,
"Addresses and placement").

Like the format upgrade, it runs through the store's write path (signed, compare-and-swapped,
pushed upstream in upstream mode) and is idempotent: a state whose enabled domains all have a
home makes no commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailstate.state import models as m
from mailstate.state import placement
from mailstate.state.errors import Conflict
from mailstate.state.ops import Context, Operation, Prepared
from mailstate.state.snapshot import Actor, Change, Outcome
from mailstate.state.store import Store

ACTOR = Actor.admin("mailstate-place")


def unplaced(ctx: Context) -> list[str]:
    """The email-enabled domains without a home, by name (alias domains follow their target's
    mail, but a home is per domain file, so they are placed too)."""
    return [name for name in sorted(ctx.state.domains) if _needs_home(ctx.state.domains[name])]


def _needs_home(dom: m.DomainFile) -> bool:
    return dom.email_enabled and dom.home is None


def place_change(ctx: Context, node: str | None) -> tuple[Change, dict[str, str]]:
    """The change that gives every unplaced domain a home, and domain -> home."""
    if node is not None:
        placement.usable_node(ctx.state.nodes, node)
    boxes = dict(ctx.state.home_boxes)
    change = Change()
    homes: dict[str, str] = {}
    for name in unplaced(ctx):
        home = node or placement.choose_home(ctx.state.nodes, boxes)
        if home is None:
            raise Conflict(
                "No node has an address, so no node can be a home: give nodes addresses first "
                "(add-node {address} or set-node-address).",
                code="node_not_usable",
            )
        dom = ctx.state.domains[name]
        change.domains[name] = dom.model_copy(update={"home": home})
        homes[name] = home
        boxes[home] = boxes.get(home, 0) + len(dom.mailboxes)
    return change, homes


def _apply(ctx: Context, req: m.PlaceDomainsRequest, _: Prepared) -> Outcome:
    change, homes = place_change(ctx, req.node)
    result: dict[str, Any] = {"placed": homes}
    if not homes:
        return Outcome(result)
    return Outcome(result, change=change, target=f"{len(homes)} domain(s)")


PLACE = Operation(
    "place-domains",
    m.PlaceDomainsRequest,
    _apply,
    admin=True,
    in_spec=False,
    summary="Give every email-enabled domain without a home a home, in one signed commit (not an API route).",
)


def place_store(store: Store, node: str | None = None) -> dict[str, Any]:
    """Place the store's unplaced domains: `{"placed": {domain: node}, "commit": sha | None}`."""
    outcome = store.execute_operation(PLACE, ACTOR, m.PlaceDomainsRequest(node=node), {})
    return {"placed": outcome.result["placed"], "commit": outcome.result.get("commit")}


def place_data_dir(root: Path, node: str | None = None) -> dict[str, Any]:
    """`mailstate place --data DIR [--node NAME]`."""
    from mailstate.state.datadir import open_store

    return place_store(open_store(root), node)
