"""Mail client setup: what Thunderbird, Outlook and Apple devices are told, for one address.

    client_settings(state, email)    the servers for an address of an email-enabled domain
    thunderbird_xml(settings)        autoconfig (config-v1.1.xml)
    autodiscover_email(body)         the address in an Outlook autodiscover request
    autodiscover_xml(settings)       the Outlook autodiscover answer (POX, schema 2006a)
    apple_profile(settings)          an Apple configuration profile (.mobileconfig), no password
    mta_sts_policy(state, domain)    the MTA-STS policy served for mta-sts.<domain>

Every answer depends on the domain and the `dns:` settings only, never on whether the mailbox
exists: any address of an enabled domain gets the same servers (the address itself is echoed
as the login name where the format needs one; Thunderbird's answer uses %EMAILADDRESS% and is
byte for byte the same for every address). Other domains, and domains without email, read as
absent (NotFound), so nothing can be enumerated beyond what DNS publishes anyway.

The servers are the `dns:` block's (state/dns.py): IMAP on `imaps_port` with implicit TLS, and
submission on `submissions_port` (implicit TLS, preferred: RFC 8314) and `submission_port`
(STARTTLS). Logins are the full address; passwords go in clear text over TLS only.
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

from mailstate.state import dns as dnsrec
from mailstate.state import placement
from mailstate.state import validate as v
from mailstate.state.errors import Conflict, InvalidInput, NotFound
from mailstate.state.models import DnsSettings
from mailstate.state.snapshot import Snapshot

PROFILE_CONTENT_TYPE = "application/x-apple-aspen-config"
OUTLOOK_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
OUTLOOK_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
MAX_AUTODISCOVER_BYTES = 16 * 1024
# A fixed namespace for the profile's UUIDs: the same address gets the same profile every time.
_PROFILE_NS = uuid.UUID("0f4bd1a2-6a63-5b4e-9a0e-6d61696c7374")


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    security: str  # "tls" (implicit) or "starttls"

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "security": self.security}


@dataclass(frozen=True)
class ClientSettings:
    """What a mail client needs for one address."""

    email: str
    domain: str
    imap: Server
    smtp: tuple[Server, ...]  # the preferred one first


def client_settings(state: Snapshot, email: object, *, field: str = "email") -> ClientSettings:
    """The servers for `email` (InvalidInput naming `field` if it is no address); NotFound
    unless its domain has email enabled here."""
    local, domain = v.normalize_email(email, field=field)
    return domain_settings(state, domain, f"{local}@{domain}")


def mail_dns(state: Snapshot, domain: str) -> DnsSettings:
    """The `dns:` settings, when `domain` (a normalised name) has email enabled: else NotFound,
    and Conflict when the server has no `dns:` block."""
    dom = state.domains.get(domain)
    if dom is None or not dom.email_enabled:
        raise NotFound(f"{domain} has no mail service here.", code="domain_not_found", target=domain)
    dns = dnsrec.effective_dns(state.settings.dns, placement.addressed(state.nodes))
    if dns is None:
        raise Conflict(
            "This server has no DNS settings: add a `dns:` block with `mx_hosts` to mailstate.yaml, or give the "
            "nodes addresses (add-node address).",
            code="dns_not_configured",
            target=domain,
        )
    return dns


def mta_sts_policy(state: Snapshot, domain: str) -> str:
    """The MTA-STS policy served for mta-sts.<domain> (the same for every domain, state.dns)."""
    return dnsrec.mta_sts_policy(mail_dns(state, domain))


def domain_settings(state: Snapshot, domain: str, email: str = "") -> ClientSettings:
    """The servers for the addresses of `domain` (a normalised name); `email` is echoed as the login."""
    dns = mail_dns(state, domain)
    submit = dnsrec.submission_host(dns)
    return ClientSettings(
        email=email,
        domain=domain,
        imap=Server(dnsrec.imap_host(dns), dns.imaps_port, "tls"),
        smtp=(Server(submit, dns.submissions_port, "tls"), Server(submit, dns.submission_port, "starttls")),
    )


# --- Thunderbird ---------------------------------------------------------------------------


def _tb_socket(server: Server) -> str:
    return "SSL" if server.security == "tls" else "STARTTLS"


def thunderbird_xml(cs: ClientSettings) -> bytes:
    """Thunderbird's autoconfig (https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat)."""
    d = escape(cs.domain)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f'  <emailProvider id="{d}">',
        f"    <domain>{d}</domain>",
        f"    <displayName>{d}</displayName>",
        f"    <displayShortName>{d}</displayShortName>",
        '    <incomingServer type="imap">',
        *_tb_server(cs.imap),
        "    </incomingServer>",
    ]
    for server in cs.smtp:
        parts += ['    <outgoingServer type="smtp">', *_tb_server(server), "    </outgoingServer>"]
    parts += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(parts).encode("utf-8")


def _tb_server(server: Server) -> list[str]:
    return [
        f"      <hostname>{escape(server.host)}</hostname>",
        f"      <port>{server.port}</port>",
        f"      <socketType>{_tb_socket(server)}</socketType>",
        "      <authentication>password-cleartext</authentication>",
        "      <username>%EMAILADDRESS%</username>",
    ]


# --- Outlook -------------------------------------------------------------------------------


def autodiscover_email(body: bytes) -> str:
    """The `EMailAddress` of an Outlook autodiscover request (POX), or InvalidInput.

    No DTD is accepted (no entity can be declared, so none can expand), and the body is small."""
    if len(body) > MAX_AUTODISCOVER_BYTES:
        raise InvalidInput(
            f"The autodiscover request may be at most {MAX_AUTODISCOVER_BYTES} bytes.", code="invalid_request"
        )
    if b"<!" in body.replace(b"<![CDATA[", b""):
        raise InvalidInput("The autodiscover request may not carry a DTD.", code="invalid_request")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise InvalidInput("The autodiscover request is not well-formed XML.", code="invalid_request") from None
    found = root.find(f"{{{OUTLOOK_REQUEST_NS}}}Request/{{{OUTLOOK_REQUEST_NS}}}EMailAddress")
    if found is None:  # some clients send the elements without the namespace
        found = root.find("Request/EMailAddress")
    if found is None or not (found.text or "").strip():
        raise InvalidInput(
            "The autodiscover request has no Request/EMailAddress.", code="missing_field", field="EMailAddress"
        )
    return (found.text or "").strip()


def autodiscover_xml(cs: ClientSettings) -> bytes:
    """The Outlook answer (responseschema 2006a): IMAP and SMTP, TLS, the address as login."""
    protocols = [("IMAP", cs.imap), ("SMTP", cs.smtp[0])]
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<Autodiscover xmlns="{AUTODISCOVER_NS}">',
        f'  <Response xmlns="{OUTLOOK_RESPONSE_NS}">',
        "    <Account>",
        "      <AccountType>email</AccountType>",
        "      <Action>settings</Action>",
    ]
    for kind, server in protocols:
        parts += [
            "      <Protocol>",
            f"        <Type>{kind}</Type>",
            f"        <Server>{escape(server.host)}</Server>",
            f"        <Port>{server.port}</Port>",
            "        <DomainRequired>off</DomainRequired>",
            f"        <LoginName>{escape(cs.email)}</LoginName>",
            "        <SPA>off</SPA>",
            f"        <SSL>{'on' if server.security == 'tls' else 'off'}</SSL>",
            f"        <Encryption>{'SSL' if server.security == 'tls' else 'TLS'}</Encryption>",
            "        <AuthRequired>on</AuthRequired>",
            "      </Protocol>",
        ]
    parts += ["    </Account>", "  </Response>", "</Autodiscover>", ""]
    return "\n".join(parts).encode("utf-8")


# --- Apple -----------------------------------------------------------------------------------


def profile_filename(cs: ClientSettings) -> str:
    return f"{cs.domain}.mobileconfig"


def apple_profile(cs: ClientSettings) -> bytes:
    """A configuration profile with one com.apple.mail.managed payload and no password in it."""
    ident = ".".join(reversed(cs.domain.split(".")))
    smtp = cs.smtp[0]
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.mail.{cs.email}",
        "PayloadUUID": str(uuid.uuid5(_PROFILE_NS, f"account:{cs.email}")).upper(),
        "PayloadDisplayName": f"Mail ({cs.email})",
        "EmailAccountDescription": cs.email,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": cs.email,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": cs.imap.host,
        "IncomingMailServerPortNumber": cs.imap.port,
        "IncomingMailServerUseSSL": cs.imap.security == "tls",
        "IncomingMailServerUsername": cs.email,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": smtp.host,
        "OutgoingMailServerPortNumber": smtp.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": cs.email,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.mailprofile.{cs.email}",
        "PayloadUUID": str(uuid.uuid5(_PROFILE_NS, f"profile:{cs.email}")).upper(),
        "PayloadDisplayName": f"Mail for {cs.email}",
        "PayloadDescription": f"Sets up {cs.email} (IMAP and SMTP over TLS). Mail asks for the password.",
        "PayloadOrganization": cs.domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
