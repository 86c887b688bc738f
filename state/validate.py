"""Normalisers and validators for every value that ends up in a file, a path or a map.

Each function returns the canonical form or raises `InvalidInput` with a specific code.
They are deliberately conservative: a value that passes can be written, unquoted, into a
Dovecot passwd-file line (fields split on `:`), a Postfix map (key and value split on
whitespace) and a file name, without escaping.
"""

from __future__ import annotations

import ipaddress
import re

import idna

from mailstate.state.errors import InvalidInput

MAX_DOMAIN_LENGTH = 253
MAX_LOCAL_PART_LENGTH = 64
MIN_PASSWORD_BYTES = 8
# bcrypt only reads the first 72 bytes; a longer password would be silently truncated,
# so two passwords sharing 72 bytes would both log in. Refuse instead.
MAX_PASSWORD_BYTES = 72
MAX_QUOTA_MB = 1_048_576  # 1 TiB
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# A conservative dot-atom: no `/` (path), `:` (passwd field), `%` or `!` (routing), quotes,
# whitespace, or leading/trailing/double dots (`..` is a path component).
_LOCAL = re.compile(r"^[a-z0-9](?:[a-z0-9_+-]|\.(?=[a-z0-9_+-]))*$")
# At most 59 characters, so that the node's DKIM selectors ms1-<name> and ms2-<name> are DNS
# labels (<= 63). The node's twin: pipull/rules.py NODE_NAME_RE (vectors: node_names.json).
NODE_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,57}[a-z0-9])?$"
NODE_NAME_MAX = 59
_NODE = re.compile(NODE_NAME_PATTERN)
NODE_NAME_RULE = "1-59 lowercase letters, digits or hyphens, not starting or ending with a hyphen"
_ASCII_SAFE = re.compile(r"^[\x21-\x7e]+$")


# JSON Schema patterns (ECMA 262, and Python's `re` reads them the same) for the inputs above,
# published in OpenAPI and the MCP tools' input schemas. They are never looser than the
# functions: every string that matches (and passes the `format` beside it, see state/models.py)
# is accepted; tests/api/test_contract.py generates requests from the published schema to hold
# that. They use negative lookaheads only (for the length bounds), no positive ones.
def _label_pattern(alpha: str, a_labels: bool = True) -> str:
    """A DNS label: 1-63 letters, digits or hyphens, no hyphen at either end, and `--` in
    positions 3-4 only as an A-label's `xn--` (whose punycode the idn-hostname format checks;
    without `a_labels`, where no format can check it, none)."""
    an, ldh = f"[{alpha}0-9]", f"[{alpha}0-9-]"
    xn = "xn" if alpha == "a-z" else "[Xx][Nn]"
    ldh_label = f"(?!{an}{{2}}--){an}(?:{ldh}{{0,61}}{an})?"
    return f"(?:{xn}--{an}(?:{ldh}{{0,57}}{an})?|{ldh_label})" if a_labels else f"(?:{ldh_label})"


def _domain_body(alpha: str, a_labels: bool = True) -> str:
    label = _label_pattern(alpha, a_labels)
    return f"(?:{label}\\.)+(?![0-9]+$){label}"


def _local_body(alpha: str) -> str:
    return f"(?![^@]{{{MAX_LOCAL_PART_LENGTH + 1}}})[{alpha}0-9](?:[{alpha}0-9_+-]|\\.[{alpha}0-9_+-])*"


# Case-insensitive where the server lowercases (a domain, an address); lowercase only where
# the canonical text itself is compared (destinations: uniqueItems sees the text as sent).
DOMAIN_PATTERN = f"^{_domain_body('A-Za-z')}$"
EMAIL_PATTERN = f"^{_local_body('A-Za-z')}@(?![^@]{{{MAX_DOMAIN_LENGTH + 1}}}){_domain_body('A-Za-z')}$"
CANONICAL_EMAIL_PATTERN = f"^{_local_body('a-z')}@(?![^@]{{{MAX_DOMAIN_LENGTH + 1}}}){_domain_body('a-z')}$"
# A catch-all `@domain` has no JSON Schema format to check an A-label with: its pattern has none.
CATCH_ALL_PATTERN = f"^@(?![^@]{{{MAX_DOMAIN_LENGTH + 1}}}){_domain_body('A-Za-z', a_labels=False)}$"
IP_PATTERN = "^[0-9A-Fa-f:.]+$"
# 8-72 UTF-8 bytes without NUL or a lone surrogate, as characters: 8-72 ASCII characters, or
# 8-18 of any (18 four-byte characters are 72 bytes). A longer non-ASCII password may still
# fit 72 bytes (the server counts bytes: x-max-bytes); the schema cannot count bytes.
PASSWORD_PATTERN = "^(?:[\\x01-\\x7f]{8,72}|[^\\x00\\ud800-\\udfff]{8,18})$"

# A mailbox id (state format 2): the creation date and 24 random bits, e.g. 20261201-3fa9c2.
# Digits, one hyphen and lowercase hex: it can never hold `/`, `.`, `~`, `:` or whitespace,
# so `<local>~<id>` is always one plain path segment.
MAILBOX_ID = re.compile(r"^[0-9]{8}-[0-9a-f]{6}$")


def normalize_domain(value: object, *, field: str = "domain") -> str:
    """Lowercase, IDN to punycode, RFC 1035 labels, at least two labels."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("A domain name is required.", code="invalid_domain", field=field)
    if len(value) > 1000 or not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidInput(
            "A domain name may not contain whitespace or control characters.",
            code="invalid_domain",
            field=field,
        )
    text = value.lower()
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise InvalidInput(
                "The domain name is not a valid internationalised domain name.",
                code="invalid_domain",
                field=field,
            ) from exc
    labels = text.split(".")
    if len(text) > MAX_DOMAIN_LENGTH or len(labels) < 2:
        raise InvalidInput(
            "A domain name needs at least two labels (like example.com) and at most 253 characters.",
            code="invalid_domain",
            field=field,
        )
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise InvalidInput(
                "Each part of a domain name must be 1-63 letters, digits or hyphens, "
                "not starting or ending with a hyphen.",
                code="invalid_domain",
                field=field,
            )
    if labels[-1].isdigit():
        raise InvalidInput("The top-level domain may not be all digits.", code="invalid_domain", field=field)
    if "--" in text:
        _check_idna(text, field)
    return text


def _check_idna(text: str, field: str) -> None:
    """Refuse what IDNA 2008 (the `idna` package) cannot decode, and an A-label that is not the
    canonical encoding of its own decoding: `xn--a` (punycode for U+0080, not allowed in a
    name), `xn--zz-zzzzz` (symbols), or a reserved `ab--c` label (`--` in positions 3-4 is for
    A-labels only). Only a label holding `--` can fail here once the LDH rules above passed."""
    try:
        canonical = idna.encode(idna.decode(text)).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidInput(
            "The domain name is not a valid internationalised domain name: a label with '--' in the third "
            "and fourth position must be valid punycode (an xn-- A-label) of an allowed name.",
            code="invalid_domain",
            field=field,
        ) from exc
    if canonical != text:
        raise InvalidInput(
            f"The domain name's punycode is not in canonical form; send {canonical}.",
            code="invalid_domain",
            field=field,
        )


def is_local_part(value: object) -> bool:
    """True for a local part already in canonical (lowercase, valid) form."""
    return isinstance(value, str) and 0 < len(value) <= MAX_LOCAL_PART_LENGTH and _LOCAL.fullmatch(value) is not None


def is_mailbox_id(value: object) -> bool:
    """True for a mailbox id of the form `<yyyymmdd>-<6 lowercase hex>`."""
    return isinstance(value, str) and MAILBOX_ID.fullmatch(value) is not None


def normalize_email(value: object, *, field: str = "email") -> tuple[str, str]:
    """Split and normalise an address into (local part, domain)."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise InvalidInput(
            "An email address needs exactly one @, like info@example.com.",
            code="invalid_email",
            field=field,
        )
    local, _, domain_part = value.partition("@")
    # ASCII first, lowercase after: str.lower() folds some non-ASCII look-alikes into ASCII
    # (KELVIN SIGN U+212A -> "k"), which would turn one address into another.
    local = local.lower() if local.isascii() else local
    if not local or len(local) > MAX_LOCAL_PART_LENGTH or not _LOCAL.fullmatch(local):
        raise InvalidInput(
            "The part before @ may use ASCII letters, digits, '.', '_', '+' and '-' (no look-alike letters "
            "from other scripts), must start with a letter or digit, and may not hold '..', spaces, ':' or '/'.",
            code="invalid_email",
            field=field,
        )
    try:
        domain = normalize_domain(domain_part, field=field)
    except InvalidInput as exc:
        raise InvalidInput(
            f"The address's domain is invalid: {exc.message}", code="invalid_email", field=field
        ) from exc
    return local, domain


def validate_password(value: object, *, field: str = "password") -> str:
    """8 to 72 UTF-8 bytes, no NUL. The value itself never appears in an error."""
    if not isinstance(value, str):
        raise InvalidInput("The password must be a string.", code="invalid_password", field=field)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\\udc80", or undecodable bytes on a command line): not text.
        # The codec's own message would name the character and its position: never echo it.
        raise InvalidInput(
            "The password must be valid Unicode text; it holds an unpaired surrogate (\\ud800-\\udfff).",
            code="invalid_password",
            field=field,
        ) from None
    if size < MIN_PASSWORD_BYTES:
        raise InvalidInput(
            f"The password must be at least {MIN_PASSWORD_BYTES} bytes long.", code="invalid_password", field=field
        )
    if size > MAX_PASSWORD_BYTES:
        raise InvalidInput(
            f"The password must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8; bcrypt would silently cut it.",
            code="invalid_password",
            field=field,
        )
    if "\x00" in value:
        raise InvalidInput("The password may not contain a NUL character.", code="invalid_password", field=field)
    return value


def validate_quota(value: object, *, field: str = "quota_mb") -> int:
    """A positive whole number of megabytes, at most MAX_QUOTA_MB."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUOTA_MB:
        raise InvalidInput(
            f"quota_mb must be a whole number from 1 to {MAX_QUOTA_MB}.", code="invalid_quota", field=field
        )
    return value


def validate_node_name(value: object, *, field: str = "name") -> str:
    """Lowercase letters, digits and hyphens, 1-59 characters."""
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise InvalidInput(
            f"A node name is {NODE_NAME_RULE}.",
            code="invalid_node_name",
            field=field,
        )
    return value


def normalize_ip(value: object, *, field: str = "ip_address") -> str:
    """An IPv4 or IPv6 address in its canonical text form."""
    if not isinstance(value, str) or not _ASCII_SAFE.fullmatch(value):
        raise InvalidInput("ip_address must be an IPv4 or IPv6 address.", code="invalid_ip_address", field=field)
    try:
        ip = ipaddress.ip_address(value)
    except ValueError as exc:
        raise InvalidInput(
            "ip_address must be an IPv4 or IPv6 address.", code="invalid_ip_address", field=field
        ) from exc
    if getattr(ip, "scope_id", None) is not None:
        # `fe80::1%eth0`: a zone only means something on this host, and after the `%`
        # ipaddress accepts any text at all (`::1%$(reboot)`, `::1%..`).
        raise InvalidInput("ip_address may not carry a %zone suffix.", code="invalid_ip_address", field=field)
    return str(ip)


def normalize_node_address(value: object, *, field: str = "address") -> str:
    """Where other nodes and mail clients reach a node: a host name (as a domain name, lowercase
    ASCII) or an IPv4/IPv6 address (canonical text). It lands in Dovecot passdb fields
    (`host=`), Postfix transport and TLS policy keys (`[address]:port`) and Dovecot settings,
    so nothing but these two forms gets through."""
    if isinstance(value, str) and (":" in value or value.replace(".", "").isdigit()):
        try:
            return normalize_ip(value, field=field)
        except InvalidInput as exc:
            raise InvalidInput(
                "address must be a host name (like mx1.example.net) or an IPv4 or IPv6 address.",
                code="invalid_address",
                field=field,
            ) from exc
    try:
        return normalize_domain(value, field=field)
    except InvalidInput as exc:
        raise InvalidInput(
            f"address must be a host name (like mx1.example.net) or an IPv4 or IPv6 address. {exc.message}",
            code="invalid_address",
            field=field,
        ) from exc


def validate_project_id(value: object, *, field: str = "project_id") -> int:
    """A positive integer project id."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 2**63 - 1:
        raise InvalidInput("project_id must be a positive whole number.", code="invalid_project_id", field=field)
    return value


# A node's TLS certificate as nodes.yaml holds it (reported by the node, docs/fleet.md): one
# PEM block of an X.509 certificate, the leaf the node's Postfix and Dovecot present.
MAX_CERTIFICATE_CHARS = 8192
_PEM = re.compile(r"^-----BEGIN CERTIFICATE-----\n(?:[A-Za-z0-9+/=]{1,76}\n){1,120}-----END CERTIFICATE-----\n$")


def normalize_certificate(value: object, *, field: str = "tls_certificate") -> str:
    """One PEM certificate in canonical form (64-column base64 lines, a final newline), checked
    to parse as X.509: peers put it into their Dovecot trust (`ssl_ca`) and pin its SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    bad = InvalidInput(
        "tls_certificate must be one PEM X.509 certificate (-----BEGIN CERTIFICATE----- ...).",
        code="invalid_certificate",
        field=field,
    )
    if not isinstance(value, str) or len(value) > MAX_CERTIFICATE_CHARS:
        raise bad
    text = value.replace("\r\n", "\n").strip() + "\n"
    if not _PEM.fullmatch(text):
        raise bad
    try:
        cert = x509.load_pem_x509_certificate(text.encode("ascii"))
        canonical = cert.public_bytes(Encoding.PEM).decode("ascii")
    except ValueError as exc:
        raise bad from exc
    return canonical


def certificate_fingerprint(pem: str) -> str:
    """SHA-256 of the certificate's DER, lowercase hex: what Postfix's `fingerprint` TLS level
    matches (smtp_tls_fingerprint_digest = sha256) and list-nodes shows."""
    import base64
    import hashlib

    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()
