"""The schema: request parsing (`parse`), the validators, and the state-file models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from mailstate.state import validate as v
from mailstate.state.errors import InvalidInput
from mailstate.state.models import (
    AddDomainRequest,
    AddNodeRequest,
    AddUserRequest,
    DomainFile,
    LinkDomainRequest,
    ListUsersRequest,
    Mailbox,
    Node,
    NodesFile,
    RemoveUserRequest,
    Settings,
    parse,
)

HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def code_of(model, data) -> str:
    with pytest.raises(InvalidInput) as info:
        parse(model, data)
    return info.value.code


# --- parse(): the request layer -----------------------------------------------------------


def test_parse_returns_normalised_request() -> None:
    req = parse(AddUserRequest, {"email": "Info@Example.COM", "password": "12345678", "quota_mb": 50})
    assert req.email == "info@example.com"
    assert req.quota_mb == 50


def test_parse_missing_field() -> None:
    with pytest.raises(InvalidInput) as info:
        parse(AddUserRequest, {"email": "info@example.com"})
    assert info.value.code == "missing_field"
    assert info.value.field == "password"
    assert "password" in info.value.message


def test_parse_unknown_field() -> None:
    with pytest.raises(InvalidInput) as info:
        parse(AddDomainRequest, {"domain": "example.com", "colour": "blue"})
    assert info.value.code == "unknown_field"
    assert info.value.field == "colour"


@pytest.mark.parametrize("body", [[], "domain=example.com", 42, ["example.com"]])
def test_parse_non_object_body_is_invalid_request(body: object) -> None:
    assert code_of(AddDomainRequest, body) == "invalid_request"


def test_parse_none_body_is_empty_object() -> None:
    assert parse(ListUsersRequest, None).domain is None
    assert code_of(AddDomainRequest, None) == "missing_field"


@pytest.mark.parametrize("value", ["yes", 1, 0, "true", None])
def test_hard_delete_must_be_a_real_boolean(value: object) -> None:
    assert code_of(RemoveUserRequest, {"email": "a@example.com", "hard_delete": value}) == "invalid_request"


def test_hard_delete_defaults_to_soft() -> None:
    assert parse(RemoveUserRequest, {"email": "a@example.com"}).hard_delete is False
    assert parse(RemoveUserRequest, {"email": "a@example.com", "hard_delete": True}).hard_delete is True


@pytest.mark.parametrize(
    ("model", "data", "code"),
    [
        (AddDomainRequest, {"domain": 5}, "invalid_domain"),
        (AddDomainRequest, {"domain": "example.com", "project_id": "seven"}, "invalid_project_id"),
        (AddDomainRequest, {"domain": "example.com", "project_id": 0}, "invalid_project_id"),
        (AddDomainRequest, {"domain": "example.com", "project_id": -3}, "invalid_project_id"),
        (AddDomainRequest, {"domain": "example.com", "project_id": True}, "invalid_project_id"),
        (AddDomainRequest, {"domain": "example.com", "project_id": 2**63}, "invalid_project_id"),
        (LinkDomainRequest, {"domain": "example.com", "project_id": 1.5}, "invalid_project_id"),
        (AddUserRequest, {"email": ["x"], "password": "12345678"}, "invalid_email"),
        (AddUserRequest, {"email": "a@example.com", "password": 12345678}, "invalid_password"),
        (AddUserRequest, {"email": "a@example.com", "password": "12345678", "quota_mb": "10"}, "invalid_quota"),
        (AddUserRequest, {"email": "a@example.com", "password": "12345678", "quota_mb": 1.0}, "invalid_quota"),
        (AddUserRequest, {"email": "a@example.com", "password": "12345678", "quota_mb": True}, "invalid_quota"),
        (AddNodeRequest, {"name": 7}, "invalid_node_name"),
        (AddNodeRequest, {"name": "n1", "ip_address": 127}, "invalid_ip_address"),
    ],
)
def test_wrong_json_types_map_to_the_fields_code(model, data, code) -> None:
    assert code_of(model, data) == code


# --- validators ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("MAIL.example.co.uk", "mail.example.co.uk"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("例え.jp", "xn--r8jz45g.jp"),
        ("a-b.example", "a-b.example"),
        ("1.example", "1.example"),
    ],
)
def test_domains_are_normalised(raw: str, canonical: str) -> None:
    assert v.normalize_domain(raw) == canonical
    assert parse(AddDomainRequest, {"domain": raw}).domain == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "localhost",
        "example..com",
        ".example.com",
        "example.com.",
        "-bad.example.com",
        "bad-.example.com",
        "exa_mple.com",
        "exa mple.com",
        "example.com\n",
        "exa/mple.com",
        "exa:mple.com",
        "example.123",
        ("a" * 64) + ".com",
        ".".join(["abcdefghi"] * 26) + ".com",
        "ex\x00ample.com",
        "☃",
    ],
)
def test_bad_domains_are_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v.normalize_domain(raw)
    assert info.value.code == "invalid_domain"


@pytest.mark.parametrize(
    ("raw", "local", "domain"),
    [
        ("Info@Example.com", "info", "example.com"),
        ("first.last+tag@example.com", "first.last+tag", "example.com"),
        ("a_b-c@bücher.de", "a_b-c", "xn--bcher-kva.de"),
        ("on@example.com", "on", "example.com"),
    ],
)
def test_emails_are_normalised(raw: str, local: str, domain: str) -> None:
    assert v.normalize_email(raw) == (local, domain)


@pytest.mark.parametrize(
    "raw",
    [
        "no-at-sign",
        "two@@example.com",
        "a@b@example.com",
        "@example.com",
        ".lead@example.com",
        "trail.@example.com",
        "dou..ble@example.com",
        "sp ace@example.com",
        "co:lon@example.com",
        "sla/sh@example.com",
        "pct%route@example.com",
        "bang!x@example.com",
        '"quoted"@example.com',
        "new\nline@example.com",
        "ünï@example.com",
        ("a" * 65) + "@example.com",
        "info@localhost",
        "info@exa mple.com",
        "info\n@example.com",
        "info@example.com\n",
    ],
)
def test_bad_emails_are_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v.normalize_email(raw)
    assert info.value.code == "invalid_email"


@pytest.mark.parametrize("pw", ["12345678", "x" * 72, "é" * 36, "pass word with spaces", "colon:and\nnewline!"])
def test_good_passwords(pw: str) -> None:
    assert v.validate_password(pw) == pw


@pytest.mark.parametrize("pw", ["", "1234567", "x" * 73, "é" * 37, "1234567\x00", "€" * 25])
def test_bad_passwords_are_refused_without_echo(pw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v.validate_password(pw)
    assert info.value.code == "invalid_password"
    if pw:
        assert pw not in info.value.message
        assert pw not in repr(info.value)


def test_password_over_72_bytes_is_refused_not_truncated() -> None:
    # 71 ASCII + one 2-byte char = 73 bytes, only 72 characters
    with pytest.raises(InvalidInput) as info:
        parse(AddUserRequest, {"email": "a@example.com", "password": "x" * 71 + "é"})
    assert info.value.code == "invalid_password"
    assert "72" in info.value.message


@pytest.mark.parametrize("q", [1, 1024, v.MAX_QUOTA_MB])
def test_good_quotas(q: int) -> None:
    assert v.validate_quota(q) == q


@pytest.mark.parametrize("q", [0, -1, v.MAX_QUOTA_MB + 1, 1.5, "5", None, True])
def test_bad_quotas(q: object) -> None:
    with pytest.raises(InvalidInput) as info:
        v.validate_quota(q)
    assert info.value.code == "invalid_quota"


@pytest.mark.parametrize("name", ["mpi02", "a", "node-1", "0", "a" * 59])
def test_good_node_names(name: str) -> None:
    assert v.validate_node_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "MPI02", "-a", "a-", "a_b", "a.b", "a b", "a/b", "..", "a" * 60, "nöde", "mpi02\n"]
)
def test_bad_node_names(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v.validate_node_name(name)
    assert info.value.code == "invalid_node_name"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::1", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
    ],
)
def test_ip_addresses_are_canonical(raw: str, canonical: str) -> None:
    assert v.normalize_ip(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "999.1.1.1",
        "1.2.3",
        "example.com",
        " 192.0.2.1",
        "192.0.2.1\n",
        "10.0.0.0/8",
        "::1%eth0x y",
        "fe80::1%eth0",
        "::1%..",
    ],
)
def test_bad_ip_addresses(raw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v.normalize_ip(raw)
    assert info.value.code == "invalid_ip_address"


# --- state file models -----------------------------------------------------------------------


def test_mailbox_requires_a_bcrypt_hash() -> None:
    assert Mailbox(password=HASH, quota_mb=1).active is True
    for bad in [
        "plaintext-password",
        "$2b$04$" + "a" * 53,
        "{BLF-CRYPT}$2b$04$" + "a" * 52,
        "{BLF-CRYPT}$2b$03$" + "a" * 53,
        HASH + "\n",
    ]:
        with pytest.raises(ValidationError):
            Mailbox(password=bad, quota_mb=1)


def test_domain_file_refuses_non_canonical_values() -> None:
    DomainFile(domain="example.com", mailboxes={"info": Mailbox(password=HASH, quota_mb=1)})
    with pytest.raises(ValidationError):
        DomainFile(domain="Example.com")
    with pytest.raises(ValidationError):
        DomainFile(domain="bücher.de")
    with pytest.raises(ValidationError):
        DomainFile(domain="example.com", mailboxes={"Info": Mailbox(password=HASH, quota_mb=1)})
    with pytest.raises(ValidationError):
        DomainFile(domain="example.com", mailboxes={"a:b": Mailbox(password=HASH, quota_mb=1)})
    with pytest.raises(ValidationError):
        DomainFile.model_validate({"domain": "example.com", "owner": "me"})


def test_nodes_file_validates_names_and_hashes() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    NodesFile(nodes={"n1": Node(sync_key_sha256="a" * 64, created_at=now)})
    with pytest.raises(ValidationError):
        Node(sync_key_sha256="A" * 64, created_at=now)
    with pytest.raises(ValidationError):
        Node(sync_key_sha256="a" * 64, created_at=now, ip_address="nope")
    with pytest.raises(ValidationError):
        NodesFile(nodes={"Bad Name": Node(sync_key_sha256="a" * 64, created_at=now)})


@pytest.mark.parametrize(
    "root",
    [
        "relative/path",
        "/var/v mail",
        "/var/vmail:x",
        "/var/../etc",
        "/var/vmail/..",
        "/var/v\x0bmail",
        "/var/v\x00mail",
        "/var/vmäil",
    ],
)
def test_settings_mail_root_must_be_safe(root: str) -> None:
    with pytest.raises(ValidationError):
        Settings(mail_root=root)


def test_settings_defaults_and_bounds() -> None:
    s = Settings()
    assert (s.format, s.mail_root, s.uid, s.gid, s.default_quota_mb, s.bcrypt_cost, s.purge_after_days) == (
        2,
        "/var/vmail",
        5000,
        5000,
        1024,
        12,
        7,
    )
    assert Settings(mail_root="/srv/mail/").mail_root == "/srv/mail"
    bad_settings: list[dict[str, int]] = [
        {"bcrypt_cost": 3},
        {"bcrypt_cost": 32},
        {"uid": 0},
        {"format": 3},
        {"format": 0},
        {"default_quota_mb": 0},
    ]
    bad_settings += [{"colour": 1}, {"purge_after_days": -1}, {"purge_after_days": 3651}]
    for bad in bad_settings:
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_error_to_dict_shape() -> None:
    with pytest.raises(InvalidInput) as info:
        parse(AddUserRequest, {"email": "nope", "password": "12345678"})
    body = info.value.to_dict()
    assert body["code"] == "invalid_email"
    assert body["field"] == "email"
    assert isinstance(body["message"], str) and body["message"].endswith(".")
