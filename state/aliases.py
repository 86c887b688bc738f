"""Aliases, forwarding, catch-alls and alias domains: the rules and the loop check.

Where they live (all optional keys of a domain file, so a file without them is unchanged):

* `aliases: {<local> | "@": [destination, ...]}`: `info@domain` → destinations; the key
  `"@"` is the domain's catch-all (`@domain`).
* a mailbox's `forward_to: [destination, ...]` and `keep_copy` (default true).
* `alias_of: <target domain>`: the domain is an alias domain, `x@domain` → `x@target`.

How Postfix resolves an address (virtual(5)): the most specific key wins (`local@domain`,
then `@domain`), and the result is looked up again, recursively, until an address maps to
itself or to nothing. `resolve()` follows exactly that order. The rule on chains
(`domain_problems`, the one function write time, incoming commits and `mailstate check` use)
refuses a chain that comes back to an address already on it (`alias_loop`), one deeper than
MAX_ALIAS_DEPTH hops, or one that fans out to more than MAX_EXPANSION addresses.

A chain is walked inside the project it starts in: a hop into another project's domain ends
it, as an external address would. The verdict on a project's write then depends only on that
project's data and the addresses the caller sent, never on another project's aliases (which
would leak them, and let one project block another's writes). A loop that two projects build
together is ended by Postfix's own limits (a 4.6.0 at SMTP time, never a circling message;
tests/e2e/test_alias_loop_postfix.py runs it through real Postfix).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailstate.state import validate as v
from mailstate.state.errors import Conflict, InvalidInput

CATCH_ALL = "@"
MAX_DESTINATIONS = 50
# A compiled alias line must stay well below the node's 8192-byte line bound (pi-pull verify).
MAX_DESTINATIONS_CHARS = 6000
MAX_ALIAS_DEPTH = 8
MAX_EXPANSION = 500


# models' validators call this module, so it sits below models and reads domain files through
# these read-only views (state.models.DomainFile, Mailbox and Filter match them) rather than
# importing the classes back.
class FilterView(Protocol):
    @property
    def action(self) -> str: ...
    @property
    def target(self) -> str | None: ...


class MailboxView(Protocol):
    @property
    def active(self) -> bool: ...
    @property
    def forward_to(self) -> Sequence[str] | None: ...
    @property
    def filters(self) -> Sequence[FilterView] | None: ...


class DomainView(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def project_id(self) -> int | None: ...
    @property
    def email_enabled(self) -> bool: ...
    @property
    def alias_of(self) -> str | None: ...
    @property
    def mailboxes(self) -> Mapping[str, MailboxView]: ...
    @property
    def aliases(self) -> Mapping[str, Sequence[str]]: ...


def split_address(address: str) -> tuple[str, str]:
    """`local@domain` → (local, domain); `@domain` → ("@", domain)."""
    local, _, domain = address.rpartition("@")
    return (local or CATCH_ALL), domain


def join_address(local: str, domain: str) -> str:
    return f"@{domain}" if local == CATCH_ALL else f"{local}@{domain}"


def normalize_alias_address(value: object, field: str = "address") -> str:
    """An alias address: `local@domain` (the rules of a mailbox address) or `@domain` (catch-all)."""
    if isinstance(value, str) and value.startswith("@") and value.count("@") == 1:
        try:
            return "@" + v.normalize_domain(value[1:], field=field)
        except InvalidInput as exc:
            raise InvalidInput(
                f"The catch-all's domain is invalid: {exc.message}", code="invalid_email", field=field
            ) from exc
    local, domain = v.normalize_email(value, field=field)
    return f"{local}@{domain}"


def normalize_destinations(value: object, field: str = "destinations", *, allow_empty: bool = False) -> list[str]:
    """1..MAX_DESTINATIONS email addresses (0 allowed with `allow_empty`), normalised, no duplicates."""
    if not isinstance(value, (list, tuple)):
        raise InvalidInput("destinations must be a list of email addresses.", code="invalid_destinations", field=field)
    if not value and not allow_empty:
        raise InvalidInput("destinations needs at least one email address.", code="invalid_destinations", field=field)
    if len(value) > MAX_DESTINATIONS:
        raise InvalidInput(
            f"At most {MAX_DESTINATIONS} destinations are allowed; got {len(value)}.",
            code="too_many_destinations",
            field=field,
        )
    out: list[str] = []
    for item in value:
        local, domain = v.normalize_email(item, field=field)
        address = f"{local}@{domain}"
        if address in out:
            raise InvalidInput(f"{address} is listed twice in destinations.", code="invalid_destinations", field=field)
        out.append(address)
    if sum(len(a) + 1 for a in out) > MAX_DESTINATIONS_CHARS:
        raise InvalidInput(
            f"The destinations together are longer than {MAX_DESTINATIONS_CHARS} characters.",
            code="too_many_destinations",
            field=field,
        )
    return out


def onward(forward_to: Sequence[str] | None, redirects: Sequence[str]) -> list[str]:
    """Where a mailbox passes mail on: its forwarding, then its filters' redirects, each once."""
    out = list(forward_to or [])
    out += [r for r in redirects if r not in out]
    return out


def box_onward(box: MailboxView) -> list[str]:
    """A mailbox's onward addresses (`onward`): a Sieve redirect obeys the forwarding rules, so
    the loop and depth checks follow it like a forwarding that keeps a copy (state/owners.py)."""
    redirects = [f.target for f in box.filters or () if f.action == "redirect" and f.target]
    return onward(box.forward_to, redirects) if redirects else list(box.forward_to or [])


def file_problems(dom: DomainView) -> list[str]:
    """The rules one domain file must follow on its own (the loaders and `mailstate check`)."""
    problems: list[str] = []
    for key, dests in dom.aliases.items():
        if key != CATCH_ALL and key in dom.mailboxes:
            problems.append(
                f"aliases.{key}: {key}@{dom.domain} is a mailbox; an address is either a mailbox or an alias"
            )
        if join_address(key, dom.domain) in dests:
            problems.append(f"aliases.{key}: an alias may not deliver to itself")
    for local, box in dom.mailboxes.items():
        if box.forward_to is not None and f"{local}@{dom.domain}" in box.forward_to:
            problems.append(
                f"mailboxes.{local}.forward_to: a mailbox may not forward to itself (keep_copy keeps a copy)"
            )
        if box.filters and f"{local}@{dom.domain}" in box_onward(box)[len(box.forward_to or []) :]:
            problems.append(f"mailboxes.{local}.filters: a filter may not redirect to the mailbox itself")
        if len(box_onward(box)) > MAX_DESTINATIONS:
            problems.append(
                f"mailboxes.{local}: forwarding and filter redirects together name more than {MAX_DESTINATIONS} addresses"
            )
    if dom.alias_of is not None and dom.alias_of == dom.domain:
        problems.append("alias_of: a domain cannot be an alias of itself")
    if dom.alias_of is not None and CATCH_ALL in dom.aliases:
        problems.append(
            "aliases.@: an alias domain sends every other address to its target; it cannot have a catch-all too"
        )
    return problems


# --- the cross-domain rule: chains and alias_of, one function for every path -----------------

_NO_LINKS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Problem:
    """A chain or alias_of that breaks the rules, reported against the domain file it starts in."""

    domain: str
    code: str
    message: str
    target: str

    def error(self) -> Conflict:
        return Conflict(self.message, code=self.code, target=self.target)


def links(dom: DomainView) -> frozenset[str]:
    """The other domains `dom` hands mail to: those of its aliases', catch-all's, forwardings' and
    filter redirects' destinations, and its alias_of target. A chain can only leave `dom` into one of them, so
    these are the edges the snapshot's `referrers` index (state.snapshot) is built from."""
    out = {split_address(d)[1] for dests in dom.aliases.values() for d in dests}
    out.update(
        split_address(d)[1] for box in dom.mailboxes.values() if box.forward_to or box.filters for d in box_onward(box)
    )
    if dom.alias_of is not None:
        out.add(dom.alias_of)
    out.discard(dom.domain)
    return frozenset(out) if out else _NO_LINKS


def project_of(domains: Mapping[str, DomainView], name: str) -> tuple[bool, int | None]:
    """(whether `name` is a domain of the state, its project), without parsing the domain when
    `domains` can tell (a snapshot's DomainMap has `meta`)."""
    meta = getattr(domains, "meta", None)
    if meta is not None:
        try:
            return True, meta(name)[0]
        except KeyError:
            return False, None
    dom = domains.get(name)
    return dom is not None, (dom.project_id if dom is not None else None)


def resolve(domains: Mapping[str, DomainView], address: str, scope: int | None) -> tuple[str, list[str]] | None:
    """What Postfix does with `address`, one step: (the key that matched, its results), or None
    when the chain ends there for the check: a mailbox without forwarding, an unknown or
    external address, or an address of a domain outside `scope` (the project the chain started
    in). Another project's data never decides a verdict on this project's chains; what mail
    does on a loop that two projects build together is Postfix's to end (docs/state-repo.md)."""
    local, domain = split_address(address)
    known, project = project_of(domains, domain)
    if not known or project != scope:
        return None
    dom = domains[domain]
    if not dom.email_enabled:
        return None  # a disabled domain: Postfix relays it like an external one
    if local != CATCH_ALL:
        if local in dom.aliases:
            return address, list(dom.aliases[local])
        box = dom.mailboxes.get(local)
        if box is not None:
            passed_on = box_onward(box) if box.active else []
            if not passed_on:
                return None
            # keep_copy: the mailbox maps to itself too, which ends Postfix's recursion there.
            # A filter's redirect passes a copy on after delivery, like forwarding does.
            return address, passed_on
    if CATCH_ALL in dom.aliases:
        return f"@{domain}", list(dom.aliases[CATCH_ALL])
    if dom.alias_of is not None:
        # `@domain @target` keeps the local part, so each address is its own step.
        return address, [] if local == CATCH_ALL else [f"{local}@{dom.alias_of}"]
    return None


def alias_domain_starts(domains: Mapping[str, DomainView], domain: str, target: str) -> list[str]:
    """Where a loop through the alias domain `domain` → `target` can start: the addresses of
    `domain` whose twin in `target` goes on (an alias, a forwarding), and the target's catch-all."""
    dom = domains.get(target)
    if dom is None:
        return []
    starts = [f"{key}@{domain}" for key in dom.aliases if key != CATCH_ALL]
    starts += [f"{local}@{domain}" for local, box in dom.mailboxes.items() if box.forward_to or box.filters]
    if CATCH_ALL in dom.aliases:
        starts.append(f"@{target}")
    return starts


def chain_starts(domains: Mapping[str, DomainView], name: str) -> list[str]:
    """Every address of domain `name` a chain can start at: its aliases and catch-all, its
    forwarding mailboxes and, for an alias domain, the addresses its target's aliases give it."""
    dom = domains.get(name)
    if dom is None or not dom.email_enabled:
        return []
    starts = [join_address(key, name) for key in dom.aliases]
    starts += [f"{local}@{name}" for local, box in dom.mailboxes.items() if box.forward_to or box.filters]
    if dom.alias_of is not None and project_of(domains, dom.alias_of) == (True, dom.project_id):
        starts += alias_domain_starts(domains, name, dom.alias_of)
    return starts


def chain_problem(domains: Mapping[str, DomainView], start: str, scope: int | None) -> Conflict | None:
    """The first loop (alias_loop), chain deeper than MAX_ALIAS_DEPTH steps or expansion past
    MAX_EXPANSION addresses (alias_chain_too_long) on the chains from `start`, walked inside
    the project `scope` only; None when there is none. Postfix's own virtual_alias_recursion_limit
    and virtual_alias_expansion_limit are 1000: far above both, so Postfix never defers mail
    on a chain that was accepted."""
    expanded = 0

    def walk(address: str, path: tuple[str, ...]) -> Conflict | None:
        nonlocal expanded
        step = resolve(domains, address, scope)
        if step is None:
            return None
        key, results = step
        if key in path:
            chain = " → ".join([*path[path.index(key) :], key])
            return Conflict(f"This would make a loop of aliases: {chain}.", code="alias_loop", target=key)
        if len(path) >= MAX_ALIAS_DEPTH:
            return Conflict(
                f"A chain of aliases from {path[0]} would be longer than {MAX_ALIAS_DEPTH} steps.",
                code="alias_chain_too_long",
                target=path[0],
            )
        for result in results:
            expanded += 1
            if expanded > MAX_EXPANSION:
                first = path[0] if path else key
                return Conflict(
                    f"Mail to {first} would expand to more than {MAX_EXPANSION} addresses.",
                    code="alias_chain_too_long",
                    target=first,
                )
            found = walk(result, (*path, key))
            if found is not None:
                return found
        return None

    return walk(start, ())


def _alias_target_ok(domains: Mapping[str, DomainView], dom: DomainView) -> bool:
    assert dom.alias_of is not None
    if project_of(domains, dom.alias_of) != (True, dom.project_id):
        return False  # absent, or another project's (read no further)
    target = domains[dom.alias_of]
    return target.email_enabled and target.alias_of is None


def domain_problems(domains: Mapping[str, DomainView], name: str) -> list[Problem]:
    """THE cross-domain rule for domain `name` in the state `domains`: its alias_of names an
    email-enabled, non-alias domain of its own project, and no chain from its addresses loops,
    goes deeper than MAX_ALIAS_DEPTH or fans out past MAX_EXPANSION inside its project. Write
    time, incoming commits and `mailstate check` all apply exactly this (state.sync
    change_problems picks the domains a change can affect; a full check takes them all)."""
    dom = domains.get(name)
    if dom is None or not dom.email_enabled:
        return []
    out: list[Problem] = []
    if dom.alias_of is not None and not _alias_target_ok(domains, dom):
        message = (
            f"alias_of: {dom.alias_of} is not an email-enabled domain of the same project "
            "that is not an alias domain itself"
        )
        out.append(Problem(name, "alias_domain_target_invalid", message, name))
    for start in chain_starts(domains, name):
        found = chain_problem(domains, start, dom.project_id)
        if found is not None:
            out.append(Problem(name, found.code, found.message, found.target or name))
            break
    return out


def problems(domains: Mapping[str, DomainView], names: Iterable[str]) -> list[Problem]:
    """domain_problems of each of `names`, in name order."""
    return [p for name in sorted(names) for p in domain_problems(domains, name)]


def affected(
    domains: Mapping[str, DomainView], referrers: Mapping[str, frozenset[str]], changed: Iterable[str]
) -> set[str]:
    """The domains whose verdict a change to the domains `changed` can alter, in the state after
    the change: those still present, and every domain of the same project that hands mail to
    one of them, directly or through others of that project (`referrers`: domain → the domains
    whose `links` name it).

    Why this is enough: a chain's walk reads only the domains it reaches, and leaves its
    project's domains never (resolve ends it there). A walk that reaches no changed domain is
    the walk it was before the change, so its verdict stands; one that reaches a changed
    domain starts in a domain of that domain's project with a path of links to it, which this
    closure follows back. A domain that left a project (deleted, disabled, linked elsewhere)
    only cuts the chains that reached it short, and a shorter chain breaks no rule the longer
    one kept. So on a state that was valid, the state after a change is valid exactly when
    domain_problems finds nothing in these domains (tests/state/test_alias_scope.py checks it)."""
    todo = [name for name in changed if name in domains]
    seen = set(todo)
    while todo:
        name = todo.pop()
        scope = project_of(domains, name)
        for ref in referrers.get(name, ()):
            if ref not in seen and project_of(domains, ref) == scope:
                seen.add(ref)
                todo.append(ref)
    return seen
