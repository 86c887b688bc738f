"""The pydantic models: the only schema in mailstate.

Two families live here:

* the state repo's files (`Settings` for mailstate.yaml, `DomainFile`, `NodesFile`), and
* the operations' requests (`AddUserRequest`, ...). The HTTP and MCP edges derive their
  input schemas from these request models; nothing else declares fields.

Validators raise `state.errors.InvalidInput` directly (it is not a ValueError, so pydantic
lets it through untouched and the caller sees our code and field). `parse()` turns
pydantic's own errors (missing field, wrong type, unknown field) into the same error.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mailstate.state import aliases as al
from mailstate.state import owners as ow
from mailstate.state import paging, spam
from mailstate.state import validate as v
from mailstate.state.errors import InvalidInput

# The state format new data dirs get. Format 1 (no mailbox ids) still loads; `mailstate upgrade`
# (or the server on start) turns it into format 2 in one signed commit (state.upgrade).
FORMAT_VERSION: Literal[2] = 2
MAX_PURGE_AFTER_DAYS = 3650
BCRYPT_HASH = re.compile(r"^\{BLF-CRYPT\}\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _email(value: object) -> str:
    local, domain = v.normalize_email(value)
    return f"{local}@{domain}"


# The `json_schema_extra` constraints document (for OpenAPI, MCP and generated clients) what
# the BeforeValidators enforce, and are never looser: a request that obeys the schema (patterns
# and formats included) never gets a 400 (tests/api/test_contract.py generates requests from the
# published schema against a live server). Where JSON Schema cannot say a rule exactly they are
# stricter: an IDN is described in its punycode (A-label) form only, though the server also
# takes the Unicode form; a password is counted in characters, not the UTF-8 bytes it is
# limited to. `idn-hostname` / `idn-email` (RFC 5890/6531) say that an xn-- label must be valid
# punycode of an allowed name, which no pattern can.
DomainName = Annotated[
    str,
    BeforeValidator(v.normalize_domain),
    Field(
        description="Domain name, e.g. mycompany.nl: at least two labels of 1-63 letters, digits or hyphens (no hyphen at either "
        "end, not an all-digit top-level label), at most 253 characters. Lowercased. An IDN is stored as punycode: send the "
        "xn-- form (valid IDNA 2008 punycode) or the Unicode form.",
        examples=["mycompany.nl"],
        json_schema_extra={
            "minLength": 3,
            "maxLength": v.MAX_DOMAIN_LENGTH,
            "pattern": v.DOMAIN_PATTERN,
            "format": "idn-hostname",
        },
    ),
]
_EMAIL_DOC = (
    "The local part: ASCII letters, digits, '.', '_', '+', '-' (lowercased; no '..', no '.' at either end), at most 64 "
    "characters; the domain as for a domain name."
)
Email = Annotated[
    str,
    BeforeValidator(_email),
    Field(
        description=f"Full email address. {_EMAIL_DOC}",
        examples=["info@mycompany.nl"],
        json_schema_extra={
            "minLength": 5,
            "maxLength": v.MAX_LOCAL_PART_LENGTH + 1 + v.MAX_DOMAIN_LENGTH,
            "pattern": v.EMAIL_PATTERN,
            "format": "idn-email",
        },
    ),
]
Password = Annotated[
    str,
    BeforeValidator(v.validate_password),
    Field(
        description=f"Plain text password, {v.MIN_PASSWORD_BYTES}-{v.MAX_PASSWORD_BYTES} bytes in UTF-8 (8-72 ASCII characters), no NUL; "
        "bcrypt-hashed before storage, never stored or logged.",
        json_schema_extra={
            "minLength": v.MIN_PASSWORD_BYTES,
            "maxLength": v.MAX_PASSWORD_BYTES,
            "pattern": v.PASSWORD_PATTERN,
            "x-min-bytes": v.MIN_PASSWORD_BYTES,
            "x-max-bytes": v.MAX_PASSWORD_BYTES,
            "format": "password",
            "writeOnly": True,
        },
    ),
]
QuotaMb = Annotated[
    int,
    BeforeValidator(v.validate_quota),
    Field(
        description=f"Mailbox quota in MB, 1-{v.MAX_QUOTA_MB}.",
        json_schema_extra={"minimum": 1, "maximum": v.MAX_QUOTA_MB},
    ),
]
NodeName = Annotated[
    str,
    BeforeValidator(v.validate_node_name),
    Field(
        description=f"Node identifier: {v.NODE_NAME_RULE}.",
        examples=["mpi02"],
        json_schema_extra={"minLength": 1, "maxLength": v.NODE_NAME_MAX, "pattern": v.NODE_NAME_PATTERN},
    ),
]
NodeAddress = Annotated[
    str,
    BeforeValidator(v.normalize_node_address),
    Field(
        description="Where other nodes and mail clients reach the node: a host name (like mx1.example.net) or an IPv4/IPv6 "
        "address. Only a node with an address is ever made a domain's home.",
        examples=["mx1.example.net"],
        json_schema_extra={
            "minLength": 2,
            "maxLength": v.MAX_DOMAIN_LENGTH,
            "anyOf": [
                {"pattern": v.DOMAIN_PATTERN, "format": "idn-hostname"},
                {"pattern": v.IP_PATTERN, "format": "ipv4"},
                {"pattern": v.IP_PATTERN, "format": "ipv6"},
            ],
        },
    ),
]
IpAddress = Annotated[
    str,
    BeforeValidator(v.normalize_ip),
    Field(
        description="IPv4 or IPv6 address the node connects from (no %zone).",
        json_schema_extra={
            "minLength": 2,
            "maxLength": 45,
            "pattern": v.IP_PATTERN,
            "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
        },
    ),
]
ProjectId = Annotated[
    int,
    BeforeValidator(v.validate_project_id),
    Field(
        description="Project (WebSumo) id, a positive whole number.",
        json_schema_extra={"minimum": 1, "maximum": 2**63 - 1},
    ),
]


def _file_value(check: Any, value: Any) -> Any:
    """Run a request validator on a state-file value; its InvalidInput becomes a ValueError,
    so that pydantic reports it with the value's location and `mailstate check` lists it."""
    try:
        return check(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("hard_delete must be true or false.", code="invalid_request", field="hard_delete")
    return value


# --- state repo files --------------------------------------------------------------------


HOSTNAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
DNS_VALUE_PATTERN = r"^[\x20-\x7e]{1,2000}$"  # printable ASCII: it is pasted into DNS zone files


DnsHost = Annotated[str, Field(pattern=HOSTNAME_PATTERN, max_length=253)]
Port = Annotated[int, Field(ge=1, le=65535)]
_RUA_URI = r"(?:mailto:[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+|https://[\x21-\x2b\x2d-\x3a\x3c-\x7e]+)"
TLS_RPT_RUA_PATTERN = rf"^{_RUA_URI}(?:,{_RUA_URI})*$"


class DnsSettings(BaseModel):
    """mailstate.yaml's optional `dns:` block: the platform's values for `dns-records`.

    Absent (format-1/2 repos written before it) and no node with a host name for an address:
    dns-records answers 409 dns_not_configured, since there is no MX host to name. Every key has
    a default (mx_hosts: the addressed nodes, state.dns.effective_dns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mx_hosts: list[DnsHost] = Field(
        default_factory=list,
        max_length=10,
        description="The platform's mail hosts, in MX preference order (10, 20, ...). Not set (or empty): one MX for "
        "every node whose address is a host name, in name order.",
    )
    spf: str = Field(
        default="v=spf1 mx -all",
        pattern=DNS_VALUE_PATTERN,
        description="The SPF TXT value (default: the MX hosts send).",
    )
    dmarc: str = Field(default="v=DMARC1; p=none", pattern=DNS_VALUE_PATTERN, description="The _dmarc TXT value.")
    dkim_cname_zone: DnsHost | None = Field(
        default=None,
        description="A platform zone for DKIM keys: customers publish CNAMEs <selector>._domainkey.<domain> -> <selector>.<zone> "
        "once, and the platform publishes the keys' TXT records in its zone (rotation needs no customer DNS change).",
    )
    autoconfig_host: DnsHost | None = Field(
        default=None, description="Host serving autoconfig/autodiscover (default: the first MX host)."
    )
    submission_host: DnsHost | None = Field(
        default=None, description="Host for SMTP submission (default: the first MX host)."
    )
    imap_host: DnsHost | None = Field(default=None, description="Host for IMAP (default: the first MX host).")
    imaps_port: Port = Field(default=993, description="IMAP over TLS (implicit TLS), as the nodes listen.")
    submissions_port: Port = Field(default=465, description="SMTP submission over implicit TLS, as the nodes listen.")
    submission_port: Port = Field(default=587, description="SMTP submission with STARTTLS, as the nodes listen.")
    mta_sts_mode: Literal["testing", "enforce", "none"] = Field(
        default="testing",
        description="The MTA-STS policy's mode (RFC 8461): testing (report only), enforce, or none (withdraw).",
    )
    tls_rpt_rua: str | None = Field(
        default=None,
        pattern=TLS_RPT_RUA_PATTERN,
        max_length=500,
        description="Where TLS reports go (RFC 8460 rua: mailto: or https: URIs, comma-separated); "
        "default mailto:postmaster@<domain>.",
    )

    # Keys written to mailstate.yaml only when an admin set them: a `dns:` block written before
    # they existed is dumped again (an upgrade) with exactly its old keys.
    WRITTEN_WHEN_SET: ClassVar[frozenset[str]] = frozenset(
        {"imaps_port", "submissions_port", "submission_port", "mta_sts_mode", "tls_rpt_rua"}
    )

    def dump(self) -> dict[str, Any]:
        """The block as mailstate.yaml holds it (see WRITTEN_WHEN_SET)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return {k: v for k, v in data.items() if k not in self.WRITTEN_WHEN_SET or k in self.model_fields_set}


# --- platform controls (state.limits, state.sending) -------------------------------------

LIMIT_NAMES: tuple[str, ...] = (
    "max_mailboxes",
    "max_aliases",
    "max_quota_mb",
    "storage_mb",
    "send_per_hour",
    "send_per_day",
)
# The plan limits a write can pass (counted over the scope's email-enabled domains, state.limits)
# and the outbound limits, which apply to each mailbox on its own and are enforced by the nodes.
USE_LIMITS: tuple[str, ...] = ("max_mailboxes", "max_aliases", "max_quota_mb", "storage_mb")
SEND_LIMITS: tuple[str, ...] = ("send_per_hour", "send_per_day")
MAX_COUNT_LIMIT = 10_000_000
MAX_STORAGE_MB = 2**40
MAX_SEND_PER_HOUR = 1_000_000
MAX_SEND_PER_DAY = 24_000_000
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "max_mailboxes": (0, MAX_COUNT_LIMIT),
    "max_aliases": (0, MAX_COUNT_LIMIT),
    "max_quota_mb": (1, v.MAX_QUOTA_MB),
    "storage_mb": (0, MAX_STORAGE_MB),
    "send_per_hour": (0, MAX_SEND_PER_HOUR),
    "send_per_day": (0, MAX_SEND_PER_DAY),
}
LIMIT_DOCS: dict[str, str] = {
    "max_mailboxes": "Active mailboxes, at most (soft-deleted ones do not count).",
    "max_aliases": "Aliases (the catch-all included), at most.",
    "max_quota_mb": "The largest quota_mb one mailbox may have.",
    "storage_mb": "The sum of the active mailboxes' quota_mb, at most.",
    "send_per_hour": "Recipients each mailbox may send to in the last hour (a message to three counts three); the nodes "
    "enforce it. A domain's value overrides its project's, which overrides mailstate.yaml's sending default.",
    "send_per_day": "Recipients each mailbox may send to in the last 24 hours; as send_per_hour.",
}


def _limit_field(name: str) -> Any:
    low, high = LIMIT_RANGES[name]
    return Field(default=None, ge=low, le=high, description=f"{LIMIT_DOCS[name]} {low}-{high}; null: no limit.")


class Limits(BaseModel):
    """A project's or a domain's plan limits (set-limits). Every key is optional; absent or null is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_mailboxes: int | None = _limit_field("max_mailboxes")
    max_aliases: int | None = _limit_field("max_aliases")
    max_quota_mb: int | None = _limit_field("max_quota_mb")
    storage_mb: int | None = _limit_field("storage_mb")
    send_per_hour: int | None = _limit_field("send_per_hour")
    send_per_day: int | None = _limit_field("send_per_day")

    def values(self) -> dict[str, int]:
        """The limits that are set, in LIMIT_NAMES order."""
        return {name: value for name in LIMIT_NAMES if (value := getattr(self, name)) is not None}

    def __bool__(self) -> bool:
        return bool(self.values())


class SendingSettings(BaseModel):
    """mailstate.yaml's optional `sending:` block: every mailbox's outbound limits unless its domain
    or project sets its own (set-limits), and when a node suspends a mailbox by itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    send_per_hour: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEND_PER_HOUR,
        description="Recipients a mailbox may send to in an hour; null: no limit.",
    )
    send_per_day: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEND_PER_DAY,
        description="Recipients a mailbox may send to in 24 hours; null: no limit.",
    )
    auto_suspend_factor: float | None = Field(
        default=3.0,
        ge=1.0,
        le=1000.0,
        description="A node suspends a mailbox whose recipients (refused ones included) pass this many times its limit "
        "in the limit's window; null: never by itself.",
    )


SUSPEND_REASON_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"  # one line, no control characters


class MailboxSending(BaseModel):
    """A mailbox's sending state (suspend-sending, resume-sending, or a node's own suspension).

    `changed_at` is when it last changed: the nodes start counting the mailbox afresh from each
    change they see, so a resumed mailbox can send again at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suspended: bool
    reason: str | None = Field(default=None, pattern=SUSPEND_REASON_PATTERN)
    changed_at: datetime

    @field_validator("changed_at")
    @classmethod
    def _utc_second(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() != timedelta(0) or value.microsecond:
            raise ValueError("changed_at must be a UTC time in whole seconds (like 2026-12-01T10:00:00Z)")
        return value


def _score(field: str) -> Any:
    def check(value: object) -> object:
        return None if value is None else spam.check_score(value, field)

    return check


class SpamPolicy(BaseModel):
    """A spam policy (state/spam.py): the action and the two thresholds; a field left null is
    inherited (mailbox from domain, domain from mailstate.yaml's `spam:`, that from rspamd's own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["junk", "reject", "off"] | None = Field(
        default=None,
        description="junk: over junk_score into Junk; reject: over reject_score refused at SMTP time (5xx), over "
        "junk_score into Junk; off: neither. null: inherited.",
    )
    junk_score: Annotated[float | None, BeforeValidator(_score("junk_score"))] = Field(
        default=None,
        description="rspamd score from which a message is junked (0.1-100, one decimal place); null: inherited.",
    )
    reject_score: Annotated[float | None, BeforeValidator(_score("reject_score"))] = Field(
        default=None,
        description="rspamd score from which a message is refused (0.1-100, one decimal place); null: inherited.",
    )

    @model_validator(mode="after")
    def _scores(self) -> SpamPolicy:
        try:
            spam.check_scores(self.junk_score, self.reject_score)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
        return self


def _sender_rules(value: dict[str, str] | None) -> dict[str, str] | None:
    """A scope's allow/block list (state/spam.py): 1 to MAX_SENDER_RULES senders (absent: none)."""
    if value is None:
        return None
    if not 1 <= len(value) <= spam.MAX_SENDER_RULES:
        raise ValueError(f"sender_rules must hold 1-{spam.MAX_SENDER_RULES} senders (absent: none)")
    out = {}
    for sender, action in value.items():
        key = _file_value(spam.normalize_sender, sender)
        if key != sender or key in out:
            raise ValueError(f"sender_rules: {sender!r} is not in its normal form, or listed twice")
        out[key] = action
    return out


SenderRules = Annotated[dict[str, Literal["allow", "block"]] | None, AfterValidator(_sender_rules)]


class Settings(BaseModel):
    """mailstate.yaml: the format version and settings shared by every node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1, 2] = FORMAT_VERSION
    mail_root: str = Field(
        default="/var/vmail",
        description="Maildir root on the nodes; homes are <root>/<domain>/<local>~<id> (format 1: <root>/<domain>/<local>).",
    )
    uid: int = Field(default=5000, ge=1, le=2**31 - 1)
    gid: int = Field(default=5000, ge=1, le=2**31 - 1)
    default_quota_mb: int = Field(default=1024, ge=1, le=v.MAX_QUOTA_MB)
    bcrypt_cost: int = Field(default=12, ge=4, le=31)
    purge_after_days: int = Field(
        default=7,
        ge=0,
        le=MAX_PURGE_AFTER_DAYS,
        description="Days a hard-deleted mailbox's Maildir stays in the nodes' graveyard before it is deleted (0: on the next tick).",
    )
    dns: DnsSettings | None = Field(
        default=None, description="The platform's DNS values for dns-records (optional; see DnsSettings)."
    )
    sending: SendingSettings | None = Field(
        default=None, description="Outbound limits every mailbox gets unless set-limits says otherwise (optional)."
    )
    spam: SpamPolicy | None = Field(
        default=None,
        description="The spam policy every mailbox gets unless set-spam-policy says otherwise (optional; without it "
        "junk at 6, reject at 15: rspamd's own).",
    )

    @field_validator("mail_root")
    @classmethod
    def _absolute_plain_path(cls, value: str) -> str:
        # The root lands in every passwd line's home field; `:` would shift the fields and
        # whitespace or `..` would put mail somewhere else.
        if (
            not value.startswith("/")
            or not (value.isascii() and value.isprintable())
            or any(c in value for c in ": ")
            or "/../" in value + "/"
        ):
            raise ValueError("mail_root must be an absolute path without ':', whitespace or '..'")
        return value.rstrip("/") or "/"


class Vacation(BaseModel):
    """A mailbox's autoreply (state/owners.py): Sieve vacation on the nodes, compiled only while
    `enabled`; at most one reply per sender per `interval_days`, between `start` and `end` (UTC days)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool
    subject: str | None = None
    body: str | None = None
    start: date | None = None
    end: date | None = None
    interval_days: int = ow.DEFAULT_INTERVAL_DAYS

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else _file_value(ow.check_subject, value)

    @field_validator("body")
    @classmethod
    def _body(cls, value: str | None) -> str | None:
        if value is not None and _file_value(ow.check_body, value) != value:
            raise ValueError("body must use \\n line ends")
        return value

    @field_validator("start", "end", mode="before")
    @classmethod
    def _date(cls, value: object, info: Any) -> date | None:
        return None if value is None else _file_value(lambda x: ow.check_date(x, info.field_name), value)

    @field_validator("interval_days")
    @classmethod
    def _interval(cls, value: int) -> int:
        return int(_file_value(ow.check_interval, value))

    @model_validator(mode="after")
    def _consistent(self) -> Vacation:
        if self.enabled and self.body is None:
            raise ValueError("an enabled vacation needs a body")
        _file_value(lambda _: ow.check_dates(self.start, self.end), None)
        return self


class Filter(BaseModel):
    """One filter rule of a mailbox (state/owners.py: normalize_filter is the one check)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    field: str
    op: Literal["contains", "is"]
    value: str
    action: Literal["fileinto", "discard", "redirect", "mark_read"]
    target: str | None = None
    stop: bool = False

    @model_validator(mode="after")
    def _rule(self) -> Filter:
        data = self.model_dump()
        if _file_value(lambda d: ow.normalize_filter(d, 0), data) != data:
            raise ValueError("a filter must be in canonical form (lowercase field and address; discard stops)")
        return self


class AppPassword(BaseModel):
    """An app password of a mailbox: its bcrypt hash only (the password is shown once, at creation),
    the protocols it may log in to, its passdb slot on the nodes and its lookup tag (owners.password_tag)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: str
    scopes: list[str]
    slot: int = Field(ge=0, lt=ow.MAX_APP_PASSWORDS)
    tag: str = Field(pattern=r"^[0-9a-f]{4}$")
    created_at: datetime

    @field_validator("hash")
    @classmethod
    def _bcrypt(cls, value: str) -> str:
        if not BCRYPT_HASH.fullmatch(value):
            raise ValueError("hash must be a {BLF-CRYPT}$2b$... bcrypt hash, never plain text")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if _file_value(ow.normalize_scopes, value) != value:
            raise ValueError(f"scopes must be a sorted, non-empty subset of {', '.join(ow.SCOPES)}")
        return value


class Mailbox(BaseModel):
    """One mailbox in a domain file; the key is the local part.

    `id` is the mailbox's immutable identity (format 2), made when it is created and part of
    its home, so that an address re-created after a hard delete gets a new, empty Maildir.
    A domain file does not say which format it is in (mailstate.yaml does), so whether `id`
    must be present (format 2) or absent (format 1) is enforced by the loader, per the
    settings: `state.files.format_problems`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    password: str
    quota_mb: int = Field(ge=1, le=v.MAX_QUOTA_MB)
    active: bool = True
    # Forwarding (optional; absent = none): mail is delivered to these addresses, and to the
    # mailbox as well while keep_copy is true. A soft-deleted mailbox forwards nothing.
    forward_to: list[str] | None = None
    keep_copy: bool = True
    # What owners ask for (state/owners.py; absent = none): an autoreply, filter rules, app passwords.
    vacation: Vacation | None = None
    filters: list[Filter] | None = None
    app_passwords: dict[str, AppPassword] | None = None
    # Optional (state/spam.py): set-spam-policy {email}; absent: the domain's.
    spam_policy: SpamPolicy | None = None
    # Optional (state/spam.py): add-sender-rule {email}: sender -> allow|block.
    sender_rules: SenderRules = None

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: list[Filter] | None) -> list[Filter] | None:
        if value is not None and not 1 <= len(value) <= ow.MAX_FILTERS:
            raise ValueError(f"filters must list 1-{ow.MAX_FILTERS} rules (absent: none)")
        return value

    @field_validator("app_passwords")
    @classmethod
    def _app_passwords(cls, value: dict[str, AppPassword] | None) -> dict[str, AppPassword] | None:
        if value is None:
            return None
        if not 1 <= len(value) <= ow.MAX_APP_PASSWORDS:
            raise ValueError(f"app_passwords must hold 1-{ow.MAX_APP_PASSWORDS} entries (absent: none)")
        for name in value:
            _file_value(ow.check_app_password_name, name)
        if len({n.casefold() for n in value}) != len(value):
            raise ValueError("app_passwords: two names differ only in case")
        if len({p.slot for p in value.values()}) != len(value):
            raise ValueError("app_passwords: two entries share a slot")
        return value

    # Optional (state.sending): suspend-sending / resume-sending, or a node's own suspension.
    sending: MailboxSending | None = None

    @field_validator("forward_to")
    @classmethod
    def _forward(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _file_value(al.normalize_destinations, value)

    @model_validator(mode="after")
    def _keep_copy_needs_forwarding(self) -> Mailbox:
        if self.forward_to is None and not self.keep_copy:
            raise ValueError("keep_copy: false needs forward_to (without forwarding the mailbox keeps its mail)")
        return self

    @field_validator("password")
    @classmethod
    def _bcrypt(cls, value: str) -> str:
        if not BCRYPT_HASH.fullmatch(value):
            raise ValueError("password must be a {BLF-CRYPT}$2b$... bcrypt hash, never plain text")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        # The id lands in a path on every node: only digits, one hyphen and lowercase hex.
        if value is not None and not v.is_mailbox_id(value):
            raise ValueError("id must look like 20261201-3fa9c2 (<yyyymmdd>-<6 lowercase hex digits>)")
        return value


class DomainFile(BaseModel):
    """domains/<bb>/<domain>.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    project_id: int | None = None
    email_enabled: bool = False
    # Optional (state.aliases): an alias domain's target, and the aliases (`"@"` = catch-all).
    alias_of: str | None = None
    # Placement (docs/fleet.md): the node whose Maildirs hold the domain's mail, and during a
    # move-domain the node it goes to; `moved_from` names the previous home until that node
    # reported that it handed over what it still held. Which nodes they may name is a rule
    # across files (state.placement.problems).
    home: str | None = None
    moving_to: str | None = None
    moved_from: str | None = None
    # Replication (docs/fleet.md, "Replicas and failover"): a second addressed node that keeps a
    # copy of the domain's mailboxes, in two-way doveadm sync with the home.
    replica: str | None = None
    # Optional (state.limits): the domain's own plan limits (set-limits {domain}).
    limits: Limits | None = None
    # Optional (state/spam.py): set-spam-policy {domain}; absent: mailstate.yaml's.
    spam_policy: SpamPolicy | None = None
    # Optional (state/spam.py): add-sender-rule {domain}: sender -> allow|block.
    sender_rules: SenderRules = None
    mailboxes: dict[str, Mailbox] = Field(default_factory=dict)
    aliases: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("home", "moving_to", "moved_from", "replica")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        return None if value is None else _file_value(v.validate_node_name, value)

    @field_validator("limits")
    @classmethod
    def _limits(cls, value: Limits | None) -> Limits | None:
        return value if value else None  # `limits: {}` is no limit at all

    @model_validator(mode="after")
    def _placement(self) -> DomainFile:
        if (self.moving_to or self.moved_from) and self.home is None:
            raise ValueError("moving_to and moved_from need a home")
        if self.moving_to is not None and self.moving_to == self.home:
            raise ValueError("moving_to must be another node than home")
        if self.moved_from is not None and self.moved_from == self.home:
            raise ValueError("moved_from must be another node than home")
        if self.home is not None and not self.email_enabled:
            raise ValueError("a domain without email has no home")
        # Which replica a domain may have is one rule, state.placement.replica_problem.
        return self

    @field_validator("alias_of")
    @classmethod
    def _alias_of(cls, value: str | None) -> str | None:
        if value is not None and _file_value(v.normalize_domain, value) != value:
            raise ValueError("alias_of must be a lowercase ASCII domain (punycode for IDN)")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, dests in value.items():
            if key != al.CATCH_ALL and not v.is_local_part(key):
                raise ValueError(f"alias key {key!r} is not a valid lowercase local part (or '@' for the catch-all)")
            if _file_value(al.normalize_destinations, dests) != dests:
                raise ValueError(f"aliases.{key}: destinations must be lowercase addresses (punycode for IDN)")
        return value

    @model_validator(mode="after")
    def _alias_rules(self) -> DomainFile:
        problems = al.file_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if _file_value(v.normalize_domain, value) != value:
            raise ValueError("domain must be lowercase ASCII (punycode for IDN)")
        return value

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: int | None) -> int | None:
        return None if value is None else _file_value(v.validate_project_id, value)

    @field_validator("mailboxes")
    @classmethod
    def _locals(cls, value: dict[str, Mailbox]) -> dict[str, Mailbox]:
        for local in value:
            if not v.is_local_part(local):
                raise ValueError(f"mailbox key {local!r} is not a valid lowercase local part")
        return value

    def active_count(self) -> int:
        return sum(1 for m in self.mailboxes.values() if m.active)


class Node(BaseModel):
    """One entry of nodes.yaml. The sync key itself is never stored.

    `address` (optional) is where other nodes and mail clients reach the node; only a node with
    one is ever a domain's home (docs/fleet.md, "Running a fleet"). `tls_certificate` is the
    certificate the node reported (its Postfix and Dovecot present it): the other nodes verify
    the node against it, so it travels in the signed state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ip_address: str | None = None
    address: str | None = None
    sync_key_sha256: str
    created_at: datetime
    tls_certificate: str | None = None

    @field_validator("ip_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else _file_value(v.normalize_ip, value)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and _file_value(v.normalize_node_address, value) != value:
            raise ValueError("address must be a lowercase host name or an IP address in canonical form")
        return value

    @field_validator("tls_certificate")
    @classmethod
    def _certificate(cls, value: str | None) -> str | None:
        if value is not None and _file_value(v.normalize_certificate, value) != value:
            raise ValueError("tls_certificate must be one PEM certificate in canonical form (64-column lines)")
        return value

    @field_validator("sync_key_sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not SHA256_HEX.fullmatch(value):
            raise ValueError("sync_key_sha256 must be 64 lowercase hex digits")
        return value


class ProjectFile(BaseModel):
    """projects/<pp>/<project_id>.yaml: a project's plan limits (set-limits {project_id})."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project_id: int
    limits: Limits = Field(default_factory=Limits)

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: int) -> int:
        checked: int = _file_value(v.validate_project_id, value)
        return checked


class NodesFile(BaseModel):
    """nodes.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: dict[str, Node] = Field(default_factory=dict)

    @field_validator("nodes")
    @classmethod
    def _names(cls, value: dict[str, Node]) -> dict[str, Node]:
        for name in value:
            _file_value(v.validate_node_name, name)
        return value


# --- requests ----------------------------------------------------------------------------


class Request(BaseModel):
    """Base of the operations' inputs: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class EmptyRequest(Request):
    pass


class PageRequest(Request):
    """A list request that can page (state.paging): without `limit` and `cursor` it lists
    everything, as the spec says; with either, the answer carries `next_cursor`."""

    limit: Annotated[int | None, BeforeValidator(paging.check_limit)] = Field(
        default=None,
        description=f"Optional: at most this many entries (1-{paging.PAGE_MAX}); the answer then carries `next_cursor`. "
        "Without limit and cursor, everything is listed.",
        json_schema_extra={"minimum": 1, "maximum": paging.PAGE_MAX},
    )
    cursor: Annotated[str | None, BeforeValidator(paging.check_cursor_text)] = Field(
        default=None,
        description="Optional: the `next_cursor` of the previous page, to list what comes after it. Opaque; "
        "stable under concurrent writes (an entry that exists throughout is listed exactly once).",
        json_schema_extra={"minLength": 1, "maxLength": paging.MAX_CURSOR_CHARS, "pattern": "^[A-Za-z0-9_-]+$"},
    )


class DomainRequest(Request):
    domain: DomainName = Field(description="Domain name.")


class EnableEmailRequest(Request):
    domain: DomainName = Field(
        description='Domain name to enable email for (e.g. "mycompany.nl"). Must be linked to this project.'
    )
    node: NodeName | None = Field(
        default=None,
        description="[Admin] The node to make the domain's home (a node with an address). Default: the addressed node "
        "with the fewest mailboxes.",
    )


class DisableEmailRequest(Request):
    domain: DomainName = Field(description="Domain name to disable email for.")


class ListDomainsRequest(PageRequest):
    pass


class AddUserRequest(Request):
    email: Email = Field(
        description='Full email address (e.g. "info@mycompany.nl"). Domain must be email-enabled on this project.'
    )
    password: Password = Field(
        description=f"Plain text password, {v.MIN_PASSWORD_BYTES}-{v.MAX_PASSWORD_BYTES} bytes in UTF-8 — will be bcrypt-hashed before storage."
    )
    quota_mb: QuotaMb | None = Field(
        default=None,
        description=f"Mailbox quota in MB, 1-{v.MAX_QUOTA_MB} (default: the state's default_quota_mb, 1024 unless configured).",
    )


class RemoveUserRequest(Request):
    email: Email = Field(description="Email address of the mailbox to remove.")
    hard_delete: Annotated[bool, BeforeValidator(_strict_bool)] = Field(
        default=False,
        description="If true, deletes the mailbox entirely: the address is gone and can be added again as a new, empty mailbox. "
        "If false (default), sets active=false: no login and no delivery, but the mailbox and its mail are kept "
        "(and the address stays taken) until a hard delete, disable-email or remove-domain.",
    )


class RestoreUserRequest(Request):
    email: Email = Field(description="Email address of the soft-deleted mailbox to reactivate.")


class ListUsersRequest(PageRequest):
    domain: DomainName | None = Field(default=None, description='Filter users by domain (e.g. "mycompany.nl").')


class UpdatePasswordRequest(Request):
    email: Email = Field(description="Email address of the user.")
    password: Password = Field(
        description=f"New plain text password, {v.MIN_PASSWORD_BYTES}-{v.MAX_PASSWORD_BYTES} bytes in UTF-8 — will be bcrypt-hashed; the old one stops working."
    )


class AddDomainRequest(Request):
    domain: DomainName = Field(description="Domain name to register.")
    project_id: ProjectId | None = Field(
        default=None, description="Optional: assign domain to a specific project (WebSumo ID)."
    )


class RemoveDomainRequest(Request):
    domain: DomainName = Field(description="Domain name to remove.")


class ListNodesRequest(PageRequest):
    pass


class AddNodeRequest(Request):
    name: NodeName = Field(description='Node identifier (e.g. "mpi02").')
    ip_address: IpAddress | None = Field(default=None, description="Optional IP whitelist for extra security.")
    address: NodeAddress | None = Field(
        default=None,
        description="Optional: where other nodes and mail clients reach the node (host name or IP). Only a node with an "
        "address becomes a domain's home; without one the node relays and proxies to the homes.",
    )


class SetNodeAddressRequest(Request):
    name: NodeName = Field(description="Node identifier.")
    address: NodeAddress | None = Field(
        description="The node's new address (host name or IP), or null to take it away (only from a node that is home "
        "to no domain)."
    )


class MoveDomainRequest(Request):
    domain: DomainName = Field(description="The email-enabled domain to move.")
    node: NodeName = Field(description="The node to make its home: a registered node with an address.")


class NodeRequest(Request):
    name: NodeName = Field(description="Node identifier.")


class SetReplicaRequest(Request):
    domain: DomainName = Field(description="The email-enabled domain (not an alias domain) to replicate.")
    node: NodeName | None = Field(
        description="The replica: a registered node with an address, other than the domain's home; null removes the "
        "replica."
    )


class PlaceDomainsRequest(Request):
    """`mailstate place` (state.place): not an API route."""

    node: NodeName | None = Field(default=None, description="Put every unplaced domain on this node.")


def _strict_keep_copy(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("keep_copy must be true or false.", code="invalid_request", field="keep_copy")
    return value


AliasAddress = Annotated[
    str,
    BeforeValidator(al.normalize_alias_address),
    Field(
        description="The alias address, local@domain (the rules of a mailbox address), or @domain for the domain's catch-all "
        "(the schema admits a catch-all of an IDN domain in no form; the server takes it as for a domain name).",
        examples=["sales@mycompany.nl", "@mycompany.nl"],
        json_schema_extra={
            "minLength": 4,
            "maxLength": v.MAX_LOCAL_PART_LENGTH + 1 + v.MAX_DOMAIN_LENGTH,
            # local@domain as an Email; @domain without A-labels (see CATCH_ALL_PATTERN).
            "anyOf": [{"pattern": v.EMAIL_PATTERN, "format": "idn-email"}, {"pattern": v.CATCH_ALL_PATTERN}],
        },
    ),
]
_DESTINATIONS_DOC = (
    f"1-{al.MAX_DESTINATIONS} email addresses, on this platform or external, no duplicates, "
    f"at most {al.MAX_DESTINATIONS_CHARS} characters together (the schema: lowercase addresses of at most "
    f"{al.MAX_DESTINATIONS_CHARS // al.MAX_DESTINATIONS - 1} characters each; the server lowercases and counts the total)."
)
# A destination as the schema admits it: the canonical (lowercase) text, since duplicates are
# found after lowercasing and uniqueItems compares the text as sent; and short enough that
# MAX_DESTINATIONS of them always fit MAX_DESTINATIONS_CHARS (each counts its length + 1).
DESTINATION_ITEM = {
    "type": "string",
    "minLength": 5,
    "maxLength": al.MAX_DESTINATIONS_CHARS // al.MAX_DESTINATIONS - 1,
    "pattern": v.CANONICAL_EMAIL_PATTERN,
    "format": "idn-email",
}
Destinations = Annotated[
    list[str],
    BeforeValidator(al.normalize_destinations),
    Field(
        description=_DESTINATIONS_DOC,
        examples=[["anna@mycompany.nl", "bob@example.org"]],
        json_schema_extra={
            "minItems": 1,
            "maxItems": al.MAX_DESTINATIONS,
            "uniqueItems": True,
            "items": DESTINATION_ITEM,
        },
    ),
]
ForwardDestinations = Annotated[
    list[str],
    BeforeValidator(lambda value: al.normalize_destinations(value, allow_empty=True)),
    Field(
        description=f"0-{al.MAX_DESTINATIONS} email addresses to forward to, no duplicates; an empty list turns forwarding off.",
        json_schema_extra={
            "minItems": 0,
            "maxItems": al.MAX_DESTINATIONS,
            "uniqueItems": True,
            "items": DESTINATION_ITEM,
        },
    ),
]


class AddAliasRequest(Request):
    address: AliasAddress = Field(
        description="New alias: local@domain or @domain (catch-all), on an email-enabled domain of this project."
    )
    destinations: Destinations


class UpdateAliasRequest(Request):
    address: AliasAddress = Field(
        description="The existing alias (local@domain or @domain) whose destinations are replaced."
    )
    destinations: Destinations


class RemoveAliasRequest(Request):
    address: AliasAddress = Field(description="The alias to remove (local@domain or @domain).")


class ListAliasesRequest(PageRequest):
    domain: DomainName | None = Field(default=None, description="Only this domain's aliases.")


class SetForwardingRequest(Request):
    email: Email = Field(description="The mailbox to forward (an active mailbox of this project).")
    destinations: ForwardDestinations
    keep_copy: Annotated[bool, BeforeValidator(_strict_keep_copy)] = Field(
        default=True, description="true (default): the mailbox keeps a copy; false: mail goes only to the destinations."
    )


class AddAliasDomainRequest(Request):
    domain: DomainName = Field(
        description="The alias domain (email-enabled, this project's): mail to x@domain goes to x@target."
    )
    target: DomainName = Field(
        description="The target domain: email-enabled, this project's, and not an alias domain itself."
    )


class RemoveAliasDomainRequest(Request):
    domain: DomainName = Field(description="The alias domain to turn back into an ordinary domain.")


class DnsRecordsRequest(Request):
    domain: DomainName = Field(description='An email-enabled domain of this project (e.g. "mycompany.nl").')


class CheckDnsRequest(Request):
    domain: DomainName = Field(description='An email-enabled domain of this project (e.g. "mycompany.nl").')


class MobileconfigRequest(Request):
    email: Email = Field(
        description='The address to set up (e.g. "info@mycompany.nl"). Any address of an email-enabled domain gets the '
        "same profile: whether the mailbox exists is never told."
    )


# --- what owners ask for (rules in state/owners.py) -------------------------------------------
# The published schemas are never looser than the checks (tests/api/test_contract.py): where a
# check counts UTF-8 bytes or looks across fields, the schema is stricter or spells the cases.
_NO_CONTROL = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029"
ONE_LINE_PATTERN = f"^[^{_NO_CONTROL}]+$"
# A body: no control character but newline and tab, and at least one visible character.
BODY_PATTERN = f"^[\\t\\n ]*[^\\s{_NO_CONTROL}][^\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$"
DATE_PATTERN = "^[1-9][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])$"
_SEGMENT = "[A-Za-z0-9_-](?:[A-Za-z0-9 _.-]{0,198}[A-Za-z0-9_-])?"
FOLDER_PATTERN = f"^(?![^\\n]*\\.\\.){_SEGMENT}(?:/{_SEGMENT})*$"
FIELD_PATTERN = "^(?:from|to|subject|header:[A-Za-z0-9][A-Za-z0-9-]{0,63})$"
APP_PASSWORD_NAME_PATTERN = ow.APP_PASSWORD_NAME.pattern


def _optional(check: Any) -> Any:
    return lambda value: None if value is None else check(value)


def _strict_flag(name: str) -> Any:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false.", code="invalid_request", field=name)
        return value

    return check


def _filter_item_schema() -> dict[str, Any]:
    """A filter rule's JSON schema: one branch per action, so that `target` is required exactly
    where the server requires it (fileinto: a folder, redirect: an address, else none)."""
    common: dict[str, Any] = {
        "name": {
            "type": "string",
            "minLength": 1,
            "maxLength": ow.MAX_FILTER_NAME_CHARS,
            "pattern": ONE_LINE_PATTERN,
            "description": "A name for the rule (shown by list-filters).",
        },
        "field": {
            "type": "string",
            "pattern": FIELD_PATTERN,
            "description": "What the rule looks at: from, to, subject, or header:<Name>.",
        },
        "op": {"type": "string", "pattern": "^(?:contains|is)$", "description": "contains or is (case-insensitive)."},
        "value": {
            "type": "string",
            "minLength": 1,
            "maxLength": ow.MAX_VALUE_CHARS,
            "pattern": ONE_LINE_PATTERN,
            "description": f"The text to look for, one line of at most {ow.MAX_VALUE_CHARS} characters.",
        },
        "stop": {"type": "boolean", "description": "Stop after this rule when it matches (default false)."},
    }
    folder = {
        "type": "string",
        "minLength": 1,
        "maxLength": ow.MAX_FOLDER_CHARS,
        "pattern": FOLDER_PATTERN,
        "description": "The folder; '/' separates levels (Work/Projects). Created if needed.",
    }
    address = {**DESTINATION_ITEM, "description": "The address to redirect to (the forwarding rules apply)."}
    branches = []
    for action, target in (("fileinto", folder), ("redirect", address), ("discard", None), ("mark_read", None)):
        props = {**common, "action": {"type": "string", "pattern": f"^{action}$"}}
        required = ["name", "field", "op", "value", "action"]
        if target is not None:
            props["target"] = target
            required.append("target")
        branches.append({"type": "object", "properties": props, "required": required, "additionalProperties": False})
    return {"anyOf": branches}


class SetVacationRequest(Request):
    email: Email = Field(description="The mailbox (an active mailbox of this project).")
    enabled: Annotated[bool, BeforeValidator(_strict_flag("enabled"))] = Field(
        description="true: reply while the dates allow; false: no replies (the text and dates are kept)."
    )
    subject: Annotated[str | None, BeforeValidator(_optional(ow.check_subject))] = Field(
        default=None,
        description=f"The reply's subject, one line of at most {ow.MAX_SUBJECT_CHARS} characters (null: 'Auto: ' and "
        "the message's subject). Left out: the stored one is kept.",
        json_schema_extra={"minLength": 1, "maxLength": ow.MAX_SUBJECT_CHARS, "pattern": ONE_LINE_PATTERN},
    )
    body: Annotated[str | None, BeforeValidator(_optional(ow.check_body))] = Field(
        default=None,
        description=f"The reply's text, at most {ow.MAX_BODY_BYTES} bytes (16 KiB) in UTF-8; newlines and tabs allowed. "
        "Left out: the stored one is kept (an enabled vacation needs one).",
        json_schema_extra={
            "minLength": 1,
            "maxLength": ow.MAX_BODY_BYTES // 4,
            "x-max-bytes": ow.MAX_BODY_BYTES,
            "pattern": BODY_PATTERN,
        },
    )
    start: Annotated[
        date | None,
        BeforeValidator(_optional(lambda x: ow.check_date(x, "start"))),
        WithJsonSchema({"anyOf": [{"type": "string", "pattern": DATE_PATTERN}, {"type": "null"}]}),
    ] = Field(
        default=None,
        description="First day of replies, an ISO date (UTC), e.g. 2026-07-01; null: from now. Left out: kept.",
    )
    end: Annotated[
        date | None,
        BeforeValidator(_optional(lambda x: ow.check_date(x, "end"))),
        WithJsonSchema({"anyOf": [{"type": "string", "pattern": DATE_PATTERN}, {"type": "null"}]}),
    ] = Field(
        default=None, description="Last day of replies, an ISO date (UTC), not before start; none: until turned off."
    )
    interval_days: Annotated[int, BeforeValidator(ow.check_interval)] = Field(
        default=ow.DEFAULT_INTERVAL_DAYS,
        description=f"At most one reply per sender in this many days, {ow.MIN_INTERVAL_DAYS}-{ow.MAX_INTERVAL_DAYS} "
        f"(default {ow.DEFAULT_INTERVAL_DAYS}). Left out: kept.",
        json_schema_extra={"minimum": ow.MIN_INTERVAL_DAYS, "maximum": ow.MAX_INTERVAL_DAYS},
    )


class SetFiltersRequest(Request):
    email: Email = Field(description="The mailbox (an active mailbox of this project).")
    filters: Annotated[list[dict[str, Any]], BeforeValidator(ow.normalize_filters)] = Field(
        description=f"The rules, in order (0-{ow.MAX_FILTERS}; [] removes every rule). Each: name, field (from, to, "
        "subject, header:<Name>), op (contains, is), value, action (fileinto, discard, redirect, mark_read), target "
        "(a folder for fileinto, an address for redirect), stop.",
        json_schema_extra={"minItems": 0, "maxItems": ow.MAX_FILTERS, "items": _filter_item_schema()},
    )


class MailboxRequest(Request):
    email: Email = Field(description="The mailbox.")


class AddAppPasswordRequest(Request):
    email: Email = Field(description="The mailbox (an active mailbox of this project); also the login.")
    name: Annotated[str, BeforeValidator(ow.check_app_password_name)] = Field(
        description="What the password is for, e.g. 'iPhone Anna': 1-64 letters, digits, spaces or . @ ( ) + ' _ -; "
        "unique in the mailbox (case-insensitive).",
        json_schema_extra={
            "minLength": 1,
            "maxLength": ow.MAX_APP_PASSWORD_NAME_CHARS,
            "pattern": APP_PASSWORD_NAME_PATTERN,
        },
    )
    scopes: Annotated[list[str], BeforeValidator(ow.normalize_scopes)] = Field(
        description="Where it may log in: imap (reading mail), smtp (sending), or both.",
        json_schema_extra={
            "minItems": 1,
            "maxItems": len(ow.SCOPES),
            "uniqueItems": True,
            "items": {"type": "string", "pattern": "^(?:imap|smtp)$"},
        },
    )


class RemoveAppPasswordRequest(Request):
    email: Email = Field(description="The mailbox.")
    name: Annotated[str, BeforeValidator(ow.check_app_password_name)] = Field(
        description="The app password's name.",
        json_schema_extra={
            "minLength": 1,
            "maxLength": ow.MAX_APP_PASSWORD_NAME_CHARS,
            "pattern": APP_PASSWORD_NAME_PATTERN,
        },
    )


class LinkDomainRequest(Request):
    domain: DomainName = Field(description="Domain name to link to a project (the dashboard's Domains tab).")
    project_id: ProjectId = Field(description="Project (WebSumo) id.")


class UnlinkDomainRequest(Request):
    domain: DomainName = Field(description="Domain name to unlink from its project.")


def _limit_value(name: str) -> Any:
    low, high = LIMIT_RANGES[name]

    def check(value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise InvalidInput(
                f"{name} must be a whole number from {low} to {high}, or null to remove the limit.",
                code="invalid_limits",
                field=name,
            )
        return value

    return check


def _limit_request_field(name: str) -> Any:
    low, high = LIMIT_RANGES[name]
    return Annotated[
        int | None,
        BeforeValidator(_limit_value(name)),
        Field(
            default=None,
            description=f"{LIMIT_DOCS[name]} {low}-{high}; null removes the limit; leave it out to keep it as it is.",
            json_schema_extra={"minimum": low, "maximum": high},
        ),
    ]


def _scope_schema(schema: dict[str, Any]) -> None:
    # project_id or domain (or both: the domain, checked to be the project's); never null.
    props = schema.get("properties", {})
    for name in ("project_id", "domain"):
        branches = props.get(name, {}).pop("anyOf", None)
        if branches:
            described = props[name].get("description")
            props[name].update(next(b for b in branches if b.get("type") != "null"))
            props[name].pop("default", None)
            if described:
                props[name]["description"] = described
    schema["anyOf"] = [{"required": ["project_id"]}, {"required": ["domain"]}]


class SetLimitsRequest(Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_scope_schema)

    project_id: ProjectId | None = Field(
        default=None,
        description="The project whose limits to set; with `domain` too, the domain's, which must be this project's.",
    )
    domain: DomainName | None = Field(default=None, description="The domain whose limits to set.")
    max_mailboxes: _limit_request_field("max_mailboxes")  # type: ignore[valid-type]
    max_aliases: _limit_request_field("max_aliases")  # type: ignore[valid-type]
    max_quota_mb: _limit_request_field("max_quota_mb")  # type: ignore[valid-type]
    storage_mb: _limit_request_field("storage_mb")  # type: ignore[valid-type]
    send_per_hour: _limit_request_field("send_per_hour")  # type: ignore[valid-type]
    send_per_day: _limit_request_field("send_per_day")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _a_scope(self) -> SetLimitsRequest:
        if self.project_id is None and self.domain is None:
            raise InvalidInput("Give project_id or domain: whose limits to set.", code="invalid_scope")
        return self

    def changes(self) -> dict[str, int | None]:
        """The limits the request names (null: remove), in LIMIT_NAMES order."""
        return {name: getattr(self, name) for name in LIMIT_NAMES if name in self.model_fields_set}


def _query_project_id(value: object) -> object:
    # A query string carries text: "42" is project 42 (a JSON body's 42 is taken as it is).
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,18}", value):
        return int(value)
    return value


QueryProjectId = Annotated[
    int,
    BeforeValidator(v.validate_project_id),
    BeforeValidator(_query_project_id),
    Field(
        description="Project (WebSumo) id, a positive whole number.",
        json_schema_extra={"minimum": 1, "maximum": 2**63 - 1},
    ),
]


class ListLimitsRequest(Request):
    project_id: QueryProjectId | None = Field(default=None, description="Only this project and its domains.")
    domain: DomainName | None = Field(default=None, description="Only this domain (and its project's limits).")


def _scope_one(schema: dict[str, Any]) -> None:
    # domain or email (exactly one); never null.
    props = schema.get("properties", {})
    for name in ("domain", "email"):
        branches = props.get(name, {}).pop("anyOf", None)
        if branches:
            described = props[name].get("description")
            props[name].update(next(b for b in branches if b.get("type") != "null"))
            props[name].pop("default", None)
            if described:
                props[name]["description"] = described
    schema["oneOf"] = [{"required": ["domain"]}, {"required": ["email"]}]


class SetSpamPolicyRequest(Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_scope_one)

    domain: DomainName | None = Field(default=None, description="The domain whose policy to set (not with email).")
    email: Email | None = Field(default=None, description="The mailbox whose policy to set (not with domain).")
    action: Literal["junk", "reject", "off"] | None = Field(
        description="junk: over junk_score into Junk (Sieve); reject: over reject_score refused at SMTP time (5xx), "
        "over junk_score into Junk; off: neither. null: remove this override (the domain's, or mailstate.yaml's, "
        "applies)."
    )
    junk_score: Annotated[float | None, BeforeValidator(_score("junk_score"))] = Field(
        default=None,
        description="rspamd score from which a message is junked: 0.1 to 100, rounded to one decimal place; null "
        "or left out: inherited.",
        json_schema_extra={"minimum": spam.MIN_SCORE, "maximum": spam.MAX_SCORE},
    )
    reject_score: Annotated[float | None, BeforeValidator(_score("reject_score"))] = Field(
        default=None,
        description="rspamd score from which a message is refused (reject): 0.1 to 100, rounded to one decimal "
        "place; null or left out: inherited.",
        json_schema_extra={"minimum": spam.MIN_SCORE, "maximum": spam.MAX_SCORE},
    )

    @model_validator(mode="after")
    def _one_scope(self) -> SetSpamPolicyRequest:
        if (self.domain is None) == (self.email is None):
            raise InvalidInput("Give domain or email (one of them): whose spam policy to set.", code="invalid_scope")
        if self.action is None and (self.junk_score is not None or self.reject_score is not None):
            raise InvalidInput(
                "action null removes the override; scores need an action.", code="invalid_spam_policy", field="action"
            )
        spam.check_scores(self.junk_score, self.reject_score)
        return self


def _rule_action(value: object) -> object:
    if value not in spam.SENDER_ACTIONS:
        raise InvalidInput("action must be allow or block.", code="invalid_sender_rule", field="action")
    return value


Sender = Annotated[
    str,
    BeforeValidator(spam.normalize_sender),
    Field(
        description="An envelope sender: an address (bob@example.org) or a whole domain with its @ (@example.org); "
        "lowercased, an IDN as punycode (the schema admits a whole IDN domain in no form; the server takes it as "
        "for a domain name).",
        json_schema_extra={
            "minLength": 4,
            "maxLength": v.MAX_LOCAL_PART_LENGTH + 1 + v.MAX_DOMAIN_LENGTH,
            # an address as an Email; @domain without A-labels (see CATCH_ALL_PATTERN).
            "anyOf": [{"pattern": v.EMAIL_PATTERN, "format": "idn-email"}, {"pattern": v.CATCH_ALL_PATTERN}],
        },
    ),
]


class AddSenderRuleRequest(Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_scope_one)

    domain: DomainName | None = Field(default=None, description="The domain whose list it goes on (not with email).")
    email: Email | None = Field(default=None, description="The mailbox whose list it goes on (not with domain).")
    sender: Sender
    action: Annotated[Literal["allow", "block"], BeforeValidator(_rule_action)] = Field(
        description="allow: the sender's mail is never junked or refused for its score; block: it is refused at "
        "SMTP time (5xx)."
    )

    @model_validator(mode="after")
    def _one_scope(self) -> AddSenderRuleRequest:
        if (self.domain is None) == (self.email is None):
            raise InvalidInput("Give domain or email (one of them): whose list.", code="invalid_scope")
        return self


class RemoveSenderRuleRequest(Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_scope_one)

    domain: DomainName | None = Field(default=None, description="The domain whose list it is on (not with email).")
    email: Email | None = Field(default=None, description="The mailbox whose list it is on (not with domain).")
    sender: Sender

    @model_validator(mode="after")
    def _one_scope(self) -> RemoveSenderRuleRequest:
        if (self.domain is None) == (self.email is None):
            raise InvalidInput("Give domain or email (one of them): whose list.", code="invalid_scope")
        return self


class ListSenderRulesRequest(Request):
    domain: DomainName | None = Field(default=None, description="Only this domain and its mailboxes.")
    email: Email | None = Field(default=None, description="Only this mailbox.")


class ListSpamPolicyRequest(Request):
    domain: DomainName | None = Field(default=None, description="Only this domain and its mailboxes.")


class SetQuotaRequest(Request):
    email: Email = Field(description="The active mailbox whose quota changes.")
    quota_mb: QuotaMb = Field(description=f"The new quota in MB, 1-{v.MAX_QUOTA_MB}.")


class SuspendSendingRequest(Request):
    email: Email = Field(description="The mailbox that may no longer send (it still receives and logs in).")
    reason: str = Field(
        min_length=1,
        max_length=200,
        pattern=SUSPEND_REASON_PATTERN,
        description="Why, for the audit log and list-users (1-200 characters, one line); never shown to mail clients.",
    )


class ResumeSendingRequest(Request):
    email: Email = Field(description="The suspended mailbox that may send again.")


WEBHOOK_EVENTS: tuple[str, ...] = (
    "mailbox.created",
    "mailbox.deleted",
    "mailbox.restored",
    "domain.enabled",
    "domain.disabled",
    "quota.threshold",
    "sending.limited",
    "sending.suspended",
    "node.stale",
    "node.recovered",
    "dns.check_failed",
)
# Events about the platform, not a project: only admin webhooks get them.
ADMIN_EVENTS: frozenset[str] = frozenset({"node.stale", "node.recovered"})
WebhookEvent = Literal[
    "mailbox.created",
    "mailbox.deleted",
    "mailbox.restored",
    "domain.enabled",
    "domain.disabled",
    "quota.threshold",
    "sending.limited",
    "sending.suspended",
    "node.stale",
    "node.recovered",
    "dns.check_failed",
]
WEBHOOK_ID_PATTERN = r"^wh_[0-9a-f]{16}$"
_URL_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_URL_PORT = r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
# What state/webhooks.py's parse_url takes, a little stricter (https only, a lowercase host).
WEBHOOK_URL_PATTERN = rf"^https://{_URL_LABEL}(?:\.{_URL_LABEL})*{_URL_PORT}(?:/[\x21-\x7e]*)?$"
# whsec_ + the base64 of 24-64 bytes (a little stricter: at most 63, canonical padding).
_B64 = "[A-Za-z0-9+/]"
WEBHOOK_SECRET_PATTERN = (
    rf"^whsec_(?:(?:{_B64}{{4}}){{8,21}}|(?:{_B64}{{4}}){{8,20}}(?:{_B64}[AQgw]==|{_B64}{{2}}[AEIMQUYcgkosw048]=))$"
)
MAX_WEBHOOK_URL = 2000


def _webhook_url(value: object) -> object:
    # Its syntax and address are checked by state/webhooks.py (the rule depends on the server's
    # MAILSTATE_WEBHOOK_ALLOW_PRIVATE); here only that it is text of a sane length.
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_WEBHOOK_URL:
        raise InvalidInput(
            f"url must be an https:// URL of at most {MAX_WEBHOOK_URL} characters.",
            code="invalid_webhook_url",
            field="url",
        )
    return value


def _webhook_secret(value: object) -> object:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"whsec_[A-Za-z0-9+/]{32,88}={0,2}", value)):
        raise InvalidInput(
            "secret must be whsec_ followed by the base64 of 24-64 random bytes.",
            code="invalid_webhook_secret",
            field="secret",
        )
    return value


class AddWebhookRequest(Request):
    url: Annotated[str, BeforeValidator(_webhook_url)] = Field(
        description="Where events are POSTed: https:// to a public address (http and private or loopback addresses only "
        "when the server runs with MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1; the schema cannot say which addresses are "
        "public, and says https only). A host name or IPv4 address, an optional port, no user:password@ part.",
        examples=["https://hooks.example.net/mailstate"],
        json_schema_extra={"minLength": 9, "maxLength": MAX_WEBHOOK_URL, "pattern": WEBHOOK_URL_PATTERN},
    )
    events: list[WebhookEvent] = Field(
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        json_schema_extra={"uniqueItems": True},
        description="The events to deliver (node.stale and node.recovered need an admin token).",
    )
    secret: Annotated[str | None, BeforeValidator(_webhook_secret)] = Field(
        default=None,
        description="Optional: your own signing secret, `whsec_` + base64 of 24-64 random bytes; default: a new one. "
        "Answered once, never listed.",
        json_schema_extra={"writeOnly": True, "pattern": WEBHOOK_SECRET_PATTERN},
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise InvalidInput("events lists an event twice.", code="invalid_events", field="events")
        return value


class ListWebhooksRequest(Request):
    pass


class RemoveWebhookRequest(Request):
    id: str = Field(pattern=WEBHOOK_ID_PATTERN, description="The webhook's id (from add-webhook or list-webhooks).")


# --- responses ---------------------------------------------------------------------------
# What each operation answers (the success body). OpenAPI's response schemas and the MCP
# tools' outputSchema are derived from these; tests hold every real answer to its model.

SHA_PATTERN = r"^[0-9a-f]{40}([0-9a-f]{24})?$"
CommitSha = Annotated[
    str | None,
    Field(
        description="The signed commit this write made, or null when nothing changed (a no-op).",
        json_schema_extra={"pattern": SHA_PATTERN},
    ),
]


class Response(BaseModel):
    """Base of the operations' answers."""


class WriteResponse(Response):
    commit: CommitSha


class DomainResponse(WriteResponse):
    """enable-email, disable-email, add-domain and link-domain."""

    domain: str = Field(description="The domain (lowercase; punycode for IDN).", examples=["mycompany.nl"])
    project_id: int | None = Field(description="The project the domain is linked to, or null.")
    email_enabled: bool = Field(description="Whether email is enabled for the domain.")
    home: str | None = Field(
        default=None,
        description="The node whose Maildirs hold the domain's mail (null in a fleet without addressed nodes, and for a "
        "domain without email).",
    )


class MoveDomainResponse(WriteResponse):
    domain: str
    from_: str | None = Field(
        alias="from",
        serialization_alias="from",
        description="The home the domain leaves (null for a domain that had none).",
    )
    to: str = Field(description="The node the domain moves to.")

    model_config = ConfigDict(populate_by_name=True)


class SetReplicaResponse(WriteResponse):
    domain: str
    home: str | None = Field(description="The domain's home.")
    replica: str | None = Field(description="The domain's replica now (null: none).")


class FailoverNodeResponse(WriteResponse):
    node: str = Field(description="The node failed over.")
    moved: list[str] = Field(description="The domains whose home is now their replica (the node is their replica).")
    unavailable: list[str] = Field(
        description="The domains homed on the node that stay there: no replica, or a replica that is not healthy "
        "(not reporting, or its last tick failed)."
    )


class SetNodeAddressResponse(WriteResponse):
    name: str
    address: str | None


class UnlinkDomainResponse(WriteResponse):
    domain: str
    project_id: None = Field(description="Always null: the domain is linked to no project.")


class DomainSummary(BaseModel):
    domain: str
    project_id: int | None
    mailboxes: int = Field(ge=0, description="Mailboxes, active and soft-deleted.")
    active_mailboxes: int = Field(ge=0)
    inactive_mailboxes: int = Field(ge=0, description="Soft-deleted mailboxes (active=false).")
    aliases: int = Field(default=0, ge=0, description="Aliases, the catch-all included.")
    alias_of: str | None = Field(
        default=None, description="For an alias domain: the domain its mail goes to; else null."
    )
    used_mb: float | None = Field(
        default=None,
        description="Mail stored in the domain's mailboxes as the nodes measured it, in MB (null before any report).",
    )
    messages: int | None = Field(
        default=None, description="Messages stored, as the nodes measured them (null before any report)."
    )
    usage_reported_at: str | None = Field(
        default=None, description="ISO 8601 time of the newest usage report, or null."
    )
    home: str | None = Field(
        default=None,
        description="The node whose Maildirs hold the domain's mail; every node accepts and serves it and passes it on "
        "there (null in a fleet without addressed nodes).",
    )
    moving_to: str | None = Field(
        default=None, description="During move-domain: the node the domain is moving to; null otherwise."
    )
    replica: str | None = Field(
        default=None,
        description="The node that keeps a copy of the domain's mailboxes in sync with the home (set-replica); null "
        "without one.",
    )
    dns_ok: bool | None = Field(
        default=None,
        description="Whether every record of dns-records was found as it should be at the last check (the background "
        "check, at most once an hour, or a check-dns call); null before the first check.",
    )
    dns_checked_at: str | None = Field(default=None, description="ISO 8601 time of that check, or null.")


class AliasResponse(WriteResponse):
    """add-alias and update-alias."""

    address: str = Field(description="The alias (local@domain, or @domain for a catch-all).")
    destinations: list[str]


class RemoveAliasResponse(WriteResponse):
    address: str
    removed: bool


class AliasInfo(BaseModel):
    address: str = Field(description="local@domain, or @domain for the domain's catch-all.")
    domain: str
    catch_all: bool = Field(description="true for the domain's catch-all (@domain).")
    destinations: list[str]


class ListAliasesResponse(Response):
    aliases: list[AliasInfo] = Field(
        description="The aliases of your project's email-enabled domains, sorted by domain and address."
    )
    next_cursor: str | None = Field(
        default=None,
        description="Only when `limit` or `cursor` was given: the cursor of the next page, or null on the last page.",
    )


class SetForwardingResponse(WriteResponse):
    email: str
    destinations: list[str] = Field(description="Where the mailbox forwards to; empty when forwarding is off.")
    keep_copy: bool


class AliasDomainResponse(WriteResponse):
    """add-alias-domain and remove-alias-domain."""

    domain: str
    alias_of: str | None = Field(description="The target domain, or null (remove-alias-domain).")


class VacationInfo(BaseModel):
    enabled: bool
    subject: str | None = None
    body: str | None = None
    start: str | None = Field(default=None, description="ISO date, or null.")
    end: str | None = Field(default=None, description="ISO date, or null.")
    interval_days: int


class VacationSummary(BaseModel):
    enabled: bool
    start: str | None = Field(default=None, description="ISO date (UTC) of the first day of replies, or null.")
    end: str | None = Field(default=None, description="ISO date (UTC) of the last day of replies, or null.")


class SetVacationResponse(WriteResponse):
    email: str
    vacation: VacationInfo | None = Field(description="What is set now; null when no vacation is kept.")


class FilterInfo(BaseModel):
    name: str
    field: str
    op: str
    value: str
    action: str
    target: str | None = None
    stop: bool


class SetFiltersResponse(WriteResponse):
    email: str
    filters: list[FilterInfo]


class ListFiltersResponse(Response):
    filters: list[FilterInfo] = Field(description="The mailbox's rules, in the order they run.")


class AddAppPasswordResponse(WriteResponse):
    name: str
    scopes: list[str]
    password: str = Field(
        description="The app password, shown this once (only its bcrypt hash is stored). Log in with the mailbox "
        "address and this password."
    )


class AppPasswordInfo(BaseModel):
    name: str
    scopes: list[str]
    created_at: str = Field(description="ISO 8601 time the password was made.")
    last_used_at: str | None = Field(description="ISO 8601 time a node last saw it log in, or null.")


class ListAppPasswordsResponse(Response):
    app_passwords: list[AppPasswordInfo]


class RemoveAppPasswordResponse(WriteResponse):
    name: str
    removed: bool


class LinkedDomain(BaseModel):
    domain: str
    project_id: int | None


class ListDomainsResponse(Response):
    domains: list[DomainSummary] = Field(description="The email-enabled domains, with mailbox counts.")
    linked_not_enabled: list[LinkedDomain] = Field(
        description="Domains linked to the project whose email is not enabled yet (enable-email enables them)."
    )
    next_cursor: str | None = Field(
        default=None,
        description="Only when `limit` or `cursor` was given: the cursor of the next page, or null on the last page.",
    )


class AddUserResponse(WriteResponse):
    email: str
    domain: str
    quota_mb: int = Field(ge=1, le=v.MAX_QUOTA_MB)
    active: bool
    id: str | None = Field(
        default=None, description="The mailbox's immutable identity (state format 2), or null (format 1)."
    )


class RestoreUserResponse(WriteResponse):
    email: str
    active: bool = Field(description="Always true after a restore.")
    restored: bool
    id: str | None = Field(
        default=None, description="The mailbox's immutable identity (state format 2), or null (format 1)."
    )


class RemoveUserResponse(WriteResponse):
    email: str
    hard_delete: bool
    active: bool = Field(description="Always false after a remove.")


class SentCounts(BaseModel):
    messages_hour: int = Field(ge=0, description="Messages sent in the last hour.")
    recipients_hour: int = Field(ge=0, description="Recipients of those messages (what send_per_hour counts).")
    messages_day: int = Field(ge=0, description="Messages sent in the last 24 hours.")
    recipients_day: int = Field(ge=0, description="Recipients of those (what send_per_day counts).")
    refused_hour: int = Field(ge=0, description="Recipients refused in the last hour for passing a limit.")
    reported_at: str = Field(description="ISO 8601 time of the node's report.")


class UserInfo(BaseModel):
    email: str
    domain: str
    quota_mb: int = Field(ge=1, le=v.MAX_QUOTA_MB)
    active: bool = Field(description="false for a soft-deleted mailbox.")
    id: str | None = Field(
        default=None, description="The mailbox's immutable identity (state format 2), or null (format 1)."
    )
    forward_to: list[str] = Field(
        default_factory=list, description="Where the mailbox forwards to (set-forwarding); empty when it does not."
    )
    keep_copy: bool = Field(default=True, description="Whether the mailbox keeps a copy of forwarded mail.")
    used_mb: float | None = Field(
        default=None, description="Mail stored, as a node measured it, in MB (null before any report)."
    )
    messages: int | None = Field(
        default=None, description="Messages stored, as a node measured them (null before any report)."
    )
    usage_reported_at: str | None = Field(default=None, description="ISO 8601 time of the usage report, or null.")
    vacation: VacationSummary | None = Field(
        default=None, description="The autoreply (set-vacation): enabled and its dates, or null when none is set."
    )
    sending: Literal["ok", "limited", "suspended"] = Field(
        default="ok",
        description="ok; limited: the node refuses its submissions (4xx) until the window frees up; suspended: every "
        "submission gets a 5xx (suspend-sending, or a node past auto_suspend_factor x the limit), until resume-sending.",
    )
    sending_reason: str | None = Field(default=None, description="Why sending is suspended, or null.")
    sent: SentCounts | None = Field(
        default=None, description="What the mailbox sent, as the nodes last reported (null before any report)."
    )


class ListUsersResponse(Response):
    users: list[UserInfo] = Field(description="Mailboxes, never their password hashes.")
    next_cursor: str | None = Field(
        default=None,
        description="Only when `limit` or `cursor` was given: the cursor of the next page, or null on the last page.",
    )


class UpdatePasswordResponse(WriteResponse):
    email: str
    updated: bool


class RemoveDomainResponse(WriteResponse):
    domain: str
    removed: bool


class ReplicationInfo(BaseModel):
    peer: str = Field(description="The replica node.")
    domains: int = Field(ge=0, description="Domains this node is the home and the peer the replica of.")
    lag_s: float | None = Field(
        description="Seconds the oldest change (delivery, flag change, expunge) not yet on the peer had waited when the "
        "node reported (0: in sync; null before a first sync)."
    )
    last_sync_at: str | None = Field(description="ISO 8601 time a sync with the peer last succeeded, or null.")
    error: str | None = Field(description="The last sync's error, or null.")


class SpamFilterReport(BaseModel):
    """The node's inbound filter (rspamd, docs/inbound.md) as its last report saw it: whether it
    answers, and its counters since it started (null while it does not answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    running: bool = Field(description="Whether rspamd answered; while it does not, port 25 tempfails (4xx).")
    scanned: int | None = Field(default=None, ge=0, le=2**53, description="Messages rspamd scanned since it started.")
    rejected: int | None = Field(
        default=None, ge=0, le=2**53, description="Messages refused at SMTP time (over a reject_score)."
    )
    junked: int | None = Field(
        default=None, ge=0, le=2**53, description="Messages marked as spam (over a junk_score), filed into Junk."
    )
    error: str | None = Field(default=None, max_length=2000, description="Why rspamd did not answer, if it did not.")


class PostscreenReport(BaseModel):
    """Port 25's postscreen (docs/inbound.md) as the node's last report counted it from Postfix's log:
    the clients it refused, since the node first counted (null before it could read the log)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dnsbl_rejected: int | None = Field(
        default=None, ge=0, le=2**53, description="Clients refused at connect (521) for the DNS blocklists."
    )
    pregreet_rejected: int | None = Field(
        default=None, ge=0, le=2**53, description="Clients that talked before their turn (550 to every RCPT)."
    )
    error: str | None = Field(default=None, max_length=2000, description="Why the node could not read its log, if so.")


class NodeInfo(BaseModel):
    name: str
    ip_address: str | None
    created_at: str = Field(description="ISO 8601 time the node was added.")
    last_sync_at: str | None = Field(
        description="ISO 8601 time of the node's last report, or null if it never reported."
    )
    applied_commit: str | None = Field(description="The commit the node serves, as it last reported.")
    status: str = Field(description="The node's last reported status (ok, error, ...), or never_synced.")
    error: str | None = Field(description="The error of the node's last tick, if any.")
    commits_behind: int | None = Field(
        description="Commits the node lacks to reach the server's accepted head; null when diverged or before its first report."
    )
    diverged: bool | None = Field(
        default=None, description="true when the node's applied commit is not an ancestor of the server's head."
    )
    lag_s: int | None = Field(
        default=None,
        description="Seconds the node is behind: now minus the commit time of the oldest accepted commit it lacks; 0 when up to "
        "date; null before its first applied commit or when diverged.",
    )
    stale: bool | None = Field(
        default=None,
        description="true when the node reported `stale` (its newest verified statement is older than its max_staleness), or "
        "when its last report is older than the server's threshold ($MAILSTATE_NODE_STALE_AFTER, 600 s); null before a report.",
    )
    statement_age_s: int | None = Field(
        default=None,
        description="Seconds since the newest statement the node verified was issued (as it last reported), or null.",
    )
    last_report_at: str | None = Field(
        default=None, description="ISO 8601 time of the node's last report (the same as last_sync_at)."
    )
    last_report_age_s: int | None = Field(default=None, description="Seconds since the node's last report, or null.")
    last_error: str | None = Field(
        default=None,
        description="The last error the node reported, kept after later reports without one (`error` is the last tick's).",
    )
    last_error_at: str | None = Field(default=None, description="ISO 8601 time of the report that carried last_error.")
    address: str | None = Field(
        default=None, description="Where other nodes and mail clients reach the node; null: never a home."
    )
    domains: int = Field(default=0, ge=0, description="Domains this node is home to.")
    mailboxes: int = Field(
        default=0, ge=0, description="Mailboxes (active and soft-deleted) of the domains it is home to."
    )
    tls_fingerprint: str | None = Field(
        default=None,
        description="SHA-256 of the TLS certificate the node reported (the other nodes pin it), or null before it did.",
    )
    replication: list[ReplicationInfo] = Field(
        default_factory=list,
        description="Per replica this node keeps in sync as the home of its domains (set-replica), as the node last "
        "reported it.",
    )
    spam_filter: SpamFilterReport | None = Field(
        default=None,
        description="The node's inbound filter (rspamd) as its last report saw it: `running` false means port 25 "
        "tempfails (4xx) until it answers again; null for a node that does not filter or never reported.",
    )
    postscreen: PostscreenReport | None = Field(
        default=None,
        description="Port 25's postscreen as the node last counted it: clients refused for the DNS blocklists "
        "and for talking before their turn; null for a node that does not count or never reported.",
    )


class ListNodesResponse(Response):
    nodes: list[NodeInfo]
    next_cursor: str | None = Field(
        default=None,
        description="Only when `limit` or `cursor` was given: the cursor of the next page, or null on the last page.",
    )


class AddNodeResponse(WriteResponse):
    name: str
    ip_address: str | None
    address: str | None = None
    created_at: str
    sync_key: str = Field(description="The node's sync key, shown this once; only its SHA-256 is stored.")


class RemoveNodeResponse(WriteResponse):
    name: str
    removed: bool


class RotateNodeKeyResponse(WriteResponse):
    name: str
    sync_key: str = Field(description="The node's new sync key, shown this once; the old key stops working.")


class DnsRecord(BaseModel):
    type: Literal["MX", "TXT", "CNAME", "SRV"] = Field(description="The record type.")
    name: str = Field(
        description="The fully qualified owner name, without the trailing dot.",
        examples=["ms1-mpi01._domainkey.mycompany.nl"],
    )
    value: str = Field(
        description="The record's value as a zone file writes it, without quotes (MX: `<preference> <host>`, SRV: `<priority> <weight> "
        "<port> <host>`; a TXT longer than 255 characters is split into 255-character strings by the DNS provider or the zone file)."
    )
    purpose: str = Field(description="What the record is for, in one sentence.")
    node: str | None = Field(default=None, description="DKIM records: the node whose key it is; else null.")
    selector: str | None = Field(default=None, description="DKIM records: the selector; else null.")
    state: str | None = Field(
        default=None, description="DKIM records: pending (published, not signing yet), active, or retired; else null."
    )


class DnsRecordsResponse(Response):
    domain: str
    records: list[DnsRecord] = Field(
        description="Every record the domain needs: MX, SPF, DKIM per node and selector, DMARC, autoconfig."
    )


class DnsCheckResult(DnsRecord):
    status: Literal["ok", "missing", "wrong", "error"] = Field(
        description="ok: published as it should be; missing: no such record (or no such name); wrong: the name has "
        "records of that kind, but not this one (see `found`); error: the lookup failed (see `error`)."
    )
    found: list[str] = Field(
        description="What DNS answered for the record's name and type, in the form of `value` (TXT at the domain "
        "itself: only the records of the same kind, e.g. v=spf1); empty when nothing was found."
    )
    error: Literal["timeout", "servfail", "refused", "no_answer_from_servers"] | None = Field(
        default=None,
        description="With status error: timeout (no answer in time), servfail (the name's server failed), refused, "
        "or no_answer_from_servers (every server failed otherwise); else null.",
    )


class CheckDnsResponse(Response):
    domain: str
    ok: bool = Field(description="true when every record's status is ok.")
    checked_at: str = Field(description="ISO 8601 time of this check.")
    resolver: str = Field(
        description="The resolver asked: `system` or the servers of $MAILSTATE_DNS_RESOLVER (e.g. 127.0.0.1:5353)."
    )
    records: list[DnsCheckResult] = Field(description="Every record of dns-records, in its order, with what DNS holds.")


class MailServer(BaseModel):
    host: str
    port: int = Field(ge=1, le=65535)
    security: Literal["tls", "starttls"] = Field(description="tls: implicit TLS from the start; starttls: STARTTLS.")


class MobileconfigResponse(Response):
    """The JSON twin of the profile (the HTTP route answers the profile itself)."""

    email: str
    domain: str
    username: str = Field(description="The login for IMAP and SMTP: the full address.")
    imap: MailServer
    smtp: list[MailServer] = Field(description="Submission servers, the preferred one first.")
    filename: str = Field(description="The profile's file name, e.g. mycompany.nl.mobileconfig.")
    content_type: str = Field(description="application/x-apple-aspen-config")
    profile: str = Field(
        description="The Apple configuration profile (XML plist) with no password in it: the device asks for it."
    )


class LimitUse(BaseModel):
    limit: int | None = Field(description="The limit set on this project or domain, or null (none).")
    use: int | None = Field(
        description="What the scope uses now (max_quota_mb: the largest quota; send_*: the most recipients one "
        "mailbox sent to in the window, as the nodes last reported; null before a report)."
    )
    effective: int | None = Field(
        default=None,
        description="send_* only: what each mailbox of the scope gets (the domain's, else the project's, else "
        "mailstate.yaml's sending default); null: no limit.",
    )


class LimitsInfo(BaseModel):
    project_id: int | None = Field(description="The project (for a domain: the project it is linked to).")
    domain: str | None = Field(description="The domain, or null for a project's own limits.")
    max_mailboxes: LimitUse
    max_aliases: LimitUse
    max_quota_mb: LimitUse
    storage_mb: LimitUse
    send_per_hour: LimitUse
    send_per_day: LimitUse


class ListLimitsResponse(Response):
    limits: list[LimitsInfo] = Field(
        description="Each project (domain null) and domain in view with its limits and what it uses; projects first."
    )


class SetLimitsResponse(WriteResponse):
    project_id: int | None
    domain: str | None
    limits: dict[str, int | None] = Field(description="Every limit of the scope as it is now (null: none).")


class EffectiveSpamPolicy(BaseModel):
    action: Literal["junk", "reject", "off"]
    junk_score: float
    reject_score: float


class SetSpamPolicyResponse(WriteResponse):
    domain: str | None = Field(default=None, description="The domain, when the call set a domain's policy.")
    email: str | None = Field(default=None, description="The mailbox, when the call set a mailbox's policy.")
    policy: SpamPolicy | None = Field(description="The override as stored now (null: none, it inherits).")
    effective: EffectiveSpamPolicy = Field(description="The policy that applies now, every field resolved.")


class SpamPolicyInfo(BaseModel):
    domain: str
    email: str | None = Field(description="The mailbox, or null for the domain's own policy.")
    policy: SpamPolicy
    effective: EffectiveSpamPolicy


class ListSpamPolicyResponse(Response):
    default: EffectiveSpamPolicy = Field(description="mailstate.yaml's policy (rspamd's own without a `spam:` block).")
    policies: list[SpamPolicyInfo] = Field(
        description="The domains and mailboxes with a policy of their own, by domain (the domain first, then its "
        "mailboxes by local part)."
    )


class SenderRuleResponse(WriteResponse):
    domain: str = Field(description="The domain of the list.")
    email: str | None = Field(description="The mailbox of the list, or null for the domain's.")
    sender: str
    action: Literal["allow", "block"]


class SenderRuleInfo(BaseModel):
    domain: str
    email: str | None = Field(description="The mailbox, or null for the domain's own list.")
    sender: str
    action: Literal["allow", "block"]


class ListSenderRulesResponse(Response):
    rules: list[SenderRuleInfo] = Field(
        description="By domain: the domain's rules, then its mailboxes' by local part; each list by sender."
    )


class SetQuotaResponse(WriteResponse):
    email: str
    quota_mb: int = Field(ge=1, le=v.MAX_QUOTA_MB)


class SendingResponse(WriteResponse):
    """suspend-sending and resume-sending."""

    email: str
    sending: Literal["ok", "suspended"] = Field(description="The mailbox's sending state in the state repo now.")
    reason: str | None = Field(default=None, description="Why it is suspended, or null.")


class WebhookInfo(BaseModel):
    id: str
    url: str
    events: list[str]
    project_id: int | None = Field(description="The project whose events it gets; null: an admin's (every project).")
    created_at: str
    pending: int = Field(ge=0, description="Deliveries waiting (first try or a retry).")
    last_success_at: str | None = Field(default=None, description="ISO 8601 time of the last delivery answered 2xx.")
    last_failure_at: str | None = Field(default=None)
    last_error: str | None = Field(default=None, description="Why the last failed try failed (a status or a timeout).")


class AddWebhookResponse(Response):
    id: str
    url: str
    events: list[str]
    project_id: int | None
    created_at: str
    secret: str = Field(
        description="The signing secret (whsec_...), shown this once: receivers verify each delivery's "
        "webhook-signature with it (Standard Webhooks, HMAC-SHA256)."
    )


class ListWebhooksResponse(Response):
    webhooks: list[WebhookInfo]


class RemoveWebhookResponse(Response):
    id: str
    removed: bool


class HealthResponse(BaseModel):
    """`/v1/health`. Anonymous callers and project tokens get `status` only; an admin token
    also gets the head, the mode, the upstream's error and a refused commit's problems."""

    status: str = Field(
        description="ok, or degraded (an upstream error, a refused commit, or a statement that could not be written or pushed).",
        examples=["ok"],
    )
    head: str | None = Field(default=None, description="[Admin] The accepted head commit.")
    mode: str | None = Field(default=None, description="[Admin] local or upstream.")
    upstream: dict[str, Any] | None = Field(
        default=None, description="[Admin] The upstream URL (redacted) and its last error."
    )
    refused_commit: dict[str, Any] | None = Field(
        default=None,
        description="[Admin] A commit the server refused, and why; `answered`: the commits a server answered in "
        "it, which are kept (writes answer 503 state_needs_repair until main is repaired).",
    )
    statement: dict[str, Any] | None = Field(
        default=None,
        description="[Admin] The accepted-head statement (refs/mailstate/accepted) this server last wrote or verified: "
        "head, issued_at (unix seconds), and the last error writing or pushing it (degraded while set).",
    )


# Operation name → its answer's model (state.ops.OPERATIONS has exactly these names).
RESPONSES: dict[str, type[Response]] = {
    "enable-email": DomainResponse,
    "disable-email": DomainResponse,
    "list-domains": ListDomainsResponse,
    "add-user": AddUserResponse,
    "remove-user": RemoveUserResponse,
    "restore-user": RestoreUserResponse,
    "list-users": ListUsersResponse,
    "update-password": UpdatePasswordResponse,
    "add-domain": DomainResponse,
    "remove-domain": RemoveDomainResponse,
    "list-nodes": ListNodesResponse,
    "add-node": AddNodeResponse,
    "link-domain": DomainResponse,
    "unlink-domain": UnlinkDomainResponse,
    "remove-node": RemoveNodeResponse,
    "rotate-node-key": RotateNodeKeyResponse,
    "add-alias": AliasResponse,
    "update-alias": AliasResponse,
    "remove-alias": RemoveAliasResponse,
    "list-aliases": ListAliasesResponse,
    "set-forwarding": SetForwardingResponse,
    "add-alias-domain": AliasDomainResponse,
    "remove-alias-domain": AliasDomainResponse,
    "dns-records": DnsRecordsResponse,
    "set-vacation": SetVacationResponse,
    "set-filters": SetFiltersResponse,
    "list-filters": ListFiltersResponse,
    "add-app-password": AddAppPasswordResponse,
    "list-app-passwords": ListAppPasswordsResponse,
    "remove-app-password": RemoveAppPasswordResponse,
    "move-domain": MoveDomainResponse,
    "set-node-address": SetNodeAddressResponse,
    "set-replica": SetReplicaResponse,
    "failover-node": FailoverNodeResponse,
    "check-dns": CheckDnsResponse,
    "mobileconfig": MobileconfigResponse,
    "set-limits": SetLimitsResponse,
    "list-limits": ListLimitsResponse,
    "set-quota": SetQuotaResponse,
    "set-spam-policy": SetSpamPolicyResponse,
    "add-sender-rule": SenderRuleResponse,
    "list-sender-rules": ListSenderRulesResponse,
    "remove-sender-rule": SenderRuleResponse,
    "list-spam-policy": ListSpamPolicyResponse,
    "suspend-sending": SendingResponse,
    "resume-sending": SendingResponse,
    "add-webhook": AddWebhookResponse,
    "list-webhooks": ListWebhooksResponse,
    "remove-webhook": RemoveWebhookResponse,
}


R = TypeVar("R", bound=BaseModel)

# Which code a pydantic-level failure of a field maps to (our own validators raise
# InvalidInput themselves; this covers missing fields and wrong JSON types).
_FIELD_CODES = {
    "domain": "invalid_domain",
    "email": "invalid_email",
    "password": "invalid_password",
    "quota_mb": "invalid_quota",
    "name": "invalid_node_name",
    "ip_address": "invalid_ip_address",
    "project_id": "invalid_project_id",
    "address": "invalid_email",
    "destinations": "invalid_destinations",
    "target": "invalid_domain",
    "node": "invalid_node_name",
    "limit": "invalid_limit",
    "cursor": "invalid_cursor",
    "filters": "invalid_filter",
    "action": "invalid_spam_policy",
    "sender": "invalid_sender_rule",
    "junk_score": "invalid_spam_policy",
    "reject_score": "invalid_spam_policy",
    "scopes": "invalid_scopes",
    "enabled": "invalid_vacation",
    "subject": "invalid_vacation",
    "body": "invalid_vacation",
    "start": "invalid_vacation",
    "end": "invalid_vacation",
    "interval_days": "invalid_vacation",
    **dict.fromkeys(LIMIT_NAMES, "invalid_limits"),
    "reason": "invalid_reason",
    "url": "invalid_webhook_url",
    "events": "invalid_events",
    "secret": "invalid_webhook_secret",
    "id": "invalid_webhook_id",
}


def parse(model: type[R], data: Any) -> R:
    """Validate `data` into `model`, raising `InvalidInput` (never pydantic's error)."""
    if isinstance(data, model):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_input_from(exc) from None


def invalid_input_from(exc: ValidationError) -> InvalidInput:
    """The first pydantic error as an InvalidInput, without echoing the input value."""
    err = exc.errors(include_input=False, include_url=False)[0]
    loc = [str(part) for part in err.get("loc", ())]
    field = loc[0] if loc else None
    kind = err.get("type", "")
    if kind == "missing":
        return InvalidInput(f"The field '{field}' is required.", code="missing_field", field=field)
    if kind == "extra_forbidden":
        return InvalidInput(f"Unknown field '{field}'.", code="unknown_field", field=field)
    code = _FIELD_CODES.get(field or "", "invalid_request")
    where = f"'{field}'" if field else "the request"
    if not _safe_message(err):
        return InvalidInput(f"Invalid value for {where}.", code=code, field=field)
    return InvalidInput(f"Invalid value for {where}: {err.get('msg', 'invalid value')}.", code=code, field=field)


# Context keys whose text comes from the input or from a foreign exception: a message built
# with them could echo a password's characters or a codec's internals (`'utf-8' codec can't
# encode character '\udc80' in position 3`), so such an error is reported by its field only.
_UNSAFE_CONTEXT = frozenset({"error", "tag", "discriminator", "class", "class_name", "attribute", "method_name"})


def _safe_message(err: Any) -> bool:
    return not (_UNSAFE_CONTEXT & set(err.get("ctx") or {}))
