"""The entries of the Postfix maps the compiler renders, one list of (key, values) per domain:
``alias_lines`` (virtual_alias_maps) and ``sender_lines`` (smtpd_sender_login_maps). The rules
they apply are read from the schema (state.aliases); the templates in templates/rendered/ write
the lines out, and pi-pull reads them back (pipull/aliasmap.py, pipull/sendermap.py).

Sender ownership: which SASL logins may send as which address (Postfix smtpd_sender_login_maps).

A login is a mailbox address (Dovecot's passwd-files). The submission services refuse with a
5xx (``reject_sender_login_mismatch``) any MAIL FROM that the login does not own:

* an active mailbox owns itself; a soft-deleted one owns nothing (and cannot log in);
* an alias is owned by the mailboxes it delivers to: its destinations in its own domain are
  followed through that domain's aliases (the in-domain part of ``state.aliases.resolve``) to
  the active mailboxes they end at; a destination in another domain is listed as it is, so
  that address owns the alias when it is a mailbox login (a chain through another domain's
  aliases gives no rights: the fragment depends on its own domain only, so a change elsewhere
  can never leave it granting rights it should not);
* forwarding passes mail on, not sender rights: ``forward_to`` grants nothing, and an alias
  that reaches a mailbox stops there;
* a catch-all gives NO sender rights: it would let a login send as every address of the
  domain, including ones that do not exist (and so make up addresses no one else may claim);
* an alias domain A of T (``alias_of``): ``x@A`` is owned like ``x@T`` unless A has its own
  ``x``. These lines are in T's fragment (``alias_domains``), so a change in T re-renders only
  T's fragment, and add-/remove-alias-domain re-render T.

``sender_lines()`` gives the fragment's entries sorted by address, owners sorted, no address
without an owner. The node concatenates the fragments (pipull/sendermap.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from mailstate.state.aliases import CATCH_ALL, MAX_ALIAS_DEPTH, split_address
from mailstate.state.models import DomainFile


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


def _owners(dom: DomainFile, local: str) -> list[str]:
    """The owners of ``local@dom`` that is an alias key: the walk described in the module docstring."""
    found: set[str] = set()
    seen: set[str] = set()

    def walk(address: str, depth: int) -> None:
        if address in seen or depth > MAX_ALIAS_DEPTH:
            return  # loops and over-long chains are refused at write time; never loop here
        seen.add(address)
        dest_local, domain = split_address(address)
        if domain != dom.domain:
            found.add(address)  # another domain's address: owns the alias if it is a mailbox login
            return
        if dest_local in dom.aliases and dest_local != CATCH_ALL:
            for nxt in dom.aliases[dest_local]:
                walk(nxt, depth + 1)
            return
        box = dom.mailboxes.get(dest_local)
        if box is not None:
            if box.active:
                found.add(address)
            return
        if dom.alias_of is not None:
            found.add(f"{dest_local}@{dom.alias_of}")
        # otherwise an unknown address (bounced, or taken by the catch-all: no sender rights)

    for dest in dom.aliases[local]:
        walk(dest, 1)
    return sorted(found)


def own_entries(dom: DomainFile) -> dict[str, list[str]]:
    """{local part: owners} of the domain's own addresses (mailboxes and aliases, no catch-all)."""
    out: dict[str, list[str]] = {}
    for local, box in dom.mailboxes.items():
        if box.active:
            out[local] = [f"{local}@{dom.domain}"]
    for local in dom.aliases:
        if local == CATCH_ALL:
            continue
        owners = _owners(dom, local)
        if owners:
            out[local] = owners
    return out


def sender_lines(dom: DomainFile, alias_domains: Iterable[DomainFile] = ()) -> list[tuple[str, list[str]]]:
    """The domain's sender_login_maps entries (address, owners), sorted by address.

    ``alias_domains``: the email-enabled domains whose ``alias_of`` is this domain; each adds
    ``x@A`` for every address ``x`` of this domain that A does not have itself.
    """
    if not dom.email_enabled:
        return []
    own = own_entries(dom)
    entries = {f"{local}@{dom.domain}": owners for local, owners in own.items()}
    for alias in alias_domains:
        if alias.alias_of != dom.domain or not alias.email_enabled or alias.domain == dom.domain:
            continue
        taken = set(alias.mailboxes) | set(alias.aliases)
        for local, owners in own.items():
            if local not in taken:
                entries[f"{local}@{alias.domain}"] = owners
    return sorted(entries.items())
