"""The DNS records a mail domain needs (`dns-records ?domain=`), from settings and the nodes' keys.

What the platform's DNS code (or a person) publishes for an email-enabled domain D:

    MX     D                              <10*i> <mx_hosts[i]>        where mail for D goes
    TXT    D                              <dns.spf>                   SPF: who may send as D
    TXT    <selector>._domainkey.D        v=DKIM1; k=rsa; p=<key>     one per node and selector
      or, with dns.dkim_cname_zone Z:
    CNAME  <selector>._domainkey.D        <selector>.Z                set once by the customer
    TXT    <selector>.Z                   v=DKIM1; k=rsa; p=<key>     the platform's own zone
    TXT    _dmarc.D                       <dns.dmarc>                 DMARC policy
    CNAME  autoconfig.D, autodiscover.D   <autoconfig_host>           mail-client setup lookups
    SRV    _submission._tcp.D             0 1 587 <submission_host>   RFC 6186
    SRV    _imaps._tcp.D                  0 1 993 <imap_host>

DKIM: every node signs with its own key (pi-pull/pipull/dkim.py), so a domain served by N
nodes needs up to 2N key records: each node's two selectors, ms1-<node> and ms2-<node>. All
of them are listed whatever their state: a pending key must be published before the node signs
with it, and a retired one stays until the node's next rotation. Only nodes registered in
nodes.yaml count; a key a removed node reported is never listed.

The CNAME form is the big senders' pattern: a customer sets the CNAMEs once; key rotation
then changes only the platform's zone. The selectors are fixed per node, so the CNAMEs never
change (only when a node is added or removed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mailstate.state.models import DnsSettings
from mailstate.state.validate import normalize_domain

SUBMISSION_PORT = 587
IMAPS_PORT = 993


def _is_host_name(address: str) -> bool:
    try:
        return normalize_domain(address) == address
    except Exception:  # an IP address
        return False


def effective_dns(dns: DnsSettings | None, addressed: Mapping[str, str]) -> DnsSettings | None:
    """The DNS settings dns-records uses: mailstate.yaml's `dns:` block, with one MX for every node
    whose address is a host name (`addressed`: name -> address, sorted) when `mx_hosts` is not set
    (an MX names a host, never an IP). None when there is no MX host at all."""
    if dns is not None and dns.mx_hosts:
        return dns
    hosts = [address for _name, address in sorted(addressed.items()) if _is_host_name(address)][:10]
    if not hosts:
        return None
    return (dns or DnsSettings()).model_copy(update={"mx_hosts": hosts})


def dkim_txt(public_key: str) -> str:
    """The DKIM key record's value (RFC 6376 section 3.6.1)."""
    return f"v=DKIM1; k=rsa; p={public_key}"


def _record(rtype: str, name: str, value: str, purpose: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": rtype,
        "name": name,
        "value": value,
        "purpose": purpose,
        "node": None,
        "selector": None,
        "state": None,
        **extra,
    }


def records_for(
    domain: str, dns: DnsSettings, keys: Iterable[Mapping[str, Any]], nodes: Iterable[str]
) -> list[dict[str, Any]]:
    """Every record `domain` needs (see the module docstring), in a stable order.

    `keys`: the nodes' reported DKIM keys (`node`, `selector`, `public_key`, `state`), `nodes`:
    the registered node names (keys of other nodes are left out)."""
    first = dns.mx_hosts[0]
    out = [
        _record("MX", domain, f"{10 * (i + 1)} {host}", f"Mail for {domain} is delivered to {host}.")
        for i, host in enumerate(dns.mx_hosts)
    ]
    out.append(_record("TXT", domain, dns.spf, f"SPF: the hosts allowed to send mail as {domain}."))
    known = set(nodes)
    for key in sorted(keys, key=lambda k: (k["node"], k["selector"])):
        if key["node"] not in known:
            continue
        node, selector, state = key["node"], key["selector"], key["state"]
        name = f"{selector}._domainkey.{domain}"
        txt = dkim_txt(key["public_key"])
        what = f"DKIM key {selector} of node {node} ({state})"
        tags = {"node": node, "selector": selector, "state": state}
        if dns.dkim_cname_zone:
            target = f"{selector}.{dns.dkim_cname_zone}"
            out.append(
                _record(
                    "CNAME",
                    name,
                    target,
                    f"{what}: points to the platform's zone, so keys rotate without a change here.",
                    **tags,
                )
            )
            out.append(
                _record(
                    "TXT", target, txt, f"{what}, in the platform's zone (published once for every domain).", **tags
                )
            )
        else:
            out.append(
                _record(
                    "TXT", name, txt, f"{what}: receivers verify the signatures of mail from {domain} with it.", **tags
                )
            )
    out.append(
        _record(
            "TXT",
            f"_dmarc.{domain}",
            dns.dmarc,
            f"DMARC: what receivers do with mail from {domain} that fails SPF and DKIM.",
        )
    )
    client = dns.autoconfig_host or first
    out.append(
        _record(
            "CNAME",
            f"autoconfig.{domain}",
            client,
            "Mail clients (Thunderbird and others) look up their settings here.",
        )
    )
    out.append(
        _record("CNAME", f"autodiscover.{domain}", client, "Outlook and other clients look up their settings here.")
    )
    out.append(
        _record(
            "SRV",
            f"_submission._tcp.{domain}",
            f"0 1 {SUBMISSION_PORT} {dns.submission_host or first}",
            "Mail submission (RFC 6186).",
        )
    )
    out.append(
        _record(
            "SRV", f"_imaps._tcp.{domain}", f"0 1 {IMAPS_PORT} {dns.imap_host or first}", "IMAP over TLS (RFC 6186)."
        )
    )
    return out
