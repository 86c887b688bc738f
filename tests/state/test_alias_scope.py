"""The rule on alias chains, at the library level (a real store: real git, signed commits): one
rule for a write, an incoming commit and `mailstate check`, looking at the writer's project only.

* random sequences of alias, mailbox and domain operations by several projects, through a
  store: every write is accepted exactly when the full check of the state it leads to finds
  nothing (hypothesis);
* the rule itself on random states: the incremental check a write and an incoming commit run
  refuses a change exactly when the full check refuses its result, and names only addresses
  of the project it is about (hypothesis);
* a write that lengthens a chain in its middle; a commit from elsewhere gets a write's verdict.

HTTP and MCP: tests/api/test_alias_scope_http.py; real Postfix: tests/e2e/test_alias_loop_postfix.py.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstate.state import aliases as al
from mailstate.state.datadir import init_data_dir, open_store
from mailstate.state.errors import MailstateError
from mailstate.state.load import check_commit
from mailstate.state.models import Settings, parse
from mailstate.state.ops import OPERATIONS, Context
from mailstate.state.signing import Ed25519Signer
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import ADMIN, PASSWORD, FakeClock, make_key

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
             "enable-email", "link-domain", "unlink-domain", "add-domain", "set-filters"]
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
    if kind == "set-filters":  # a filter's redirect is a forwarding that keeps a copy
        targets = draw(st.lists(address, max_size=2, unique=True))
        rules = [
            {"name": f"r{i}", "field": "subject", "op": "contains", "value": "x", "action": "redirect", "target": t}
            for i, t in enumerate(targets)
        ]
        return kind, domain, {"email": email, "filters": rules}
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
    dd = init_data_dir(root / "data", Settings(bcrypt_cost=4), clock=FakeClock(), keygen=make_key)
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
        root = Path(tmp) / "data"
        shutil.copytree(worlds[chain], root, symlinks=True)
        # In process: the store as open_store makes it, minus the ssh-keygen checks of what it reads.
        store = Store(
            root / "state.git", Ed25519Signer(root / "signing_key"), clock=FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
        )
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


@pytest.mark.e2e  # git clone / commit -S / push, as an admin's pull request is made
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
