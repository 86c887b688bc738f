"""Mailbox lifecycle, server side: ids, hard and soft delete, restore, usage figures,
and the paths the compiler renders from hostile values. The node side (graveyard, purge, the
Maildir move) is tested with real Postfix/Dovecot in the pi-pull tests."""

from __future__ import annotations

import base64
import posixpath
import re
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstate.compiler.render import mailbox_dir, render_domain
from mailstate.state import validate as v
from mailstate.state.datadir import DataDir
from mailstate.state.errors import CompileError, Conflict, InvalidInput, NotFound
from mailstate.state.localdb import LocalDB
from mailstate.state.models import DomainFile, Mailbox, Settings
from mailstate.state.nodes import record_report
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B, history_text, read_file, tree_paths
from tests.helpers.server import live_server

ID = re.compile(r"^[0-9]{8}-[0-9a-f]{6}$")
API = "/v1/email-account"
HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def show(store: Store, path: str) -> str:
    return read_file(store.git.path, path)


def box_id(store: Store, email: str) -> str | None:
    local, _, domain = email.partition("@")
    box = store.snapshot.domains[domain].mailboxes.get(local)
    return box.id if box is not None else None


# --- identity --------------------------------------------------------------------------------


def test_add_user_gives_an_id_from_the_clock_and_prepare(mail_store: Store) -> None:
    first = box_id(mail_store, "info@example.com")
    assert first is not None and ID.fullmatch(first) and first.startswith("20260201-")  # the store's clock
    out = mail_store.execute("add-user", PROJECT_A, {"email": "sales@example.com", "password": PASSWORD}).result
    assert out["id"] == box_id(mail_store, "sales@example.com") and out["id"] != first
    listing = show(mail_store, "rendered/domains/ex/example.com/mailboxes")
    assert listing == f"info {first} active\nsales {out['id']} active\n"
    # update-password keeps the id (and so the home)
    mail_store.execute("update-password", PROJECT_A, {"email": "sales@example.com", "password": "another password"})
    assert box_id(mail_store, "sales@example.com") == out["id"]


def test_hard_delete_then_re_add_is_a_new_mailbox(mail_store: Store) -> None:
    old = box_id(mail_store, "info@example.com")
    out = mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com", "hard_delete": True}).result
    assert out == {"email": "info@example.com", "hard_delete": True, "active": False, "commit": out["commit"]}
    # gone at once from every compiled file: no login, 550 on delivery, and the node sees no owner
    assert show(mail_store, "rendered/domains/ex/example.com/passwd") == ""
    assert show(mail_store, "rendered/domains/ex/example.com/virtual_mailbox_maps") == ""
    assert show(mail_store, "rendered/domains/ex/example.com/mailboxes") == ""
    with pytest.raises(NotFound):
        mail_store.execute("restore-user", PROJECT_A, {"email": "info@example.com"})
    new = mail_store.execute(
        "add-user", PROJECT_A, {"email": "info@example.com", "password": "a new owner's pw"}
    ).result["id"]
    assert new != old and ID.fullmatch(new)
    passwd = show(mail_store, "rendered/domains/ex/example.com/passwd")
    assert f"/var/vmail/example.com/info~{new}::" in passwd and old not in passwd
    assert show(mail_store, "rendered/domains/ex/example.com/mailboxes") == f"info {new} active\n"


def test_soft_delete_keeps_the_identity_and_restore_brings_it_back(mail_store: Store) -> None:
    the_id = box_id(mail_store, "info@example.com")
    passwd_before = show(mail_store, "rendered/domains/ex/example.com/passwd")
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    assert box_id(mail_store, "info@example.com") == the_id
    assert show(mail_store, "rendered/domains/ex/example.com/passwd") == ""  # no login
    assert show(mail_store, "rendered/domains/ex/example.com/virtual_mailbox_maps") == ""  # 550
    # ... but the node is told the Maildir is still owned
    assert show(mail_store, "rendered/domains/ex/example.com/mailboxes") == f"info {the_id} inactive\n"
    # the address stays taken: add-user says how to get it back
    with pytest.raises(Conflict) as taken:
        mail_store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    assert "restore-user" in taken.value.message
    out = mail_store.execute("restore-user", PROJECT_A, {"email": "INFO@example.com"}).result
    assert out == {"email": "info@example.com", "active": True, "restored": True, "id": the_id, "commit": out["commit"]}
    assert show(mail_store, "rendered/domains/ex/example.com/passwd") == passwd_before  # same password, same home
    assert show(mail_store, "rendered/domains/ex/example.com/mailboxes") == f"info {the_id} active\n"
    with pytest.raises(Conflict) as active:
        mail_store.execute("restore-user", PROJECT_A, {"email": "info@example.com"})
    assert active.value.code == "mailbox_active"
    with pytest.raises(NotFound) as none:
        mail_store.execute("restore-user", PROJECT_A, {"email": "nobody@example.com"})
    assert none.value.code == "mailbox_not_found"
    with pytest.raises(NotFound):  # another project's mailbox reads as absent
        mail_store.execute("restore-user", PROJECT_B, {"email": "info@example.com"})


def test_disable_email_and_remove_domain_drop_soft_deleted_mailboxes(mail_store: Store) -> None:
    mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    mail_store.execute("disable-email", PROJECT_A, {"domain": "example.com"})
    assert mail_store.snapshot.domains["example.com"].mailboxes == {}
    assert "rendered/domains/ex" not in "\n".join(tree_paths(mail_store.git.path))
    mail_store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    with pytest.raises(NotFound):
        mail_store.execute("restore-user", PROJECT_A, {"email": "info@example.com"})
    assert show(mail_store, "rendered/domains/ex/example.com/mailboxes") == ""


def test_the_tool_descriptions_say_what_happens_to_the_data() -> None:
    from mailstate.state.ops import OPERATIONS

    remove, restore = OPERATIONS["remove-user"].summary, OPERATIONS["restore-user"].summary
    for words in ("graveyard", "purge_after_days", "new, empty mailbox", "mail is kept", "restore-user"):
        assert words in remove, words
    for words in ("soft-deleted", "with all its mail", "409", "404"):
        assert words in restore, words
    assert OPERATIONS["restore-user"].tool_name == "email_account_restore_user"


# --- usage ---------------------------------------------------------------------------------------


def _usage(email: str, the_id: str | None, used: int, messages: int) -> dict[str, Any]:
    return {"email": email, "id": the_id, "used_bytes": used, "messages": messages}


def test_usage_reports_reach_list_users_and_list_domains(mail_store: Store, data_dir: DataDir) -> None:
    mail_store.execute("add-user", PROJECT_A, {"email": "sales@example.com", "password": PASSWORD})
    mail_store.execute("add-node", ADMIN, {"name": "mpi01"})
    mail_store.execute("add-node", ADMIN, {"name": "mpi02"})
    db = LocalDB(data_dir.db)
    mail_store.usage_source = db.usage_for
    try:
        info, sales = box_id(mail_store, "info@example.com"), box_id(mail_store, "sales@example.com")
        users = mail_store.execute("list-users", PROJECT_A, {}).result["users"]
        assert [(u["used_mb"], u["messages"], u["usage_reported_at"]) for u in users] == [(None, None, None)] * 2
        t0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
        body = {
            "status": "ok",
            "usage": [_usage("info@example.com", info, 3 * 1048576, 7), _usage("sales@example.com", sales, 0, 0)],
        }
        record_report(db, mail_store.snapshot, "mpi01", body, None, t0)
        by = {u["email"]: u for u in mail_store.execute("list-users", PROJECT_A, {}).result["users"]}
        assert (by["info@example.com"]["used_mb"], by["info@example.com"]["messages"]) == (3.0, 7)
        assert by["info@example.com"]["usage_reported_at"] == t0.isoformat()
        assert (by["sales@example.com"]["used_mb"], by["sales@example.com"]["messages"]) == (0.0, 0)
        # several nodes: the latest report counts, whichever node sent it
        t1 = t0 + timedelta(minutes=15)
        record_report(
            db,
            mail_store.snapshot,
            "mpi02",
            {"status": "ok", "usage": [_usage("info@example.com", info, 1048576 // 2, 8)]},
            None,
            t1,
        )
        record_report(
            db,
            mail_store.snapshot,
            "mpi01",
            {"status": "ok", "usage": [_usage("info@example.com", info, 99, 99)]},
            None,
            t0,
        )  # late, older
        by = {
            u["email"]: u
            for u in mail_store.execute("list-users", PROJECT_A, {"domain": "example.com"}).result["users"]
        }
        assert (by["info@example.com"]["used_mb"], by["info@example.com"]["messages"]) == (0.5, 8)
        domains = mail_store.execute("list-domains", PROJECT_A, {}).result["domains"]
        assert (domains[0]["used_mb"], domains[0]["messages"], domains[0]["usage_reported_at"]) == (
            0.5,
            8,
            t1.isoformat(),
        )
        # a mailbox re-created after a hard delete never inherits the old figures (matched by id)
        mail_store.execute("remove-user", PROJECT_A, {"email": "info@example.com", "hard_delete": True})
        mail_store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
        by = {u["email"]: u for u in mail_store.execute("list-users", PROJECT_A, {}).result["users"]}
        assert (by["info@example.com"]["used_mb"], by["info@example.com"]["usage_reported_at"]) == (None, None)
        # entries naming no current mailbox identity are dropped, not stored
        stray = [_usage("info@example.com", info, 5, 5), _usage("x@nowhere.example", info, 1, 1)]
        record_report(db, mail_store.snapshot, "mpi01", {"status": "ok", "usage": stray}, None, t1)
        assert db.usage_for(["nowhere.example"]) == {}
        # the figures never go into git
        assert "used_bytes" not in history_text(mail_store.git.path)
    finally:
        db.close()


@pytest.mark.parametrize(
    "entry",
    [
        {"email": "info@example.com", "id": "../../etc", "used_bytes": 1, "messages": 1},
        {"email": "info@example.com", "id": "20261201-abcdef", "used_bytes": -1, "messages": 1},
        {"email": "info@example.com", "id": "20261201-abcdef", "used_bytes": 1, "messages": 1, "extra": 1},
        {"email": "not an address", "id": "20261201-abcdef", "used_bytes": 1, "messages": 1},
        {"email": "info@example.com", "id": "20261201-abcdef", "used_bytes": "1", "messages": 1},
    ],
)
def test_a_bad_usage_entry_is_refused_with_a_clear_error(
    mail_store: Store, data_dir: DataDir, entry: dict[str, Any]
) -> None:
    mail_store.execute("add-node", ADMIN, {"name": "mpi01"})
    db = LocalDB(data_dir.db)
    try:
        with pytest.raises(InvalidInput):
            record_report(db, mail_store.snapshot, "mpi01", {"status": "ok", "usage": [entry]}, None, datetime.now(UTC))
        assert db.node_status("mpi01") is None  # nothing recorded
    finally:
        db.close()


@pytest.mark.e2e
def test_usage_over_the_node_endpoint_of_a_real_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    with live_server(tmp_path_factory.mktemp("usage")) as srv, srv.client(srv.admin_token) as admin:
        assert admin.post(f"{API}/add-domain", json={"domain": "usage.example"}).status_code == 201
        made = admin.post(f"{API}/add-user", json={"email": "info@usage.example", "password": PASSWORD}).json()
        key = admin.post(f"{API}/add-node", json={"name": "mpi09"}).json()["sync_key"]
        auth = {"Authorization": "Basic " + base64.b64encode(f"mpi09:{key}".encode()).decode()}
        # a report the size of 100k mailboxes' usage fits (the unknown ones are dropped)
        many = [_usage(f"u{i}@usage.example", "20261201-000000", i, 1) for i in range(100_000)]
        body = {"status": "ok", "usage": [_usage("info@usage.example", made["id"], 2 * 1048576, 3), *many]}
        r = httpx.post(f"{srv.url}/v1/nodes/report", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        users = admin.get(f"{API}/list-users", params={"domain": "usage.example"}).json()["users"]
        assert (users[0]["used_mb"], users[0]["messages"]) == (2.0, 3) and users[0]["usage_reported_at"]
        bad = httpx.post(
            f"{srv.url}/v1/nodes/report",
            json={"status": "ok", "usage": [{"email": "info@usage.example"}]},
            headers=auth,
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] in ("missing_field", "invalid_request")
        # restore-user over HTTP: 409 active, 404 none
        assert admin.post(f"{API}/restore-user", json={"email": "info@usage.example"}).status_code == 409
        assert admin.post(f"{API}/restore-user", json={"email": "ghost@usage.example"}).status_code == 404
        assert admin.post(f"{API}/remove-user", json={"email": "info@usage.example"}).status_code == 200
        restored = admin.post(f"{API}/restore-user", json={"email": "info@usage.example"})
        assert restored.status_code == 200 and restored.json()["id"] == made["id"]


# --- hostile values never steer a path --------------------------------------------------------

ROOTS = st.sampled_from(["/var/vmail", "/srv/mail/vhosts", "/"])
LOCALS = st.from_regex(r"\A[a-z0-9](?:[a-z0-9_+-]|\.(?=[a-z0-9_+-])){0,20}\Z", fullmatch=True)
IDS = st.from_regex(r"\A[0-9]{8}-[0-9a-f]{6}\Z", fullmatch=True)
DOMAINS = st.from_regex(r"\A(?:[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?\.){1,3}[a-z]{2,6}\Z", fullmatch=True)
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FEW
@given(root=ROOTS, domain=DOMAINS, local=LOCALS, the_id=IDS)
def test_no_rendered_home_leaves_the_mail_root(root: str, domain: str, local: str, the_id: str) -> None:
    settings_ = Settings(mail_root=root)
    dom = DomainFile(
        domain=domain, email_enabled=True, mailboxes={local: Mailbox(id=the_id, password=HASH, quota_mb=1)}
    )
    files = render_domain(dom, settings_)
    home = files[f"rendered/domains/{domain[:2]}/{domain}/passwd"].decode().split(":")[5]
    base = root.rstrip("/")
    assert posixpath.normpath(home) == home  # nothing to resolve: no `.`, `..` or `//`
    assert home == f"{base}/{domain}/{local}~{the_id}"
    assert posixpath.dirname(home) == f"{base}/{domain}"  # exactly one level below the domain folder
    assert not posixpath.basename(home).startswith(".")
    maildir = files[f"rendered/domains/{domain[:2]}/{domain}/virtual_mailbox_maps"].decode().split(" ")[1].strip()
    assert posixpath.normpath(posixpath.join(root, maildir)) == home
    assert files[f"rendered/domains/{domain[:2]}/{domain}/mailboxes"] == f"{local} {the_id} active\n".encode()


@FEW
@given(
    st.text(min_size=1, max_size=40)
    | st.sampled_from([".graveyard", ".graveyard.example", "..example.com", ".example.com", "a/b.com", "x..y.com"])
)
def test_graveyard_like_names_are_never_domains(name: str) -> None:
    try:
        domain = v.normalize_domain(name)
    except InvalidInput:
        return
    # Whatever passes is a dotted name of safe labels: never hidden, never a path.
    assert not domain.startswith(".") and "/" not in domain and ".." not in domain
    assert all(label and not label.startswith("-") for label in domain.split("."))


@FEW
@given(st.text(max_size=30))
def test_only_well_formed_ids_are_accepted(value: str) -> None:
    accepted = v.is_mailbox_id(value)
    assert accepted == bool(ID.fullmatch(value)) and (not accepted or value.isascii())
    if not accepted:
        with pytest.raises(ValueError):
            Mailbox(id=value, password=HASH, quota_mb=1)


@pytest.mark.parametrize(
    ("local", "the_id", "domain"),
    [
        ("info", "../../../etc", "example.com"),
        ("../x", "20261201-abcdef", "example.com"),
        ("info", "20261201-abcdef", ".graveyard"),
        ("info", None, "example.com"),
    ],
)
def test_the_compiler_refuses_values_that_bypassed_validation(local: str, the_id: str | None, domain: str) -> None:
    """The last guard: a model built without validation (model_construct) still cannot make a path."""
    box = Mailbox.model_construct(id=the_id, password=HASH, quota_mb=1, active=True)
    dom = DomainFile.model_construct(domain=domain, project_id=None, email_enabled=True, mailboxes={local: box})
    with pytest.raises(CompileError):
        render_domain(dom, Settings())
    with pytest.raises(CompileError):
        mailbox_dir(domain, local, box, Settings())


# --- incoming commits: the new files are validated like the others -------------------------------


@pytest.mark.parametrize(
    ("path", "content"),
    [
        # a soft-deleted mailbox marked active, a line dropped, a stranger's Maildir claimed
        ("rendered/domains/ex/example.com/mailboxes", lambda t: t.replace(" inactive", " active")),
        ("rendered/domains/ex/example.com/mailboxes", lambda t: t.split("\n", 1)[1]),
        ("rendered/domains/ex/example.com/mailboxes", lambda t: t + "stranger 20260101-000000 active\n"),
        ("rendered/settings", lambda t: t.replace("purge_after_days 7", "purge_after_days 0")),
        ("rendered/settings", None),
        # a copy in another bucket would never be compared with render_domain()
        ("rendered/domains/zz/example.com/passwd", lambda t: "x@example.com:y:1:1::/etc::\n"),
    ],
)
def test_an_incoming_commit_with_a_forged_lifecycle_file_is_refused(mail_store: Store, path: str, content: Any) -> None:
    from mailstate.state.sync import validate_incoming

    mail_store.execute("add-user", PROJECT_A, {"email": "zed@example.com", "password": PASSWORD})
    mail_store.execute("remove-user", PROJECT_A, {"email": "zed@example.com"})
    try:
        current = show(mail_store, path)
    except subprocess.CalledProcessError:
        current = ""
    data = None if content is None else content(current).encode()
    tree = mail_store.git.build_tree(mail_store.head, {path: data})
    sha = mail_store.git.commit(tree, mail_store.head, "forged\n", mail_store.signer, datetime(2026, 3, 1, tzinfo=UTC))
    verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
    assert not verdict.ok and verdict.problems, path
    assert any(path in p for p in verdict.problems), verdict.problems
