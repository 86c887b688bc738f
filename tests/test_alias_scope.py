"""The rule on alias chains: one rule for a write, an incoming commit and `mailstate check`, and
a rule that looks at the writer's own project only.

* Library level, a real store (real git, real signed commits): random sequences of alias,
  mailbox and domain operations by several projects, where every write is accepted exactly
  when the full check of the state it leads to finds nothing (hypothesis); the chain that a
  write lengthens in its middle; a commit from elsewhere gets the verdict a write gets.
* Real `mailstate serve` over HTTP and MCP (the official client): another project's aliases
  never decide a verdict and never appear in an error, for loops and for depth.
* Real Postfix and Dovecot (the bundle's default map layout): what mail does on a loop that
  two projects build together on purpose.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mailstate.compiler.node_bundle import DEFAULT_MAP_BUCKETS
from mailstate.state import aliases as al
from mailstate.state.datadir import init_data_dir, open_store
from mailstate.state.errors import MailstateError
from mailstate.state.load import check_commit
from mailstate.state.models import Settings, parse
from mailstate.state.ops import OPERATIONS, Context
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.conftest import ADMIN, PASSWORD, FakeClock
from tests.fleet import provision_node, start_server_for
from tests.mailnode import MailNode, run_pi_pull, running_mailnode
from tests.server import LiveServer

API = "/v1/email-account"
RULE_CODES = {"alias_loop", "alias_chain_too_long", "alias_domain_target_invalid"}


# --- random sequences: a write is accepted exactly when the full check accepts its result ---------

# Three projects and a domain that belongs to none (an admin's, linked later or not).
DOMAINS = {"a.example": 1, "b.example": 1, "c.example": 2, "d.example": 2, "e.example": 3}
FREE = "f.example"
LOCALS = ["l0", "l1", "l2", "l3", "l4"]
ALL_DOMAINS = [*DOMAINS, FREE]
ADDRESSES = [f"{local}@{d}" for d in ALL_DOMAINS for local in LOCALS] + ["x@ext.example"]


def actor_for(store: Store, domain: str) -> Actor:
    """The domain's own project (an admin for a domain of no project)."""
    dom = store.snapshot.domains.get(domain)
    project = dom.project_id if dom is not None else None
    return Actor.project(project) if project is not None else ADMIN


def _addresses(keys: list[str]) -> st.SearchStrategy[str]:
    """Any address of the universe, or (more often) one that is an alias or forwarding already,
    so that chains grow, and meet, across domains and projects."""
    anything = st.sampled_from(ADDRESSES)
    return st.one_of(anything, st.sampled_from(keys), st.sampled_from(keys)) if keys else anything


def _chain_keys(store: Store) -> list[str]:
    """The addresses that are aliases (catch-alls aside) in the store now."""
    out = []
    for name in ALL_DOMAINS:
        dom = store.snapshot.domains.get(name)
        if dom is not None:
            out += [al.join_address(key, name) for key in dom.aliases if key != "@"]
    return out


@st.composite
def _op(draw: st.DrawFn, keys: list[str]) -> tuple[str, str, dict[str, Any]]:
    """(operation, the domain whose project calls it, request). An alias operation acts on an
    existing alias more often than not, and points at one: chains grow, meet and get cut."""
    address = _addresses(keys)
    dests = st.lists(address, min_size=1, max_size=3, unique=True)
    domain = draw(st.sampled_from(ALL_DOMAINS))
    local = draw(st.sampled_from(LOCALS))
    email = f"{local}@{domain}"
    kind = draw(
        st.sampled_from(
            ["add-alias", "add-alias", "update-alias", "update-alias", "update-alias", "remove-alias", "add-user",
             "remove-user", "set-forwarding", "add-alias-domain", "remove-alias-domain", "disable-email",
             "enable-email", "link-domain", "unlink-domain", "add-domain"]
        )
    )  # fmt: skip
    if kind in ("add-alias", "update-alias", "remove-alias"):
        key = draw(st.sampled_from([*LOCALS, "@"]))
        target = f"@{domain}" if key == "@" else f"{key}@{domain}"
        if kind != "add-alias" and keys and draw(st.booleans()):
            target = draw(st.sampled_from(keys))
            domain = target.partition("@")[2]
        body: dict[str, Any] = {"address": target}
        if kind != "remove-alias":
            body["destinations"] = draw(dests)
        return kind, domain, body
    if kind == "add-user":
        return kind, domain, {"email": email, "password": PASSWORD}
    if kind == "remove-user":
        return kind, domain, {"email": email, "hard_delete": draw(st.booleans())}
    if kind == "set-forwarding":
        forward = draw(st.lists(address, max_size=2, unique=True))
        return kind, domain, {"email": email, "destinations": forward, "keep_copy": draw(st.booleans())}
    if kind == "add-alias-domain":
        return kind, domain, {"domain": domain, "target": draw(st.sampled_from(ALL_DOMAINS))}
    if kind == "link-domain":
        return kind, FREE, {"domain": FREE, "project_id": draw(st.sampled_from([1, 2, 3]))}
    if kind == "add-domain":
        return kind, FREE, {"domain": FREE}
    return kind, domain, {"domain": domain}  # remove-alias-domain, disable-email, enable-email, unlink-domain


def _link(store: Store, project: int, hops: list[str]) -> None:
    """Aliases hops[0] -> hops[1] -> ... -> hops[-1], made from the end."""
    for here, there in reversed(list(itertools.pairwise(hops))):
        store.execute("add-alias", Actor.project(project), {"address": here, "destinations": [there]})


def _world(root: Path, chain: bool) -> Store:
    dd = init_data_dir(root / "data", Settings(bcrypt_cost=4), clock=FakeClock())
    store = open_store(dd.root, clock=FakeClock(datetime(2026, 2, 1, tzinfo=UTC)))
    for domain, project in DOMAINS.items():
        store.execute("link-domain", ADMIN, {"domain": domain, "project_id": project})
        store.execute("enable-email", Actor.project(project), {"domain": domain})
        store.execute("add-user", Actor.project(project), {"email": f"l4@{domain}", "password": PASSWORD})
    store.execute("add-domain", ADMIN, {"domain": FREE})
    if chain:
        # Chains of eight steps, the longest allowed, ending in a mailbox: project 1's hops
        # between its two domains, project 2's runs through one domain, then the other. A
        # write anywhere along them can lengthen them, seen from their start only.
        _link(store, 1, [f"{local}@{d}" for local in LOCALS[:4] for d in ("a.example", "b.example")] + ["l4@a.example"])
        _link(store, 2, [f"m{i}@{d}" for d in ("c.example", "d.example") for i in range(4)] + ["l4@d.example"])
        _link(store, 1, ["s@a.example", "s@b.example", "l4@b.example"])
        _link(store, 2, ["s@c.example", "l4@c.example"])
    return store


def _full_check(domains: Any) -> list[al.Problem]:
    """The cross-domain part of `mailstate check`: every domain of the state, all its chains."""
    return al.problems(domains, list(domains))


def _candidate(store: Store, op: str, actor: Actor, body: dict[str, Any]) -> Any:
    """The state the refused write would have made, or None when the operation itself refuses
    it before any cross-domain rule (e.g. an alias to itself, a target of another project)."""
    operation = OPERATIONS[op]
    placeholders = {"hash": "{BLF-CRYPT}$2b$04$" + "." * 53, "id_random": "000000"}
    ctx = Context(state=store.snapshot, actor=actor, now=store.clock(), node_status=lambda _name: None)
    try:
        outcome = operation.apply(ctx, parse(operation.request, body), placeholders)
    except MailstateError:
        return None
    assert outcome.change, f"{op} {body} was refused although it changes nothing"
    return store.snapshot.with_change("candidate", outcome.change)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The two starting worlds (without and with the long chain), built once; each example
    works on a copy of one (a data dir is only files)."""
    return {chain: _world(tmp_path_factory.mktemp(f"world-{chain}"), chain).git.path.parent for chain in (False, True)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(chain=st.booleans(), steps=st.integers(min_value=1, max_value=20), data=st.data())
def test_a_write_is_accepted_exactly_when_the_full_check_accepts_its_result(
    worlds: dict[bool, Path], chain: bool, steps: int, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory(prefix="alias-scope-") as tmp:
        shutil.copytree(worlds[chain], Path(tmp) / "data", symlinks=True)
        store = open_store(Path(tmp) / "data", clock=FakeClock(datetime(2026, 3, 1, tzinfo=UTC)))
        for _ in range(steps):
            op, domain, body = data.draw(_op(_chain_keys(store)))
            actor = actor_for(store, domain)
            try:
                out = store.execute(op, actor, body)
            except MailstateError as exc:
                if exc.code in RULE_CODES:
                    candidate = _candidate(store, op, actor, body)
                    if candidate is not None:
                        assert _full_check(candidate.domains), f"{op} {body} refused ({exc.message}), check passes"
                continue
            commit = out.result.get("commit")
            if commit:
                # What `mailstate check` runs on the commit: schema, cross-domain rule, rendered/.
                assert check_commit(store.git, commit) == [], f"{op} {body} accepted, check fails"


# --- the incremental check is the full check: the rule itself, on random states ------------------

_NAMES = ["a.example", "b.example", "c.example", "d.example", "e.example"]
_LOCAL = ["p", "q", "r", "s", "t", "u"]
_ADDR = [f"{local}@{d}" for d in _NAMES for local in _LOCAL] + ["x@ext.example"]
_HASH = "{BLF-CRYPT}$2b$04$" + "." * 53
_Boxes = dict[str, tuple[list[str] | None, bool, bool]]  # local -> (forward_to, keep_copy, active)


def _build(
    name: str, project: int | None, enabled: bool, alias_of: str | None, aliases: dict[str, list[str]], boxes: _Boxes
) -> Any:
    """A DomainFile that passes the schema (file rules included), or None when it would not."""
    from pydantic import ValidationError

    from mailstate.state.models import DomainFile, Mailbox

    try:
        mailboxes = {
            local: Mailbox(password=_HASH, quota_mb=10, active=active, forward_to=fwd, keep_copy=keep if fwd else True)
            for local, (fwd, keep, active) in boxes.items()
            if local not in aliases
        }
        return DomainFile(
            domain=name, project_id=project, email_enabled=enabled, alias_of=alias_of, mailboxes=mailboxes,
            aliases=aliases,
        )  # fmt: skip
    except ValidationError:
        return None  # e.g. an alias to itself: the schema refuses the file itself


_dests = st.lists(st.sampled_from(_ADDR), min_size=1, max_size=3, unique=True)
_boxes = st.dictionaries(
    st.sampled_from(_LOCAL),
    st.tuples(
        st.one_of(st.none(), st.lists(st.sampled_from(_ADDR), min_size=1, max_size=2, unique=True)),
        st.booleans(),
        st.integers(0, 4).map(bool),
    ),
    max_size=3,
)


@st.composite
def _state(draw: st.DrawFn) -> dict[str, Any]:
    """A random state: two chains of four to six steps through project 1's domains (pointing
    one at the other passes the limit of eight), other aliases (half of them straight out of
    the state), catch-alls, forwarding, alias domains, domains of projects 1, 2 or none."""
    aliases: dict[str, dict[str, list[str]]] = {name: {} for name in _NAMES}
    projects = {name: 1 for name in _NAMES[:3]} | {name: draw(st.sampled_from([None, 1, 2])) for name in _NAMES[3:]}
    hops = draw(st.lists(st.sampled_from(_ADDR[: 3 * len(_LOCAL)]), min_size=10, max_size=14, unique=True))
    cut = draw(st.integers(5, len(hops) - 5))
    chains = set()
    for run in (hops[:cut], hops[cut:]):
        for here, there in itertools.pairwise(run):
            local, _, name = here.partition("@")
            aliases[name][local] = [there]
            chains.add(here)
    others = st.one_of(_dests, st.just(["x@ext.example"]))
    for name in _NAMES:
        for key, dests in draw(st.dictionaries(st.sampled_from([*_LOCAL, "@"]), others, max_size=2)).items():
            if al.join_address(key, name) not in chains:
                aliases[name][key] = dests
    out = {}
    for name in _NAMES:
        alias_of = draw(st.sampled_from([*[None] * 20, *_NAMES]))
        dom = _build(name, projects[name], draw(st.integers(0, 9)) > 0, alias_of, aliases[name], draw(_boxes))
        if dom is not None:
            out[name] = dom
    return out


@dataclass(frozen=True)
class _Places:
    """Where chains are in a state: every alias address, those whose destinations hold no
    alias (a chain ends there), those no alias points at (a chain starts there)."""

    keys: list[str]
    ends: list[str]
    starts: list[str]

    @classmethod
    def of(cls, domains: dict[str, Any]) -> _Places:
        pairs = [(f"{k}@{d.domain}", v) for d in domains.values() for k, v in d.aliases.items() if k != "@"]
        keys = [key for key, _ in pairs]
        pointed = {dest for _, dests in pairs for dest in dests}
        ends = [key for key, dests in pairs if not set(keys) & set(dests)]
        return cls(keys, ends, [key for key in keys if key not in pointed])


def _boxes_of(dom: Any) -> _Boxes:
    return {k: (b.forward_to, b.keep_copy, b.active) for k, b in dom.mailboxes.items()}


@st.composite
def _retarget(draw: st.DrawFn, base: dict[str, Any], places: _Places) -> tuple[str, Any]:
    """The write that matters most: an alias along a chain (most often where one ends) pointed
    elsewhere (most often where another starts, which joins two chains into one)."""
    local, _, name = draw(st.sampled_from(places.ends or places.keys)).partition("@")
    if draw(st.booleans()):
        local, _, name = draw(st.sampled_from(places.keys)).partition("@")
    old = base[name]
    spots = [*places.starts, *places.starts, *places.keys, *places.ends, "x@ext.example"]
    onto = draw(st.lists(st.sampled_from(spots), min_size=1, max_size=2, unique=True))
    return name, _build(
        name, old.project_id, old.email_enabled, old.alias_of, {**old.aliases, local: onto}, _boxes_of(old)
    )


@st.composite
def _changed(draw: st.DrawFn, old: Any, name: str) -> Any:
    """Anything else a write or a pull request may do to one domain file: add, retarget or drop
    an alias or catch-all, move the domain to another project, turn email off, make it an
    alias domain, delete it, replace it."""
    if old is None or draw(st.integers(0, 5)) == 0:
        if draw(st.booleans()):
            return None
        fresh = draw(st.dictionaries(st.sampled_from([*_LOCAL, "@"]), _dests, max_size=3))
        return _build(name, draw(st.sampled_from([None, 1, 2])), True, None, fresh, draw(_boxes))
    aliases = dict(old.aliases)
    project, enabled, alias_of = old.project_id, old.email_enabled, old.alias_of
    how = draw(st.sampled_from(["retarget", "drop", "project", "disable", "alias_of"]))
    if how == "retarget":
        aliases[draw(st.sampled_from([*_LOCAL, "@"]))] = draw(_dests)
    elif how == "drop" and aliases:
        aliases.pop(draw(st.sampled_from(sorted(aliases))))
    elif how == "project":
        project = draw(st.sampled_from([None, 1, 2]))
    elif how == "disable":
        enabled = not enabled
    else:
        alias_of = draw(st.one_of(st.none(), st.sampled_from(_NAMES)))
    return _build(name, project, enabled, alias_of, aliases, _boxes_of(old))


def _snapshot(domains: dict[str, Any]) -> Any:
    from mailstate.state.models import NodesFile
    from mailstate.state.snapshot import Snapshot

    return Snapshot.build("base", Settings(), domains, NodesFile())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=_state(), data=st.data())
def test_the_incremental_check_finds_a_problem_exactly_when_the_full_check_does(
    base: dict[str, Any], data: st.DataObject
) -> None:
    """On a valid state, change_problems (what a write and an incoming commit run) refuses a
    change exactly when the rule over every domain (`mailstate check`) refuses its result; and
    whatever it reports names only addresses of the project it is about."""
    from hypothesis import assume

    from mailstate.state.snapshot import Change
    from mailstate.state.sync import change_problems

    before = _snapshot(base)
    assume(_full_check(before.domains) == [])
    places = _Places.of(base)
    if places.keys and data.draw(st.booleans()):
        name, new = data.draw(_retarget(base, places))
        change = Change(domains={name: new})
    else:
        changed = data.draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=2, unique=True))
        change = Change(domains={name: data.draw(_changed(base.get(name), name)) for name in changed})
    after = before.with_change("after", change)
    full = _full_check(after.domains)
    incremental = change_problems(before, after, change)
    assert bool(incremental) == bool(full), (incremental, full)
    for problem in incremental:
        project = after.domains[problem.domain].project_id
        for word in problem.message.replace(",", " ").rstrip(".").split():
            if "@" in word:
                where = word.rpartition("@")[2]
                assert where in after.domains and after.domains[where].project_id == project, problem


def test_a_write_that_lengthens_the_middle_of_a_chain_is_refused(tmp_path: Path) -> None:
    """The chain starts elsewhere in the project; the write is at its middle."""
    store = _world(tmp_path, chain=True)
    p1 = Actor.project(1)
    store.execute("add-alias", p1, {"address": "hop@a.example", "destinations": ["l4@a.example"]})
    before = store.head
    with pytest.raises(MailstateError) as info:
        store.execute("update-alias", p1, {"address": "l3@b.example", "destinations": ["hop@a.example"]})
    assert info.value.code == "alias_chain_too_long" and "l0@a.example" in info.value.message
    assert store.head == before
    assert check_commit(store.git, store.head) == []


def test_a_mailbox_removed_under_a_catch_all_can_close_a_loop(tmp_path: Path) -> None:
    """The removed address now falls to the catch-all, which leads back to it."""
    store = _world(tmp_path, chain=False)
    p2 = Actor.project(2)
    store.execute("add-user", p2, {"email": "t@c.example", "password": PASSWORD})
    store.execute("add-alias", p2, {"address": "hop@d.example", "destinations": ["t@c.example"]})
    store.execute("add-alias", p2, {"address": "@c.example", "destinations": ["hop@d.example"]})
    with pytest.raises(MailstateError) as info:
        store.execute("remove-user", p2, {"email": "t@c.example", "hard_delete": True})
    assert info.value.code == "alias_loop"


# --- a commit from elsewhere gets the verdict a write gets ----------------------------------------


def _pull_request(store: Store, tmp: Path, edit: dict[str, dict[str, list[str]]]) -> str:
    """A commit made outside the API (an admin's pull request, signed by the data dir's key),
    setting the aliases of some domain files; rendered/ recompiled. Returns its sha."""
    from mailstate.api.cli import main

    work = tmp / f"pr-{len(list(tmp.glob('pr-*')))}"
    subprocess.run(["git", "clone", "-q", str(store.git.path), str(work)], check=True)
    for domain, entries in edit.items():
        path = work / f"domains/{domain[:2]}/{domain}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["aliases"] = {**(doc.get("aliases") or {}), **entries}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["compile", str(work)]) == 0
    key = store.git.path.parent / "signing_key"
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "-c", "user.name=a", "-c", "user.email=a@x", "commit", "-q", "-S", "-m", "pr"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:refs/pr/x", "--force"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_an_incoming_commit_gets_the_verdict_of_a_write(tmp_path: Path) -> None:
    from mailstate.api.cli import main

    store = _world(tmp_path, chain=False)
    store.execute("add-alias", Actor.project(2), {"address": "loop@c.example", "destinations": ["back@a.example"]})
    # Project 1's half of a loop through project 2: its own chain ends at c.example.
    sha = _pull_request(store, tmp_path, {"a.example": {"back": ["loop@c.example"]}})
    verdict = validate_incoming(store.git, store.snapshot, sha)
    assert verdict.ok, verdict.problems
    assert main(["check", str(tmp_path / "pr-0")]) == 0
    assert store.execute(
        "add-alias", Actor.project(1), {"address": "back@a.example", "destinations": ["loop@c.example"]}
    )
    # A loop inside project 1 (two of its domains): refused by all three, with the same message.
    store.execute("remove-alias", Actor.project(1), {"address": "back@a.example"})
    store.execute("add-alias", Actor.project(1), {"address": "one@a.example", "destinations": ["two@b.example"]})
    sha = _pull_request(store, tmp_path, {"b.example": {"two": ["one@a.example"]}})
    verdict = validate_incoming(store.git, store.snapshot, sha)
    with pytest.raises(MailstateError) as info:
        store.execute("add-alias", Actor.project(1), {"address": "two@b.example", "destinations": ["one@a.example"]})
    assert info.value.code == "alias_loop"
    assert not verdict.ok and any(info.value.message in p for p in verdict.problems), verdict.problems
    assert main(["check", str(tmp_path / "pr-1")]) == 1


# --- through the API: another project's aliases never decide a verdict, never show --------------


@dataclass
class Projects:
    """A live `mailstate serve` with clients for projects 42 and 43 and their admin."""

    server: LiveServer
    admin: httpx.Client
    p42: httpx.Client
    p43: httpx.Client
    tokens: dict[int, str]

    def domains(self, prefix: str) -> tuple[str, str]:
        """(project 42's domain, project 43's domain), linked and email-enabled, 43's with a mailbox."""
        mine, theirs = f"{prefix}.p42.example", f"{prefix}.p43.example"
        for domain, project, client in ((mine, 42, self.p42), (theirs, 43, self.p43)):
            r = self.admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project})
            assert r.status_code == 201, r.text
            assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
        r = self.p43.post(f"{API}/add-user", json={"email": f"info@{theirs}", "password": PASSWORD})
        assert r.status_code == 201, r.text
        return mine, theirs

    def alias(self, client: httpx.Client, address: str, destinations: list[str]) -> httpx.Response:
        return client.post(f"{API}/add-alias", json={"address": address, "destinations": destinations})


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Projects]:
    server = LiveServer(tmp_path_factory.mktemp("scope"))
    server.start()
    tokens = {p: server.create_token(project=p, name=f"p{p}") for p in (42, 43)}
    with server.client(server.admin_token) as admin, server.client(tokens[42]) as p42, server.client(tokens[43]) as p43:
        try:
            yield Projects(server, admin, p42, p43, tokens)
        finally:
            server.stop()


def test_another_projects_loop_is_not_a_verdict_nor_shown_over_http(projects: Projects) -> None:
    s = projects
    mine, theirs = s.domains("loop")
    # Project 43's half of a loop, and project 42's: 42's chain ends where it enters 43's domain.
    assert s.alias(s.p43, f"loop@{theirs}", [f"back@{mine}"]).status_code == 201
    r = s.alias(s.p42, f"back@{mine}", [f"loop@{theirs}"])
    assert r.status_code == 201, r.text
    # The same answer as for an address of 43's that leads nowhere: nothing to learn from it.
    assert s.alias(s.p42, f"back2@{mine}", [f"nothing@{theirs}"]).status_code == 201
    # 42's own loop is refused still, and its message names 42's addresses only.
    assert s.alias(s.p42, f"a@{mine}", [f"loop@{theirs}", f"b@{mine}"]).status_code == 201
    r = s.alias(s.p42, f"b@{mine}", [f"a@{mine}"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_loop", r.text
    assert f"a@{mine}" in r.text and theirs not in r.text, r.text
    # Project 43 closing a loop through 42's aliases gets the same: 42's data decides nothing.
    assert s.alias(s.p43, f"back@{theirs}", [f"a@{mine}"]).status_code == 201


def test_another_projects_chain_depth_is_not_a_verdict_nor_shown_over_http(projects: Projects) -> None:
    s = projects
    mine, theirs = s.domains("depth")
    # Eight steps in 43's domain, the most a chain may have.
    for i in range(8, 0, -1):
        target = f"y{i + 1}@{theirs}" if i < 8 else f"info@{theirs}"
        assert s.alias(s.p43, f"y{i}@{theirs}", [target]).status_code == 201
    r = s.alias(s.p42, f"z@{mine}", [f"y1@{theirs}"])
    assert r.status_code == 201, r.text  # 42's chain is one step long: it ends at 43's domain
    # 42's own chain of eight through the hop into 43, then a ninth step of its own: refused,
    # with a message about 42's address only.
    for i in range(8, 0, -1):
        target = f"w{i + 1}@{mine}" if i < 8 else f"y1@{theirs}"
        assert s.alias(s.p42, f"w{i}@{mine}", [target]).status_code == 201
    r = s.alias(s.p42, f"top@{mine}", [f"w1@{mine}"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_chain_too_long", r.text
    assert f"top@{mine}" in r.text and theirs not in r.text, r.text


@asynccontextmanager
async def _mcp(server: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    """The official MCP client over streamable HTTP at /mcp, as project `token`."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        streamable_http_client(f"{server.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def test_mcp_tools_get_the_same_verdicts(projects: Projects) -> None:
    """The tools call the same operation: loop and depth through another project are no verdict,
    and the project's own loop is refused with its own addresses only."""
    s = projects
    mine, theirs = s.domains("mcp")
    assert s.alias(s.p43, f"loop@{theirs}", [f"back@{mine}"]).status_code == 201
    for i in range(8, 0, -1):
        target = f"y{i + 1}@{theirs}" if i < 8 else f"info@{theirs}"
        assert s.alias(s.p43, f"y{i}@{theirs}", [target]).status_code == 201

    async def calls() -> list[tuple[bool, dict[str, Any]]]:
        out = []
        async with _mcp(s.server, s.tokens[42]) as session:
            for address, dests in (
                (f"back@{mine}", [f"loop@{theirs}"]),
                (f"z@{mine}", [f"y1@{theirs}"]),
                (f"a@{mine}", [f"back@{mine}"]),
                (f"loop2@{mine}", [f"a@{mine}"]),
            ):
                result = await session.call_tool("email_account_add_alias", {"address": address, "destinations": dests})
                out.append((bool(result.is_error), json.loads(result.content[0].text)))  # type: ignore[union-attr]
            # a -> back -> (43's loop@, where 42's chain ends): fine; now close 42's own loop.
            result = await session.call_tool(
                "email_account_update_alias", {"address": f"back@{mine}", "destinations": [f"loop2@{mine}"]}
            )
            out.append((bool(result.is_error), json.loads(result.content[0].text)))  # type: ignore[union-attr]
        return out

    results = anyio.run(calls)
    assert [error for error, _ in results] == [False, False, False, False, True], results
    body = results[-1][1]
    assert body["error"]["code"] == "alias_loop" and theirs not in json.dumps(body), body


# --- real Postfix: a loop that two projects build together on purpose -----------------------------


def _queue_empty(node: MailNode) -> bool:
    out = subprocess.run(["postqueue", "-c", str(node.postfix_dir), "-p"], capture_output=True, text=True).stdout
    return "Mail queue is empty" in out


def _send(node: MailNode, to: str, subject: str, *, hops: int = 0) -> tuple[int, str]:
    """Send one message from outside (port 25); (250, ...) when queued, else the refusal."""
    received = "".join(
        f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for i in range(hops)
    )
    msg = f"{received}From: sender@client.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    with contextlib.closing(node.smtp()) as s:
        try:
            s.sendmail("sender@client.test", [to], msg)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        return 250, "queued"


@pytest.mark.e2e
def test_a_loop_two_projects_build_ends_at_once_and_never_circles(tmp_path: Path) -> None:
    """Real Postfix and Dovecot with the bundle's default map layout (16 tables a map), fed by
    `mailstate serve` and pi-pull. Project 42's back@ goes to project 43's loop@, which goes
    back: each half was accepted (each project's own chain ends at the other's domain).

    Postfix expands virtual aliases in cleanup, before a message is queued: at its recursion
    limit (virtual_alias_recursion_limit, 1000) it gives up with 451 4.6.0 "Alias expansion
    error" in the same SMTP session. The message is never queued, delivered or relayed, so it
    cannot circle on the node; the sending server bounces it after its own retries (Postfix has
    no setting that makes this error permanent). A loop that leaves the node and comes back
    through other servers ends at Postfix's hop count (hopcount_limit, 50 Received: headers)
    with a 5xx, which the sender bounces at once. The defaults do both: main.cf sets neither."""
    with running_mailnode(map_buckets=DEFAULT_MAP_BUCKETS) as node:
        server, admin, p42 = start_server_for(node, tmp_path / "server")
        p43 = server.client(server.create_token(project=43, name="p43"))
        try:
            cfg = provision_node(node, server, admin, tmp_path / "etc")
            for domain, project, client in (("a.example", 42, p42), ("b.example", 43, p43)):
                assert (
                    admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code == 201
                )
                assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
            r = p42.post(f"{API}/add-user", json={"email": "keep@a.example", "password": PASSWORD})
            assert r.status_code == 201, r.text
            for client, address, dest in (
                (p42, "back@a.example", "loop@b.example"),
                (p43, "loop@b.example", "back@a.example"),
            ):
                r = client.post(f"{API}/add-alias", json={"address": address, "destinations": [dest]})
                assert r.status_code == 201, r.text
            tick = run_pi_pull(cfg, "--once")
            assert tick.returncode == 0, tick.stderr

            code, text = _send(node, "back@a.example", "round-and-round")
            assert code == 451 and "4.6.0" in text, (code, text)
            assert "unreasonable virtual_alias_maps map nesting for back@a.example" in node.postfix_log()
            assert _queue_empty(node)
            time.sleep(2)  # a queue run or two later, still nothing anywhere
            assert _queue_empty(node) and node.sink is not None and node.sink.messages == []

            # Mail to the mailbox beside the loop is delivered as ever.
            assert _send(node, "keep@a.example", "beside-the-loop")[0] == 250
            node.wait_for_message("keep@a.example", PASSWORD, "beside-the-loop")

            # A loop that leaves the node (an alias to an outside address that sends it back) adds
            # a Received: header a pass: at the 51st, Postfix answers 5xx and the sender bounces it.
            r = p42.post(f"{API}/add-alias", json={"address": "away@a.example", "destinations": ["far@internet.test"]})
            assert r.status_code == 201, r.text
            assert run_pi_pull(cfg, "--once").returncode == 0
            assert _send(node, "away@a.example", "first-pass")[0] == 250
            node.wait_sink("first-pass")
            code, text = _send(node, "away@a.example", "fifty-passes-later", hops=50)
            assert code // 100 == 5 and "hops" in text, (code, text)
            assert _queue_empty(node)
        finally:
            for client in (admin, p42, p43):
                client.close()
            server.stop()
