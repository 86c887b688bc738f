"""The DNS records a mail domain needs (`dns-records ?domain=`), from settings and the nodes' keys.

What the platform's DNS code (or a person) publishes for an email-enabled domain D:

    MX     D                              <10*i> <mx_hosts[i]>        where mail for D goes
    TXT    D                              <dns.spf>                   SPF: who may send as D
    TXT    <selector>._domainkey.D        v=DKIM1; k=rsa; p=<key>     one per node and selector
      or, with dns.dkim_cname_zone Z:
    CNAME  <selector>._domainkey.D        <selector>.Z                set once by the customer
    TXT    <selector>.Z                   v=DKIM1; k=rsa; p=<key>     the platform's own zone
    TXT    _dmarc.D                       <dns.dmarc>                 DMARC policy
    CNAME  autoconfig.D, autodiscover.D   <web host>                  mail-client setup lookups
    SRV    _submission._tcp.D             0 1 587 <submission_host>   RFC 6186
    SRV    _imaps._tcp.D                  0 1 993 <imap_host>
    TXT    _mta-sts.D                     v=STSv1; id=<policy id>     MTA-STS (RFC 8461)
    CNAME  mta-sts.D                      <web host>                  serves /.well-known/mta-sts.txt
    TXT    _smtp._tls.D                   v=TLSRPTv1; rua=<tls_rpt_rua>   TLS reporting (RFC 8460)

The web host is `dns.autoconfig_host` (default: the first MX host): the host where `mailstate
serve` answers autoconfig, autodiscover and the MTA-STS policy (behind a TLS proxy that holds
certificates for autoconfig.D and mta-sts.D). The ports are the `dns:` block's (993, 465, 587).

MTA-STS: the policy (`mta_sts_policy`) is the same for every domain: the mode from settings and
one `mx:` line per MX host. Its id is derived from its text, so it changes exactly when the
policy changes (a new MX host, another mode), which is what tells senders to fetch it again.

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

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from mailstate.state.models import DnsSettings
from mailstate.state.validate import normalize_domain

# One week: senders cache the policy that long (RFC 8461 section 3.2); the id in DNS tells them
# to fetch a changed one sooner.
MTA_STS_MAX_AGE = 604800


def web_host(dns: DnsSettings) -> str:
    """Where `mailstate serve` answers mail clients and MTA-STS for every domain."""
    return dns.autoconfig_host or dns.mx_hosts[0]


def imap_host(dns: DnsSettings) -> str:
    return dns.imap_host or dns.mx_hosts[0]


def submission_host(dns: DnsSettings) -> str:
    return dns.submission_host or dns.mx_hosts[0]


def mta_sts_policy(dns: DnsSettings) -> str:
    """The MTA-STS policy file (RFC 8461 section 3.2), CRLF line ends."""
    lines = ["version: STSv1", f"mode: {dns.mta_sts_mode}", *(f"mx: {host}" for host in dns.mx_hosts)]
    lines.append(f"max_age: {MTA_STS_MAX_AGE}")
    return "".join(line + "\r\n" for line in lines)


def mta_sts_id(policy: str) -> str:
    """The policy's id for `_mta-sts` TXT: 20 hex digits of its SHA-256 (RFC 8461: 1-32 alphanumerics)."""
    return hashlib.sha256(policy.encode("ascii")).hexdigest()[:20]


def tls_rpt_rua(domain: str, dns: DnsSettings) -> str:
    return dns.tls_rpt_rua or f"mailto:postmaster@{domain}"


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
    out = [
        _record("MX", domain, f"{10 * (i + 1)} {host}", f"Mail for {domain} is delivered to {host}.")
        for i, host in enumerate(dns.mx_hosts)
    ]
    out.append(_record("TXT", domain, dns.spf, f"SPF: the hosts allowed to send mail as {domain}."))
    out.extend(_dkim_records(domain, dns, keys, set(nodes)))
    out.append(
        _record(
            "TXT",
            f"_dmarc.{domain}",
            dns.dmarc,
            f"DMARC: what receivers do with mail from {domain} that fails SPF and DKIM.",
        )
    )
    client = web_host(dns)
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
            f"0 1 {dns.submission_port} {submission_host(dns)}",
            "Mail submission (RFC 6186).",
        )
    )
    out.append(
        _record("SRV", f"_imaps._tcp.{domain}", f"0 1 {dns.imaps_port} {imap_host(dns)}", "IMAP over TLS (RFC 6186).")
    )
    out.extend(_transport_security(domain, dns, client))
    return out


def _dkim_records(
    domain: str, dns: DnsSettings, keys: Iterable[Mapping[str, Any]], known: set[str]
) -> list[dict[str, Any]]:
    out = []
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
    return out


def _transport_security(domain: str, dns: DnsSettings, web: str) -> list[dict[str, Any]]:
    """MTA-STS and TLS-RPT: senders require TLS to the MX hosts, and report when it fails."""
    policy_id = mta_sts_id(mta_sts_policy(dns))
    return [
        _record(
            "TXT",
            f"_mta-sts.{domain}",
            f"v=STSv1; id={policy_id}",
            f"MTA-STS: senders fetch the policy (mode {dns.mta_sts_mode}) and deliver to {domain} over TLS only; "
            "the id changes when the policy does.",
        ),
        _record(
            "CNAME",
            f"mta-sts.{domain}",
            web,
            f"Serves the MTA-STS policy at https://mta-sts.{domain}/.well-known/mta-sts.txt.",
        ),
        _record(
            "TXT",
            f"_smtp._tls.{domain}",
            f"v=TLSRPTv1; rua={tls_rpt_rua(domain, dns)}",
            "TLS-RPT: where senders report TLS failures delivering to this domain.",
        ),
    ]
