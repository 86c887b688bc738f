"""Postscreen on port 25 (mailstate's docs/inbound.md): the DNS blocklists a node asks before SMTP.

A node's port 25 is Postfix's postscreen: it answers new clients with half a greeting, asks the
DNS blocklists of ``postscreen_dnsbl_sites`` about the client's address meanwhile, and hands the
connection to the real SMTP server (the rspamd milter and the restrictions) only when the sum of
the weights of the lists naming it stays below ``postscreen_dnsbl_threshold`` and it did not talk
before its turn. Over the threshold: ``521 5.7.1`` at connect, before any SMTP.

The list is a bundle setting (``mailstate node bundle --dnsbl ... --dnsbl-threshold N``), not a
state one: a node's DNS access is its own (a node without a resolver of its own runs with none),
and a paid list's key (Spamhaus DQS) stays out of the state repo.

This module is the one place for the rules; the node (pi-pull/pipull/postscreen.py) checks the
lines of the bundle's main.cf the same way before install sets them, and
tests/vectors/dnsbl_sites.json holds the two to the same verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailstate.state.errors import InvalidInput

# Spamhaus answers 127.255.255.x to queries it refuses (a public resolver, no DQS key): the
# filter counts only its real listings. SpamCop lists with 127.0.0.2 and weighs less.
DEFAULT_DNSBL_SITES = ("zen.spamhaus.org=127.0.0.[2..11]*3", "bl.spamcop.net=127.0.0.2*2")
DEFAULT_DNSBL_THRESHOLD = 3
MAX_DNSBL_SITES = 20
MAX_WEIGHT = 100
MAX_THRESHOLD = 1000
CODE = "invalid_dnsbl"

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_NUMBER = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_ITEM = rf"{_NUMBER}(?:\.\.{_NUMBER})?"
_OCTET = rf"(?:{_NUMBER}|\[{_ITEM}(?:;{_ITEM})*\])"
# domain[=filter][*weight], as postscreen(8) reads it; the filter matches the A record's octets.
_SITE = re.compile(rf"(?P<domain>[^=*]+)(?:=(?P<filter>{_OCTET}(?:\.{_OCTET}){{3}}))?(?:\*(?P<weight>-?[0-9]{{1,3}}))?")


def check_dnsbl_site(text: object) -> str:
    """One ``postscreen_dnsbl_sites`` entry, lower-cased: ``domain[=filter][*weight]`` with a DNS
    name of two labels or more, a filter of four octets (a number, ``[a..b]`` or ``[a;b]``) and a
    weight from -100 to 100 but not 0 (a negative one allowlists)."""
    if not isinstance(text, str):
        raise InvalidInput("A DNSBL site must be a string such as zen.spamhaus.org*3.", code=CODE, field="dnsbl_sites")
    site = text.strip().lower()
    found = _SITE.fullmatch(site)
    domain = found.group("domain") if found else ""
    if found is None or len(domain) > 253 or not _DOMAIN.fullmatch(domain) or domain.rsplit(".", 1)[1].isdigit():
        raise InvalidInput(
            f"{_shown(text)} is not a DNSBL site: write domain[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3.",
            code=CODE,
            field="dnsbl_sites",
        )
    weight = found.group("weight")
    if weight is not None and not (0 < abs(int(weight)) <= MAX_WEIGHT):
        raise InvalidInput(
            f"The weight of {_shown(text)} must be from -{MAX_WEIGHT} to {MAX_WEIGHT}, and not 0.",
            code=CODE,
            field="dnsbl_sites",
        )
    return site


def check_dnsbl_sites(sites: Sequence[object]) -> tuple[str, ...]:
    """The whole list: at most MAX_DNSBL_SITES entries, none twice; empty is allowed (no DNSBL)."""
    if len(sites) > MAX_DNSBL_SITES:
        raise InvalidInput(f"At most {MAX_DNSBL_SITES} DNSBL sites, not {len(sites)}.", code=CODE, field="dnsbl_sites")
    out = tuple(check_dnsbl_site(s) for s in sites)
    if len(set(out)) != len(out):
        twice = next(s for s in out if out.count(s) > 1)
        raise InvalidInput(f"The DNSBL site {twice} is listed twice.", code=CODE, field="dnsbl_sites")
    return out


def check_dnsbl_threshold(value: object) -> int:
    """The score from which a client is refused: a whole number from 1 to MAX_THRESHOLD."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THRESHOLD:
        raise InvalidInput(
            f"The DNSBL threshold must be a whole number from 1 to {MAX_THRESHOLD}.", code=CODE, field="dnsbl_threshold"
        )
    return value


def parse_dnsbl_option(text: str) -> tuple[str, ...]:
    """The command line's ``--dnsbl`` value: sites separated by commas or blanks ("" or "none": no DNSBL)."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(s for s in re.split(r"[,\s]+", text.strip()) if s)


def _shown(value: object) -> str:
    """A refused value, quoted and cut short (never a whole hostile value echoed back)."""
    return repr(value[:80] if isinstance(value, str) else type(value).__name__)
