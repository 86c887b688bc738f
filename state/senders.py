"""Sender ownership lookups the engine shares with the compiler: the sender_login_maps
fragment's name and which domains are alias domains of which. The rule itself (who owns which
address) is what the compiler renders: ``compiler.maplines.sender_lines``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailstate.state.models import DomainFile

SENDER_FRAGMENT = "sender_login_maps"


def alias_domains_of(domains: Mapping[str, DomainFile], name: str) -> list[DomainFile]:
    """The email-enabled domains of ``domains`` that are alias domains of ``name``, by name."""
    return sorted(
        (d for d in domains.values() if d.alias_of == name and d.email_enabled and d.domain != name),
        key=lambda d: d.domain,
    )


def alias_index(domains: Iterable[DomainFile]) -> dict[str, list[DomainFile]]:
    """{target: its email-enabled alias domains, by name} in one pass (for rendering many domains)."""
    out: dict[str, list[DomainFile]] = {}
    for d in domains:
        if d.alias_of is not None and d.email_enabled and d.alias_of != d.domain:
            out.setdefault(d.alias_of, []).append(d)
    for users in out.values():
        users.sort(key=lambda d: d.domain)
    return out
