"""Every operation's success path and every documented error code, through a real store.

The assertions look at what a user sees: the result body, the error's code, and the files
in the state repo (read back with the git CLI).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from mailstate.state import errors as errors_module
from mailstate.state import validate as v
from mailstate.state.datadir import DataDir
from mailstate.state.errors import Conflict, Forbidden, InvalidInput, NotFound
from mailstate.state.localdb import LocalDB
from mailstate.state.ops import OPERATIONS, SPEC_OPERATIONS
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B, commit_message, tree_paths
from tests.helpers.store import domain_yaml, err, linked, nodes_yaml, passwd, show

A = PROJECT_A.project_id
B = PROJECT_B.project_id


# --- the registry ----------------------------------------------------------------------------


def test_registry_names_all_operations() -> None:
    assert set(SPEC_OPERATIONS) == {
        "enable-email",
        "disable-email",
        "list-domains",
        "add-user",
        "remove-user",
        "restore-user",
        "list-users",
        "update-password",
        "add-domain",
        "remove-domain",
        "list-nodes",
        "add-node",
    }
    aliases = {
        "add-alias",
        "update-alias",
        "remove-alias",
        "list-aliases",
        "set-forwarding",
        "add-alias-domain",
        "remove-alias-domain",
    }
    sending = {"dns-records"}
    fleet = {"move-domain", "set-node-address", "set-replica", "failover-node"}
    onboarding = {"check-dns", "mobileconfig"}
    owners = {
        "set-vacation",
        "set-filters",
        "list-filters",
        "add-app-password",
        "list-app-passwords",
        "remove-app-password",
    }
    controls = {
        "set-limits",
        "list-limits",
        "set-quota",
        "suspend-sending",
        "resume-sending",
        "add-webhook",
        "list-webhooks",
        "remove-webhook",
        "set-spam-policy",
        "list-spam-policy",
        "add-sender-rule",
        "list-sender-rules",
        "remove-sender-rule",
    }
    assert (
        set(OPERATIONS)
        == set(SPEC_OPERATIONS)
        | {"link-domain", "unlink-domain", "remove-node", "rotate-node-key"}
        | aliases
        | sending
        | fleet
        | onboarding
        | owners
        | controls
    )
    assert len(OPERATIONS) == 49
    assert OPERATIONS["add-user"].tool_name == "email_account_add_user"
    assert OPERATIONS["dns-records"].tool_name == "email_account_dns_records"
    assert {n for n, op in OPERATIONS.items() if op.public} == {"mobileconfig"}
    assert {n for n, op in OPERATIONS.items() if not op.write} == {
        "list-domains",
        "list-users",
        "list-nodes",
        "list-aliases",
        "dns-records",
        "check-dns",
        "mobileconfig",
        "list-filters",
        "list-app-passwords",
        "list-limits",
        "add-webhook",
        "list-webhooks",
        "remove-webhook",
        "list-spam-policy",
        "list-sender-rules",
    }
    assert {n for n, op in OPERATIONS.items() if op.local} == {"add-webhook", "remove-webhook"}
    assert {n for n, op in OPERATIONS.items() if op.method == "GET"} == {
        "list-domains",
        "list-users",
        "list-nodes",
        "list-aliases",
        "dns-records",
        "check-dns",
        "mobileconfig",
        "list-filters",
        "list-app-passwords",
        "list-limits",
        "list-webhooks",
        "list-spam-policy",
        "list-sender-rules",
    }
    assert {n for n, op in OPERATIONS.items() if op.admin} == {
        "add-domain",
        "remove-domain",
        "list-nodes",
        "add-node",
        "link-domain",
        "unlink-domain",
        "remove-node",
        "rotate-node-key",
        "set-limits",
        "move-domain",
        "set-node-address",
        "set-replica",
        "failover-node",
    }


# --- success paths ---------------------------------------------------------------------------


def test_link_domain(store: Store) -> None:
    out = store.execute("link-domain", ADMIN, {"domain": "Example.COM", "project_id": A})
    assert out.created is True
    assert out.result["domain"] == "example.com"
    assert out.result["project_id"] == A
    assert out.result["email_enabled"] is False
    assert len(out.result["commit"]) == 40
    assert domain_yaml(store, "example.com") == {
        "domain": "example.com",
        "project_id": A,
        "email_enabled": False,
        "mailboxes": {},
    }
    # a linked but not enabled domain renders nothing
    assert passwd(store, "example.com") is None


def test_link_unlinked_admin_domain_to_project(store: Store) -> None:
    store.execute("add-domain", ADMIN, {"domain": "example.com"})
    out = store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": B})
    assert out.result["commit"] is not None
    assert out.created is False
    assert domain_yaml(store, "example.com")["project_id"] == B


def test_unlink_domain(store: Store) -> None:
    linked(store, enable=False)
    out = store.execute("unlink-domain", ADMIN, {"domain": "example.com"})
    assert out.result == {"domain": "example.com", "project_id": None, "commit": out.result["commit"]}
    assert out.result["commit"] is not None
    # the project no longer sees it
    assert err(store, "enable-email", PROJECT_A, {"domain": "example.com"}).code == "domain_not_found"


def test_enable_email(store: Store) -> None:
    linked(store, enable=False)
    out = store.execute("enable-email", PROJECT_A, {"domain": "EXAMPLE.com"})
    assert out.result["email_enabled"] is True
    assert out.result["commit"] is not None
    assert domain_yaml(store, "example.com")["email_enabled"] is True
    assert show(store, "rendered/domains/ex/example.com/virtual_mailbox_domains") == "example.com OK\n"
    assert passwd(store, "example.com") == ""


def test_disable_email(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    out = mail_store.execute("disable-email", PROJECT_A, {"domain": "example.com"})
    assert out.result["email_enabled"] is False
    assert out.result["commit"] is not None
    assert domain_yaml(mail_store, "example.com") == {
        "domain": "example.com",
        "project_id": A,
        "email_enabled": False,
        "mailboxes": {},
    }
    assert show(mail_store, "rendered/domains/ex/example.com/virtual_mailbox_domains") is None
    assert "example.com" not in "\n".join(tree_paths(mail_store.git.path, "main", "rendered"))


def test_list_domains(store: Store) -> None:
    linked(store, "example.com", A)
    linked(store, "other.org", A, enable=False)
    linked(store, "b-project.net", B)
    store.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
    store.execute("add-user", PROJECT_A, {"email": "two@example.com", "password": PASSWORD})
    store.execute("remove-user", PROJECT_A, {"email": "two@example.com"})
    out = store.execute("list-domains", PROJECT_A, {})
    assert out.result == {
        "domains": [
            {
                "domain": "example.com",
                "project_id": A,
                "mailboxes": 2,
                "active_mailboxes": 1,
                "inactive_mailboxes": 1,
                "aliases": 0,
                "alias_of": None,
                "used_mb": None,
                "messages": None,
                "usage_reported_at": None,
                "home": None,
                "moving_to": None,
                "replica": None,
                "dns_ok": None,
                "dns_checked_at": None,
            }
        ],
        "linked_not_enabled": [{"domain": "other.org", "project_id": A}],
    }
    names = [d["domain"] for d in store.execute("list-domains", ADMIN, None).result["domains"]]
    assert names == ["b-project.net", "example.com"]
    assert store.execute("list-domains", Actor.project(999), {}).result == {"domains": [], "linked_not_enabled": []}


def test_add_user(mail_store: Store) -> None:
    out = mail_store.execute(
        "add-user", PROJECT_A, {"email": "Sales@Example.COM", "password": "another secret", "quota_mb": 50}
    )
    assert out.created is True
    assert out.result["email"] == "sales@example.com"
    assert out.result["quota_mb"] == 50
    assert out.result["active"] is True
    assert "password" not in out.result
    box = domain_yaml(mail_store, "example.com")["mailboxes"]["sales"]
    assert box["quota_mb"] == 50 and box["active"] is True
    assert box["password"].startswith("{BLF-CRYPT}$2b$04$")
    assert bcrypt.checkpw(b"another secret", box["password"].removeprefix("{BLF-CRYPT}").encode())
    assert not bcrypt.checkpw(b"wrong password", box["password"].removeprefix("{BLF-CRYPT}").encode())
    assert out.result["id"] == box["id"] and box["id"].startswith("20260201-")  # the store's clock
    line = next(ln for ln in passwd(mail_store, "example.com").splitlines() if ln.startswith("sales@"))
    assert (
        line
        == f"sales@example.com:{box['password']}:5000:5000::/var/vmail/example.com/sales~{box['id']}::userdb_quota_rule=*:storage=50M"
    )
    maps = show(mail_store, "rendered/domains/ex/example.com/virtual_mailbox_maps")
    assert f"sales@example.com example.com/sales~{box['id']}/\n" in maps


def test_add_user_default_and_max_quota(mail_store: Store) -> None:
    out = mail_store.execute("add-user", PROJECT_A, {"email": "default@example.com", "password": PASSWORD})
    assert out.result["quota_mb"] == 1024
    out = mail_store.execute(
        "add-user", PROJECT_A, {"email": "big@example.com", "password": PASSWORD, "quota_mb": v.MAX_QUOTA_MB}
    )
    assert out.result["quota_mb"] == v.MAX_QUOTA_MB
    boxes = domain_yaml(mail_store, "example.com")["mailboxes"]
    assert boxes["default"]["quota_mb"] == 1024
    assert boxes["big"]["quota_mb"] == v.MAX_QUOTA_MB
    assert (
        err(
            mail_store,
            "add-user",
            PROJECT_A,
            {"email": "x@example.com", "password": PASSWORD, "quota_mb": v.MAX_QUOTA_MB + 1},
        ).code
        == "invalid_quota"
    )
    assert (
        err(mail_store, "add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD, "quota_mb": 0}).code
        == "invalid_quota"
    )


def test_admin_may_add_users_on_any_domain(mail_store: Store) -> None:
    out = mail_store.execute("add-user", ADMIN, {"email": "admin-made@example.com", "password": PASSWORD})
    assert out.result["commit"] is not None
    assert "admin-made" in domain_yaml(mail_store, "example.com")["mailboxes"]


def test_add_user_on_idn_domain(store: Store) -> None:
    linked(store, "bücher.de", A)
    out = store.execute("add-user", PROJECT_A, {"email": "Info@BÜCHER.de", "password": PASSWORD})
    assert out.result["email"] == "info@xn--bcher-kva.de"
    assert domain_yaml(store, "xn--bcher-kva.de")["mailboxes"]["info"]["active"] is True
    assert passwd(store, "xn--bcher-kva.de").startswith("info@xn--bcher-kva.de:")


def test_remove_user_soft(mail_store: Store) -> None:
    out = mail_store.execute("remove-user", PROJECT_A, {"email": "INFO@example.com"})
    assert out.result["active"] is False
    assert out.result["hard_delete"] is False
    assert out.result["commit"] is not None
    box = domain_yaml(mail_store, "example.com")["mailboxes"]["info"]
    assert box["active"] is False
    # the hash is kept, but the mailbox is gone from every compiled file
    assert box["password"].startswith("{BLF-CRYPT}")
    assert passwd(mail_store, "example.com") == ""
    assert show(mail_store, "rendered/domains/ex/example.com/virtual_mailbox_maps") == ""
    users = mail_store.execute("list-users", PROJECT_A, {}).result["users"]
    assert users == [
        {
            "email": "info@example.com",
            "domain": "example.com",
            "quota_mb": 1024,
            "active": False,
            "id": box["id"],
            "forward_to": [],
            "keep_copy": True,
            "used_mb": None,
            "messages": None,
            "usage_reported_at": None,
            "vacation": None,
            "sending": "ok",
            "sending_reason": None,
            "sent": None,
        }
    ]


def test_remove_user_hard(mail_store: Store) -> None:
    out = mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com", "hard_delete": True})
    assert out.result["hard_delete"] is True
    assert domain_yaml(mail_store, "example.com")["mailboxes"] == {}
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"] == []
    # the address may be reused once hard-deleted
    assert mail_store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD}).created


def test_hard_delete_of_soft_deleted_mailbox(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    out = mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com", "hard_delete": True})
    assert out.result["commit"] is not None
    assert domain_yaml(mail_store, "example.com")["mailboxes"] == {}


def test_list_users(store: Store) -> None:
    linked(store, "example.com", A)
    linked(store, "second.org", A)
    linked(store, "bee.net", B)
    for email in ["zed@example.com", "amy@example.com", "bob@second.org"]:
        store.execute("add-user", PROJECT_A, {"email": email, "password": PASSWORD})
    store.execute("add-user", PROJECT_B, {"email": "b@bee.net", "password": PASSWORD, "quota_mb": 7})
    users = store.execute("list-users", PROJECT_A, {}).result["users"]
    assert [u["email"] for u in users] == ["amy@example.com", "zed@example.com", "bob@second.org"]
    for u in users:
        assert set(u) == {
            "email",
            "domain",
            "quota_mb",
            "active",
            "id",
            "forward_to",
            "keep_copy",
            "used_mb",
            "messages",
            "usage_reported_at",
            "vacation",
            "sending",
            "sending_reason",
            "sent",
        }
    only = store.execute("list-users", PROJECT_A, {"domain": "Second.ORG"}).result["users"]
    assert [u["email"] for u in only] == ["bob@second.org"]
    b_users = store.execute("list-users", PROJECT_B, {}).result["users"]
    assert b_users == [
        {"email": "b@bee.net", "domain": "bee.net", "quota_mb": 7, "active": True, "id": b_users[0]["id"]}
        | {"forward_to": [], "keep_copy": True, "used_mb": None, "messages": None, "usage_reported_at": None}
        | {"vacation": None}
        | {"sending": "ok", "sending_reason": None, "sent": None}
    ]
    assert len(store.execute("list-users", ADMIN, {}).result["users"]) == 4
    # hashes are never returned
    assert "BLF-CRYPT" not in repr(store.execute("list-users", ADMIN, {}).result)


def test_update_password(mail_store: Store) -> None:
    old = domain_yaml(mail_store, "example.com")["mailboxes"]["info"]["password"]
    out = mail_store.execute(
        "update-password", PROJECT_A, {"email": "info@example.com", "password": "brand new password"}
    )
    assert out.result == {"email": "info@example.com", "updated": True, "commit": out.result["commit"]}
    new = domain_yaml(mail_store, "example.com")["mailboxes"]["info"]["password"]
    assert new != old
    assert bcrypt.checkpw(b"brand new password", new.removeprefix("{BLF-CRYPT}").encode())
    assert not bcrypt.checkpw(PASSWORD.encode(), new.removeprefix("{BLF-CRYPT}").encode())
    assert f"info@example.com:{new}:" in passwd(mail_store, "example.com")


def test_add_domain(store: Store) -> None:
    out = store.execute("add-domain", ADMIN, {"domain": "New.Example.ORG"})
    assert out.created is True
    assert out.result["domain"] == "new.example.org"
    assert out.result["project_id"] is None
    assert out.result["email_enabled"] is True
    assert domain_yaml(store, "new.example.org") == {
        "domain": "new.example.org",
        "project_id": None,
        "email_enabled": True,
        "mailboxes": {},
    }
    out = store.execute("add-domain", ADMIN, {"domain": "owned.example", "project_id": B})
    assert out.result["project_id"] == B
    # the project sees (and can use) a domain an admin registered for it
    store.execute("add-user", PROJECT_B, {"email": "x@owned.example", "password": PASSWORD})
    assert [d["domain"] for d in store.execute("list-domains", PROJECT_B, {}).result["domains"]] == ["owned.example"]


def test_add_idn_domain_is_stored_as_punycode(store: Store) -> None:
    out = store.execute("add-domain", ADMIN, {"domain": "Bücher.DE"})
    assert out.result["domain"] == "xn--bcher-kva.de"
    assert domain_yaml(store, "xn--bcher-kva.de")["domain"] == "xn--bcher-kva.de"
    assert err(store, "add-domain", ADMIN, {"domain": "xn--bcher-kva.de"}).code == "domain_exists"


def test_remove_domain_takes_soft_deleted_mailboxes_with_it(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    out = mail_store.execute("remove-domain", ADMIN, {"domain": "example.com"})
    assert out.result["removed"] is True
    assert out.result["commit"] is not None
    assert domain_yaml(mail_store, "example.com") is None
    files = "\n".join(tree_paths(mail_store.git.path))
    assert "example.com" not in files
    # re-adding the domain starts from nothing: the soft-deleted mailbox does not come back
    linked(mail_store)
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"] == []
    assert mail_store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD}).created


def test_disable_email_takes_soft_deleted_mailboxes_with_it(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    mail_store.execute("disable-email", PROJECT_A, {"domain": "example.com"})
    mail_store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"] == []
    assert domain_yaml(mail_store, "example.com")["mailboxes"] == {}


def test_list_nodes(data_dir: DataDir, store: Store) -> None:
    assert store.execute("list-nodes", ADMIN, {}).result == {"nodes": []}
    store.execute("add-node", ADMIN, {"name": "mpi02", "ip_address": "192.0.2.7"})
    first = store.head
    store.execute("add-node", ADMIN, {"name": "alpha"})
    nodes = store.execute("list-nodes", ADMIN, {}).result["nodes"]
    assert [n["name"] for n in nodes] == ["alpha", "mpi02"]
    assert nodes[1]["ip_address"] == "192.0.2.7"
    assert nodes[1]["last_sync_at"] is None
    assert nodes[1]["status"] == "never_synced"
    assert "sync_key" not in nodes[1] and "sync_key_sha256" not in nodes[1]
    # a node's report (kept in the local db, not in git) shows up, with how far behind it is
    db = LocalDB(data_dir.db)
    try:
        at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        db.record_node_status("mpi02", applied_commit=first, status="ok", error=None, remote_addr="192.0.2.7", at=at)
    finally:
        db.close()
    mpi = next(n for n in store.execute("list-nodes", ADMIN, {}).result["nodes"] if n["name"] == "mpi02")
    assert mpi["status"] == "ok"
    assert mpi["applied_commit"] == first
    assert mpi["last_sync_at"].startswith("2026-03-01T12:00:00")
    assert mpi["commits_behind"] == 1


def test_add_node(store: Store) -> None:
    out = store.execute("add-node", ADMIN, {"name": "mpi02", "ip_address": "2001:DB8::1"})
    key = out.result["sync_key"]
    assert out.created is True
    assert out.result["name"] == "mpi02"
    assert out.result["ip_address"] == "2001:db8::1"
    raw = base64.urlsafe_b64decode(key.removeprefix("mss_") + "=" * (-len(key.removeprefix("mss_")) % 4))
    assert len(raw) * 8 >= 256
    entry = nodes_yaml(store)["nodes"]["mpi02"]
    assert entry["sync_key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["ip_address"] == "2001:db8::1"
    assert "created_at" in entry
    assert key not in (show(store, "nodes.yaml") or "")
    other = store.execute("add-node", ADMIN, {"name": "mpi03"}).result["sync_key"]
    assert other != key
    assert nodes_yaml(store)["nodes"]["mpi03"]["ip_address"] is None


def test_remove_node(store: Store) -> None:
    store.execute("add-node", ADMIN, {"name": "mpi02"})
    store.execute("add-node", ADMIN, {"name": "mpi03"})
    out = store.execute("remove-node", ADMIN, {"name": "mpi02"})
    assert out.result["removed"] is True
    assert out.result["commit"] is not None
    assert list(nodes_yaml(store)["nodes"]) == ["mpi03"]


def test_rotate_node_key(store: Store) -> None:
    old = store.execute("add-node", ADMIN, {"name": "mpi02"}).result["sync_key"]
    old_hash = nodes_yaml(store)["nodes"]["mpi02"]["sync_key_sha256"]
    out = store.execute("rotate-node-key", ADMIN, {"name": "mpi02"})
    new = out.result["sync_key"]
    assert new != old
    assert out.result["commit"] is not None
    new_hash = nodes_yaml(store)["nodes"]["mpi02"]["sync_key_sha256"]
    assert new_hash != old_hash
    assert new_hash == hashlib.sha256(new.encode()).hexdigest()


def test_request_id_lands_in_the_commit(mail_store: Store) -> None:
    mail_store.execute(
        "add-user", PROJECT_A, {"email": "r@example.com", "password": PASSWORD}, request_id="req-123.abc"
    )
    assert "Request-Id: req-123.abc" in commit_message(mail_store.git.path)
    # an unsafe request id is replaced, never copied into the message
    mail_store.execute("remove-user", PROJECT_A, {"email": "r@example.com"}, request_id="x\nAction: forged")
    body = commit_message(mail_store.git.path)
    assert "forged" not in body
    assert body.count("Action:") == 1


# --- error codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "data", "code"),
    [
        ("add-domain", {"domain": "bad domain.com"}, "invalid_domain"),
        ("add-domain", {"domain": "nodot"}, "invalid_domain"),
        ("add-user", {"email": "no-at.example.com", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "a@example.com", "password": "short"}, "invalid_password"),
        ("add-user", {"email": "a@example.com", "password": "x" * 73}, "invalid_password"),
        ("add-user", {"email": "a@example.com", "password": PASSWORD, "quota_mb": -5}, "invalid_quota"),
        ("add-node", {"name": "Node_1"}, "invalid_node_name"),
        ("add-node", {"name": "n1", "ip_address": "300.1.1.1"}, "invalid_ip_address"),
        ("link-domain", {"domain": "example.com", "project_id": 0}, "invalid_project_id"),
        ("link-domain", {"domain": "example.com"}, "missing_field"),
        ("add-user", {"password": PASSWORD}, "missing_field"),
        ("add-node", {"name": "n1", "role": "primary"}, "unknown_field"),
        ("list-users", {"domain": "example.com", "page": 2}, "unknown_field"),
        ("remove-user", {"email": "a@example.com", "hard_delete": "yes"}, "invalid_request"),
        ("add-domain", ["example.com"], "invalid_request"),
    ],
)
def test_invalid_input_codes(store: Store, op: str, data: Any, code: str) -> None:
    e = err(store, op, ADMIN, data)
    assert isinstance(e, InvalidInput)
    assert e.code == code
    assert e.message


def test_unknown_operation(store: Store) -> None:
    e = err(store, "drop-everything", ADMIN, {})
    assert isinstance(e, InvalidInput)
    assert e.code == "unknown_operation"


@pytest.mark.parametrize(
    ("op", "data"),
    [
        ("add-domain", {"domain": "example.com"}),
        ("remove-domain", {"domain": "example.com"}),
        ("link-domain", {"domain": "example.com", "project_id": 101}),
        ("unlink-domain", {"domain": "example.com"}),
        ("list-nodes", {}),
        ("add-node", {"name": "n1"}),
        ("remove-node", {"name": "n1"}),
        ("rotate-node-key", {"name": "n1"}),
    ],
)
def test_admin_required(mail_store: Store, op: str, data: dict[str, Any]) -> None:
    e = err(mail_store, op, PROJECT_A, data)
    assert isinstance(e, Forbidden)
    assert e.code == "admin_required"


def test_domain_not_found(store: Store) -> None:
    for op, data in [
        ("enable-email", {"domain": "nowhere.example"}),
        ("disable-email", {"domain": "nowhere.example"}),
        ("add-user", {"email": "a@nowhere.example", "password": PASSWORD}),
        ("list-users", {"domain": "nowhere.example"}),
    ]:
        e = err(store, op, PROJECT_A, data)
        assert isinstance(e, NotFound) and e.code == "domain_not_found", op
    for op, data in [
        ("remove-domain", {"domain": "nowhere.example"}),
        ("unlink-domain", {"domain": "nowhere.example"}),
        ("enable-email", {"domain": "nowhere.example"}),
    ]:
        assert err(store, op, ADMIN, data).code == "domain_not_found", op


def test_enable_email_needs_a_link(store: Store) -> None:
    # not linked at all
    assert err(store, "enable-email", PROJECT_A, {"domain": "example.com"}).code == "domain_not_found"
    # linked to someone else
    linked(store, "example.com", B, enable=False)
    assert err(store, "enable-email", PROJECT_A, {"domain": "example.com"}).code == "domain_not_found"
    # registered by an admin without a project: no project may enable it
    store.execute("add-domain", ADMIN, {"domain": "admin-only.example"})
    assert err(store, "enable-email", PROJECT_A, {"domain": "admin-only.example"}).code == "domain_not_found"


def test_another_projects_domain_reads_as_not_found(mail_store: Store) -> None:
    """Project B may not see, touch or probe project A's domain and mailboxes."""
    b = PROJECT_B
    for op, data, code in [
        ("enable-email", {"domain": "example.com"}, "domain_not_found"),
        ("disable-email", {"domain": "example.com"}, "domain_not_found"),
        ("list-users", {"domain": "example.com"}, "domain_not_found"),
        ("add-user", {"email": "new@example.com", "password": PASSWORD}, "domain_not_found"),
        ("remove-user", {"email": "info@example.com"}, "mailbox_not_found"),
        ("remove-user", {"email": "info@example.com", "hard_delete": True}, "mailbox_not_found"),
        ("update-password", {"email": "info@example.com", "password": PASSWORD}, "mailbox_not_found"),
        ("restore-user", {"email": "info@example.com"}, "mailbox_not_found"),
    ]:
        e = err(mail_store, op, b, data)
        assert isinstance(e, NotFound), op
        assert e.code == code, op
    # an existing and a missing mailbox of someone else look exactly the same
    a = err(mail_store, "remove-user", b, {"email": "info@example.com"})
    m = err(mail_store, "remove-user", b, {"email": "nobody@example.com"})
    assert (a.code, type(a)) == (m.code, type(m))
    assert mail_store.execute("list-domains", b, {}).result == {"domains": [], "linked_not_enabled": []}
    assert mail_store.execute("list-users", b, {}).result == {"users": []}
    # and A's state is untouched
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"][0]["active"] is True


def test_mailbox_not_found(mail_store: Store) -> None:
    for op, data in [
        ("remove-user", {"email": "ghost@example.com"}),
        ("update-password", {"email": "ghost@example.com", "password": PASSWORD}),
        ("remove-user", {"email": "ghost@unknown-domain.example"}),
    ]:
        e = err(mail_store, op, PROJECT_A, data)
        assert isinstance(e, NotFound) and e.code == "mailbox_not_found", op


def test_node_not_found(store: Store) -> None:
    for op in ["remove-node", "rotate-node-key"]:
        e = err(store, op, ADMIN, {"name": "ghost"})
        assert isinstance(e, NotFound) and e.code == "node_not_found"


def test_domain_exists(store: Store) -> None:
    store.execute("add-domain", ADMIN, {"domain": "example.com"})
    e = err(store, "add-domain", ADMIN, {"domain": "EXAMPLE.com"})
    assert isinstance(e, Conflict) and e.code == "domain_exists"
    linked(store, "linked.example", A, enable=False)
    assert err(store, "add-domain", ADMIN, {"domain": "linked.example"}).code == "domain_exists"


def test_domain_linked_elsewhere(store: Store) -> None:
    linked(store, "example.com", A, enable=False)
    e = err(store, "link-domain", ADMIN, {"domain": "example.com", "project_id": B})
    assert isinstance(e, Conflict) and e.code == "domain_linked_elsewhere"
    # after unlinking, the other project may take it
    store.execute("unlink-domain", ADMIN, {"domain": "example.com"})
    assert store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": B}).result["project_id"] == B


def test_email_enabled_blocks_unlink(mail_store: Store) -> None:
    e = err(mail_store, "unlink-domain", ADMIN, {"domain": "example.com"})
    assert isinstance(e, Conflict) and e.code == "email_enabled"


def test_email_not_enabled(store: Store) -> None:
    linked(store, enable=False)
    e = err(store, "add-user", PROJECT_A, {"email": "a@example.com", "password": PASSWORD})
    assert isinstance(e, Conflict) and e.code == "email_not_enabled"


def test_mailbox_exists_active(mail_store: Store) -> None:
    e = err(mail_store, "add-user", PROJECT_A, {"email": "INFO@example.com", "password": "other password"})
    assert isinstance(e, Conflict) and e.code == "mailbox_exists"


def test_mailbox_exists_soft_deleted(mail_store: Store) -> None:
    """A soft-deleted address is never handed out again by accident."""
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    before = domain_yaml(mail_store, "example.com")["mailboxes"]["info"]
    e = err(mail_store, "add-user", PROJECT_A, {"email": "info@example.com", "password": "hijacker password"})
    assert isinstance(e, Conflict) and e.code == "mailbox_exists"
    assert "soft-deleted" in e.message
    assert domain_yaml(mail_store, "example.com")["mailboxes"]["info"] == before


def test_mailbox_inactive(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    e = err(mail_store, "update-password", PROJECT_A, {"email": "info@example.com", "password": "new password!"})
    assert isinstance(e, Conflict) and e.code == "mailbox_inactive"


def test_active_mailboxes_remain(mail_store: Store) -> None:
    e = err(mail_store, "disable-email", PROJECT_A, {"domain": "example.com"})
    assert isinstance(e, Conflict) and e.code == "active_mailboxes_remain"
    e = err(mail_store, "remove-domain", ADMIN, {"domain": "example.com"})
    assert isinstance(e, Conflict) and e.code == "active_mailboxes_remain"
    assert "1 active" in e.message
    assert domain_yaml(mail_store, "example.com")["email_enabled"] is True


def test_node_exists(store: Store) -> None:
    store.execute("add-node", ADMIN, {"name": "mpi02"})
    e = err(store, "add-node", ADMIN, {"name": "mpi02", "ip_address": "192.0.2.1"})
    assert isinstance(e, Conflict) and e.code == "node_exists"


def test_every_documented_operation_code_is_exercised() -> None:
    """The codes this file checks are the ones errors.py documents for operations and parse."""

    doc = errors_module.__doc__ or ""
    for code in [
        "invalid_domain",
        "invalid_email",
        "invalid_password",
        "invalid_quota",
        "invalid_node_name",
        "invalid_ip_address",
        "invalid_project_id",
        "missing_field",
        "unknown_field",
        "invalid_request",
        "admin_required",
        "domain_not_found",
        "mailbox_not_found",
        "node_not_found",
        "domain_exists",
        "domain_linked_elsewhere",
        "email_enabled",
        "email_not_enabled",
        "mailbox_exists",
        "mailbox_inactive",
        "active_mailboxes_remain",
        "node_exists",
        "unknown_operation",
    ]:
        assert code in doc, code
        assert f'"{code}"' in Path(__file__).read_text(), code
