"""Aliases, forwarding, catch-alls and alias domains: the rules and the loop check.

Where they live (all optional keys of a domain file, so a file without them is unchanged):

* `aliases: {<local> | "@": [destination, ...]}`: `info@domain` → destinations; the key
  `"@"` is the domain's catch-all (`@domain`).
* a mailbox's `forward_to: [destination, ...]` and `keep_copy` (default true).
* `alias_of: <target domain>`: the domain is an alias domain, `x@domain` → `x@target`.

How Postfix resolves an address (virtual(5)): the most specific key wins (`local@domain`,
then `@domain`), and the result is looked up again, recursively, until an address maps to
itself or to nothing. `resolve()` follows exactly that order; `check_chains()` walks it from
the addresses a write touches and refuses a chain that comes back to an address already on it
(`alias_loop`), one deeper than MAX_ALIAS_DEPTH hops, or one that fans out to more than
MAX_EXPANSION addresses (Postfix's own virtual_alias_expansion_limit is 1000 and its
recursion limit 1000: we stay far below both, so Postfix never bounces a chain we accepted).
The walk only reads the domains a chain reaches, never the whole state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mailstate.state import validate as v
from mailstate.state.errors import Conflict, InvalidInput

if TYPE_CHECKING:  # models imports this module for its validators
    from mailstate.state.models import DomainFile, Mailbox

CATCH_ALL = "@"
MAX_DESTINATIONS = 50
# A compiled alias line must stay well below the node's 8192-byte line bound (pi-pull verify).
MAX_DESTINATIONS_CHARS = 6000
MAX_ALIAS_DEPTH = 8
MAX_EXPANSION = 500


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


def box_onward(box: Mailbox) -> list[str]:
    """A mailbox's onward addresses (`onward`): a Sieve redirect obeys the forwarding rules, so
    the loop and depth checks follow it like a forwarding that keeps a copy (state/owners.py)."""
    redirects = [f.target for f in box.filters or () if f.action == "redirect" and f.target]
    return onward(box.forward_to, redirects) if redirects else list(box.forward_to or [])


def file_problems(dom: DomainFile) -> list[str]:
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


def alias_lines(dom: DomainFile) -> list[tuple[str, list[str]]]:
    """The domain's virtual_alias_maps entries (key, results), in the order the compiler writes
    them: the `@domain` wildcard first, then by local part.

    The catch-all trap: Postfix tries `local@domain` before `@domain`, and an address that is
    not a key at all falls to `@domain`, mailboxes included. So while the domain has a wildcard
    (a catch-all or alias_of), every mailbox maps to itself (a soft-deleted one too: its mail
    is refused by delivery, never handed to the catch-all). Forwarding maps a mailbox to its
    destinations (and to itself with keep_copy); a soft-deleted mailbox forwards nothing.
    """
    wildcard = CATCH_ALL in dom.aliases or dom.alias_of is not None
    entries: dict[str, list[str]] = {}
    for local, box in dom.mailboxes.items():
        own = f"{local}@{dom.domain}"
        if box.active and box.forward_to:
            entries[local] = ([own] if box.keep_copy else []) + list(box.forward_to)
        elif wildcard:
            entries[local] = [own]
    for key, dests in dom.aliases.items():
        if key != CATCH_ALL:
            entries[key] = list(dests)
    lines = [(f"{local}@{dom.domain}", entries[local]) for local in sorted(entries)]
    if CATCH_ALL in dom.aliases:
        lines.insert(0, (f"@{dom.domain}", list(dom.aliases[CATCH_ALL])))
    elif dom.alias_of is not None:
        lines.insert(0, (f"@{dom.domain}", [f"@{dom.alias_of}"]))
    return lines


def resolve(domains: Mapping[str, DomainFile], address: str) -> tuple[str, list[str]] | None:
    """What Postfix does with `address`, one step: (the key that matched, its results), or None
    when the address is final (a mailbox without forwarding, external, or unknown)."""
    local, domain = split_address(address)
    dom = domains.get(domain)
    if dom is None or not dom.email_enabled:
        return None  # external (or a disabled domain, which Postfix relays like an external one)
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


def alias_domain_starts(domains: Mapping[str, DomainFile], domain: str, target: str) -> list[str]:
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


def check_chains(domains: Mapping[str, DomainFile], starts: Sequence[str]) -> None:
    """Refuse (409 alias_loop, alias_chain_too_long) any chain from `starts` that loops or grows
    past MAX_ALIAS_DEPTH / MAX_EXPANSION in the state `domains` (the state after the write)."""
    expanded = 0

    def walk(address: str, path: tuple[str, ...]) -> None:
        nonlocal expanded
        step = resolve(domains, address)
        if step is None:
            return
        key, results = step
        if key in path:
            chain = " → ".join([*path[path.index(key) :], key])
            raise Conflict(f"This would make a loop of aliases: {chain}.", code="alias_loop", target=key)
        if len(path) >= MAX_ALIAS_DEPTH:
            raise Conflict(
                f"A chain of aliases from {path[0]} would be longer than {MAX_ALIAS_DEPTH} steps.",
                code="alias_chain_too_long",
                target=path[0],
            )
        for result in results:
            expanded += 1
            if expanded > MAX_EXPANSION:
                raise Conflict(
                    f"Mail to {path[0] if path else key} would expand to more than {MAX_EXPANSION} addresses.",
                    code="alias_chain_too_long",
                    target=path[0] if path else key,
                )
            walk(result, (*path, key))

    for start in starts:
        expanded = 0
        walk(start, ())


def state_problems(domains: Mapping[str, DomainFile], names: Sequence[str]) -> list[str]:
    """What the domains `names` break across the state (a pull request, an incoming commit):
    an alias_of that is not another enabled, non-alias domain of the same project, and chains
    from their aliases, catch-all and forwarding that loop or grow too long."""
    from mailstate.state.files import domain_path

    problems: list[str] = []
    for name in sorted(names):
        dom = domains.get(name)
        if dom is None or not dom.email_enabled:
            continue
        if dom.alias_of is not None:
            target = domains.get(dom.alias_of)
            if (
                target is None
                or not target.email_enabled
                or target.alias_of is not None
                or target.project_id != dom.project_id
            ):
                problems.append(
                    f"{domain_path(name)}: alias_of: {dom.alias_of} is not an email-enabled domain of the same project that is not an alias domain itself"
                )
        starts = [join_address(key, name) for key in dom.aliases]
        starts += [f"{local}@{name}" for local, box in dom.mailboxes.items() if box.forward_to or box.filters]
        if dom.alias_of is not None:
            starts += alias_domain_starts(domains, name, dom.alias_of)
        try:
            check_chains(domains, starts)
        except Conflict as exc:
            problems.append(f"{domain_path(name)}: {exc.message}")
    return problems
