"""The in-memory state the operations read, and the change an operation hands back."""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mailstate.state.aliases import links
from mailstate.state.domainmap import NO_PLACEMENT, DomainMap, Placement, placement_of
from mailstate.state.models import DomainFile, Node, NodesFile, ProjectFile, Settings


@dataclass(frozen=True)
class Actor:
    """Who is calling: a project token (project_id set) or an admin (project_id None)."""

    name: str
    project_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.project_id is None

    @classmethod
    def admin(cls, name: str = "admin") -> Actor:
        return cls(name=name, project_id=None)

    @classmethod
    def project(cls, project_id: int, name: str | None = None) -> Actor:
        return cls(name=name or f"project-{project_id}", project_id=project_id)

    @classmethod
    def anonymous(cls) -> Actor:
        """A caller without a token (Operation.public): project 0, which no domain is ever linked
        to (project ids start at 1), so it can see and manage nothing, and is no admin."""
        return cls(name="anonymous", project_id=0)


@dataclass(frozen=True)
class Snapshot:
    """One consistent, immutable view of the state at one commit."""

    commit: str | None
    settings: Settings
    domains: Mapping[str, DomainFile]
    nodes: NodesFile
    by_project: Mapping[int, frozenset[str]]
    # target domain -> the domains whose alias_of names it (state.senders: a target's
    # sender_login_maps carries its alias domains' addresses), kept like by_project.
    alias_users: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    # domain -> the domains that hand mail to it (state.aliases.links), kept the same way: the
    # domains whose alias chains a change to it can alter (state.aliases.affected).
    referrers: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    # project id -> its projects/<pp>/<id>.yaml (plan limits, state.limits); projects without limits have none.
    projects: Mapping[int, ProjectFile] = field(default_factory=lambda: MappingProxyType({}))
    # Placement (docs/fleet.md), kept like by_project: node -> the domains it is home to, node ->
    # their mailbox count (enable-email's choice, list-nodes), and the domains in a move
    # (moving_to or moved_from set) -> (home, moving_to, moved_from).
    homes: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    home_boxes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    moves: Mapping[str, tuple[str, str | None, str | None]] = field(default_factory=lambda: MappingProxyType({}))
    # The domains with a replica -> (home, replica) (docs/fleet.md, "Replicas and failover").
    replicas: Mapping[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(
        cls,
        commit: str | None,
        settings: Settings,
        domains: Mapping[str, DomainFile] | DomainMap,
        nodes: NodesFile,
        projects: Mapping[int, ProjectFile] | None = None,
    ) -> Snapshot:
        """A snapshot of `domains` (a DomainMap, possibly of unparsed entries, or any mapping)."""
        dmap = DomainMap.of(domains)
        index: dict[int, set[str]] = {}
        users: dict[str, set[str]] = {}
        for name, project_id, alias_of in dmap.meta_items():
            if project_id is not None:
                index.setdefault(project_id, set()).add(name)
            if alias_of is not None:
                users.setdefault(alias_of, set()).add(name)
        refs: dict[str, set[str]] = {}
        for name, targets in dmap.link_items():
            for target in targets:
                refs.setdefault(target, set()).add(name)
        places = _PlacementIndex({}, {}, {}, {})
        for name, placement in dmap.placement_items():
            places.add(name, placement)
        return cls(
            commit=commit,
            settings=settings,
            domains=dmap,
            nodes=nodes,
            by_project=MappingProxyType({k: frozenset(v) for k, v in index.items()}),
            alias_users=MappingProxyType({k: frozenset(v) for k, v in users.items()}),
            referrers=MappingProxyType({k: frozenset(v) for k, v in refs.items()}),
            projects=MappingProxyType(dict(projects or {})),
            **places.frozen(),
        )

    def with_change(self, commit: str, change: Change) -> Snapshot:
        """A new snapshot with `change` applied; copies only the buckets and index entries it touches."""
        old_map = DomainMap.of(self.domains)
        domains = old_map.evolve(change.domains)
        index = dict(self.by_project)
        users = dict(self.alias_users)
        refs = _referrers_after(self.referrers, old_map, change)
        places = _PlacementIndex(dict(self.homes), dict(self.home_boxes), dict(self.moves), dict(self.replicas))
        for name, new in change.domains.items():
            places.remove(name, old_map.placement(name) if name in old_map else NO_PLACEMENT)
            if new is not None:
                places.add(name, placement_of(new))
            # The old value's project and alias target without parsing it (it may be unparsed).
            old_project, old_alias = old_map.meta(name) if name in old_map else (None, None)
            if old_project is not None:
                index[old_project] = index[old_project] - {name}
            if old_alias is not None:
                users[old_alias] = users.get(old_alias, frozenset()) - {name}
            if new is not None and new.alias_of is not None:
                users[new.alias_of] = users.get(new.alias_of, frozenset()) | {name}
            if new is not None and new.project_id is not None:
                index[new.project_id] = index.get(new.project_id, frozenset()) | {name}
        snap = Snapshot(
            commit=commit,
            settings=change.settings or self.settings,
            domains=domains,
            nodes=change.nodes or self.nodes,
            by_project=MappingProxyType({k: v for k, v in index.items() if v}),
            alias_users=MappingProxyType({k: v for k, v in users.items() if v}),
            referrers=MappingProxyType({k: v for k, v in refs.items() if v}),
            projects=self.projects if not change.projects else _projects_after(self.projects, change.projects),
            **places.frozen(),
        )
        previous = self.__dict__.get("sorted_domains")
        if previous is not None:
            # Carried over instead of sorted again by the next admin listing: a list copy
            # (~1 ms at 200k names) against a sort (~0.1 s).
            snap.__dict__["sorted_domains"] = _sorted_after(previous, change, domains)
        return snap

    def at(self, commit: str) -> Snapshot:
        """The same state, at `commit` (a write's snapshot made before its commit existed)."""
        snap = dataclasses.replace(self, commit=commit)
        if "sorted_domains" in self.__dict__:
            snap.__dict__["sorted_domains"] = self.__dict__["sorted_domains"]
        return snap

    @functools.cached_property
    def sorted_domains(self) -> list[str]:
        """Every domain name, sorted (what an admin's listing pages through); computed once
        per snapshot, on the first listing that needs it. Callers must not mutate it."""
        return sorted(self.domains)

    def node(self, name: str) -> Node | None:
        return self.nodes.nodes.get(name)


def _projects_after(
    projects: Mapping[int, ProjectFile], changed: Mapping[int, ProjectFile | None]
) -> Mapping[int, ProjectFile]:
    out = dict(projects)
    for project_id, new in changed.items():
        if new is None:
            out.pop(project_id, None)
        else:
            out[project_id] = new
    return MappingProxyType(out)


@dataclass
class _PlacementIndex:
    """The placement index being built or updated (Snapshot.homes, home_boxes, moves, replicas)."""

    homes: dict[str, frozenset[str]]
    boxes: dict[str, int]
    moves: dict[str, tuple[str, str | None, str | None]]
    replicas: dict[str, tuple[str, str]]

    def add(self, name: str, placement: Placement) -> None:
        home, moving_to, moved_from, replica, count = placement
        if home is None:
            return
        self.homes[home] = self.homes.get(home, frozenset()) | {name}
        self.boxes[home] = self.boxes.get(home, 0) + count
        if moving_to is not None or moved_from is not None:
            self.moves[name] = (home, moving_to, moved_from)
        if replica is not None:
            self.replicas[name] = (home, replica)

    def remove(self, name: str, placement: Placement) -> None:
        home, _, _, _, count = placement
        if home is None:
            return
        self.homes[home] = self.homes.get(home, frozenset()) - {name}
        self.boxes[home] = self.boxes.get(home, 0) - count
        self.moves.pop(name, None)
        self.replicas.pop(name, None)

    def frozen(self) -> dict[str, Any]:
        return {
            "homes": MappingProxyType({k: v for k, v in self.homes.items() if v}),
            "home_boxes": MappingProxyType({k: v for k, v in self.boxes.items() if self.homes.get(k)}),
            "moves": MappingProxyType(dict(self.moves)),
            "replicas": MappingProxyType(dict(self.replicas)),
        }


@dataclass
class Change:
    """What a write operation changes: new domain files (None deletes), new nodes.yaml, new
    mailstate.yaml, and/or new project files (None deletes)."""

    domains: dict[str, DomainFile | None] = field(default_factory=dict)
    nodes: NodesFile | None = None
    settings: Settings | None = None
    projects: dict[int, ProjectFile | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.domains) or self.nodes is not None or self.settings is not None or bool(self.projects)


@dataclass
class Outcome:
    """An operation's answer: the result body, and the change to commit (None: nothing)."""

    result: dict[str, Any]
    change: Change | None = None
    target: str = ""
    project: int | None = None
    created: bool = False


def _referrers_after(
    referrers: Mapping[str, frozenset[str]], old_map: DomainMap, change: Change
) -> dict[str, frozenset[str]]:
    """`referrers` with the links of the domains `change` writes moved from their old values to the new."""
    refs = dict(referrers)
    for name, new in change.domains.items():
        old_links = old_map.links_of(name) if name in old_map else frozenset()
        new_links = links(new) if new is not None else frozenset()
        for target in old_links - new_links:
            refs[target] = refs.get(target, frozenset()) - {name}
        for target in new_links - old_links:
            refs[target] = refs.get(target, frozenset()) | {name}
    return refs


def _sorted_after(previous: list[str], change: Change, domains: Mapping[str, Any]) -> list[str]:
    """The sorted domain names `previous` with the domains `change` adds or removes."""
    names = list(previous)
    for name in change.domains:
        at = bisect.bisect_left(names, name)
        present = at < len(names) and names[at] == name
        if name in domains and not present:
            names.insert(at, name)
        elif name not in domains and present:
            del names[at]
    return names
