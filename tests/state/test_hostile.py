"""Hostile values, generated: rejected with the right code and the repo untouched; and when a
value is accepted, every compiled file still parses line by line.

Each test builds one real store (bcrypt cost 4) and runs many generated examples against it.
"""

from __future__ import annotations

import ipaddress
import re

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailstate.state import validate as v
from mailstate.state.datadir import DataDir, open_store
from mailstate.state.errors import InvalidInput, MailstateError
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import check_commit
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, commit_count, read_file, rev_parse

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that may never reach a compiled file, a map or a path.
ALWAYS_BAD = [":", " ", "\t", "\n", "\r", "/", "..", "\x00", "\\", "\x0b", "\x0c", "\u2028", "\u202e", "\ufeff"]
LOCAL_BAD = [
    *ALWAYS_BAD,
    *"%!\"'@,;<>()[]*$&=?^`{|}~#",
    "é",
    "ß",
    "☃",
    "\u200b",
    "\uff46",  # fullwidth f
]
DOMAIN_BAD = [
    *ALWAYS_BAD,
    "_",
    "@",
    "!",
    "%",
    "*",
    "'",
    '"',
    "$",
    "&",
    "=",
    "?",
    "#",
    ";",
    ",",
    "~",
    "☃",
    "\u200b\u200b..",
]
NODE_BAD = [*ALWAYS_BAD, "_", ".", "@", "A", "Z", "é", "%", "$", "'", "\u200b"]

safe = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)


def spliced(base: st.SearchStrategy[str], bad: list[str]) -> st.SearchStrategy[str]:
    """A valid-looking value with a forbidden fragment inserted somewhere inside."""
    return st.tuples(base, st.sampled_from(bad), st.integers(min_value=0, max_value=64)).map(
        lambda t: t[0][: t[2] % (len(t[0]) + 1)] + t[1] + t[0][t[2] % (len(t[0]) + 1) :]
    )


def head(data: DataDir) -> tuple[str, int]:
    return rev_parse(data.repo), commit_count(data.repo)


def rejected(store: Store, data: DataDir, op: str, body: object, code: str) -> InvalidInput:
    """`op` must fail with InvalidInput(`code`), leaving the branch exactly where it was."""
    before = head(data)
    try:
        store.execute(op, ADMIN, body)
    except InvalidInput as exc:
        assert exc.code == code, (body, exc.code, exc.message)
        assert head(data) == before
        return exc
    raise AssertionError(f"{op} accepted {body!r}")


def assert_rendered_well_formed(data: DataDir) -> None:
    """Every compiled file at HEAD parses the way Dovecot and Postfix read it."""
    repo = GitRepo(data.repo)
    commit = repo.head()
    assert commit is not None
    for path, oid in repo.walk_blobs(commit, "rendered"):
        text = repo.blob(oid).decode("ascii")  # compiled files are plain ASCII
        assert text == "" or text.endswith("\n"), path
        if path == "rendered/settings":
            assert re.fullmatch(r"format 2\npurge_after_days [0-9]+\n", text), text
            continue
        domain = path.split("/")[3]
        homes = {}
        for line in text[:-1].split("\n") if text else []:
            if path.endswith("/passwd"):
                # user:password:uid:gid:gecos:home:shell:extra (the extra field has one `:`)
                fields = line.split(":", 7)
                assert len(fields) == 8, line
                user, password, uid, gid, gecos, home, shell, extra = fields
                for field in fields:
                    assert not re.search(r"\s", field), line
                assert user.endswith("@" + domain) and user.count("@") == 1
                assert re.fullmatch(r"\{BLF-CRYPT\}\$2b\$04\$[./A-Za-z0-9]{53}", password)
                assert uid == "5000" and gid == "5000" and gecos == "" and shell == ""
                assert re.fullmatch(
                    rf"/var/vmail/{re.escape(domain)}/{re.escape(user.split('@')[0])}~[0-9]{{8}}-[0-9a-f]{{6}}", home
                ), home
                assert ".." not in home.split("/")
                assert re.fullmatch(r"userdb_quota_rule=\*:storage=[0-9]+M", extra), line
            elif path.endswith("/virtual_mailbox_maps"):
                key, value = line.split(" ")
                assert key.endswith("@" + domain)
                assert re.fullmatch(
                    rf"{re.escape(domain)}/{re.escape(key.split('@')[0])}~[0-9]{{8}}-[0-9a-f]{{6}}/", value
                ), value
                assert ".." not in value.split("/")
            elif path.endswith("/mailboxes"):
                local, box_id, state = line.split(" ")
                assert re.fullmatch(r"[0-9]{8}-[0-9a-f]{6}", box_id) and state in ("active", "inactive"), line
                assert local not in homes, line
                homes[local] = box_id
            elif path.endswith("/sender_login_maps"):
                key, owners = line.split(" ")
                assert key.endswith("@" + domain) and key.count("@") == 1, line  # no alias domains here
                for owner in owners.split(","):
                    assert re.fullmatch(r"[a-z0-9._+-]+@[a-z0-9.-]+", owner), line
            else:
                assert line == f"{domain} OK"
    assert check_commit(repo, commit) == []


def fresh(data_dir: DataDir) -> Store:
    store = open_store(data_dir.root)
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    return store


# --- rejected with the right code, repo untouched ------------------------------------------------


def test_hostile_emails_are_rejected(data_dir: DataDir) -> None:
    store = fresh(data_dir)
    locals_ = (
        spliced(safe, LOCAL_BAD)
        | safe.map(lambda s: "." + s)
        | safe.map(lambda s: s + ".")
        | safe.map(lambda s: "-" + s)
    )
    domains = spliced(st.just("example.com"), DOMAIN_BAD)

    @SETTINGS
    @given(st.one_of(locals_.map(lambda lp: lp + "@example.com"), domains.map(lambda d: "info@" + d)))
    @example("a" * 65 + "@example.com")
    @example("info@" + "a" * 64 + ".com")
    @example("info@example.com\n")
    @example("info@example.com@example.com")
    @example("../../etc/passwd@example.com")
    @example("info@..")
    def check(email: str) -> None:
        for op, body in [
            ("add-user", {"email": email, "password": PASSWORD}),
            ("update-password", {"email": email, "password": PASSWORD}),
            ("remove-user", {"email": email, "hard_delete": True}),
        ]:
            exc = rejected(store, data_dir, op, body, "invalid_email")
            assert exc.field == "email"

    check()
    assert_rendered_well_formed(data_dir)


def test_hostile_domains_are_rejected(data_dir: DataDir) -> None:
    store = fresh(data_dir)
    long_label = safe.map(lambda s: (s * 64)[:64] + ".com")
    too_long = st.integers(min_value=254, max_value=400).map(lambda n: ("a" * 62 + ".") * (n // 63) + "com")
    edge_hyphen = safe.map(lambda s: "-" + s + ".com") | safe.map(lambda s: s + "-.com") | safe.map(lambda s: s)

    @SETTINGS
    @given(spliced(st.just("my-domain.example"), DOMAIN_BAD) | long_label | too_long | edge_hyphen)
    @example("example.com/../../etc")
    @example("example.123")
    @example("")
    @example("example.com.")
    def check(domain: str) -> None:
        rejected(store, data_dir, "add-domain", {"domain": domain}, "invalid_domain")
        rejected(store, data_dir, "link-domain", {"domain": domain, "project_id": 1}, "invalid_domain")
        rejected(store, data_dir, "list-users", {"domain": domain}, "invalid_domain")

    check()


def test_hostile_node_names_are_rejected(data_dir: DataDir) -> None:
    store = open_store(data_dir.root)

    @SETTINGS
    @given(
        spliced(st.just("mpi02"), NODE_BAD)
        | safe.map(lambda s: "-" + s)
        | safe.map(lambda s: s + "-")
        | st.just("a" * 64)
    )
    @example("..")
    @example("mpi02\n")
    def check(name: str) -> None:
        rejected(store, data_dir, "add-node", {"name": name}, "invalid_node_name")
        rejected(store, data_dir, "rotate-node-key", {"name": name}, "invalid_node_name")

    check()


def test_hostile_ip_addresses_are_rejected(data_dir: DataDir) -> None:
    store = open_store(data_dir.root)
    ips = st.ip_addresses().map(str)
    tails = ["/24", "%eth0", " ", "\n", ":", "..", "\x00", ":80", "#", "/", "é"]

    @SETTINGS
    @given(st.one_of(spliced(ips, tails), st.text(alphabet="0123456789.:abcdefx/% ", min_size=0, max_size=45)))
    @example("::1%$(reboot)")
    @example("fe80::1%..")
    @example("1.2.3.4.")
    @example("0177.0.0.1")
    def check(ip: str) -> None:
        try:
            ipaddress.ip_address(ip)
            if "%" not in ip:
                return  # a real address, tested for acceptance below
        except ValueError:
            pass
        rejected(store, data_dir, "add-node", {"name": "n1", "ip_address": ip}, "invalid_ip_address")

    check()


def test_hostile_passwords_are_rejected_without_echo(data_dir: DataDir) -> None:
    store = fresh(data_dir)
    too_long = st.text(min_size=1, max_size=100).map(lambda s: (s * 80)[:80]).filter(lambda s: len(s.encode()) > 72)
    multibyte = (
        st.integers(min_value=0, max_value=72).map(lambda n: "x" * n + "€" * 25).filter(lambda s: len(s.encode()) > 72)
    )
    too_short = st.text(max_size=7).filter(lambda s: len(s.encode()) < 8)
    with_nul = (
        st.text(min_size=7, max_size=30)
        .map(lambda s: s[:3] + "\x00" + s[3:])
        .filter(lambda s: 8 <= len(s.encode()) <= 72)
    )

    @SETTINGS
    @given(too_long | multibyte | too_short | with_nul)
    def check(password: str) -> None:
        for op, email in [("add-user", "new@example.com"), ("update-password", "info@example.com")]:
            exc = rejected(store, data_dir, op, {"email": email, "password": password}, "invalid_password")
            if len(password) >= 12:  # shorter ones could be a word of the message itself
                assert password not in exc.message and password not in repr(exc.to_dict())

    check()


@FEW
@given(
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=10),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_hostile_quota_values(value: object) -> None:
    from mailstate.state.models import AddUserRequest, parse

    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= v.MAX_QUOTA_MB
    try:
        req = parse(AddUserRequest, {"email": "a@example.com", "password": PASSWORD, "quota_mb": value})
    except InvalidInput as exc:
        assert not ok or value is None
        assert exc.code == "invalid_quota"
    else:
        assert ok or value is None
        assert req.quota_mb == value


@FEW
@given(value=st.one_of(st.integers(), st.floats(), st.text(max_size=10), st.booleans(), st.none()))
def test_hostile_project_ids(value: object) -> None:
    from mailstate.state.models import LinkDomainRequest, parse

    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**63 - 1
    try:
        parse(LinkDomainRequest, {"domain": "example.com", "project_id": value})
    except InvalidInput as exc:
        assert not ok
        assert exc.code == "invalid_project_id"
    else:
        assert ok


@FEW
@given(
    body=st.dictionaries(
        st.text(max_size=12), st.one_of(st.text(max_size=12), st.integers(), st.none(), st.booleans()), max_size=4
    )
)
def test_arbitrary_bodies_never_escape_the_error_tree(body: dict[str, object]) -> None:
    """Whatever the JSON, parsing answers with an InvalidInput code, never a foreign exception."""
    from mailstate.state.models import parse
    from mailstate.state.ops import OPERATIONS

    for op in OPERATIONS.values():
        try:
            parse(op.request, body)
        except InvalidInput as exc:
            assert exc.code in {
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
            }
            assert exc.message


# --- accepted values keep every compiled file well-formed ---------------------------------------


@pytest.mark.e2e
def test_any_accepted_email_keeps_compiled_files_well_formed(data_dir: DataDir) -> None:
    store = fresh(data_dir)
    alphabet = "abcXYZ019._+-:/ @%!é\n"
    yaml_traps = st.sampled_from(["on", "yes", "null", "true", "123", "1_0", "2026-01-01", "1e3", "0x1f", "~"])
    local_parts = st.text(alphabet=alphabet, min_size=1, max_size=12) | yaml_traps

    @SETTINGS
    @given(local_parts)
    @example("A.B+C_D-E")
    @example("x" * 64)
    def check(local: str) -> None:
        email = f"{local}@example.com"
        before = head(data_dir)
        existing = set(store.snapshot.domains["example.com"].mailboxes)
        try:
            out = store.execute("add-user", PROJECT_A, {"email": email, "password": PASSWORD, "quota_mb": 7})
        except MailstateError as exc:
            assert head(data_dir) == before
            if exc.code == "mailbox_exists":
                assert local.lower() in existing
            else:
                assert exc.code == "invalid_email", exc.code
                assert not re.fullmatch(r"[a-z0-9](?:[a-z0-9_+-]|\.(?=[a-z0-9_+-]))*", local.lower()) or len(local) > 64
            return
        stored = out.result["email"].split("@")[0]
        assert stored == local.lower()
        assert re.fullmatch(r"[a-z0-9][a-z0-9._+-]*", stored) and ".." not in stored
        assert head(data_dir)[1] == before[1] + 1
        assert_rendered_well_formed(data_dir)

    check()
    # a restart reads back exactly what was written
    assert open_store(data_dir.root).snapshot.domains == store.snapshot.domains


@pytest.mark.e2e
def test_any_accepted_domain_keeps_compiled_files_well_formed(data_dir: DataDir) -> None:
    store = open_store(data_dir.root)
    labels = st.text(alphabet="abcXYZ09-_é☃ü.:/ ", min_size=1, max_size=14)

    @FEW
    @given(
        st.tuples(labels, st.sampled_from(["com", "de", "example", "xn--p1ai", "Com"])).map(lambda t: f"{t[0]}.{t[1]}")
    )
    @example("Bücher.de")
    @example("ÄÖÜ.example")
    def check(domain: str) -> None:
        before = head(data_dir)
        try:
            out = store.execute("add-domain", ADMIN, {"domain": domain, "project_id": 3})
        except MailstateError as exc:
            assert head(data_dir) == before
            assert exc.code in {"invalid_domain", "domain_exists"}, exc.code
            return
        name = out.result["domain"]
        assert name.isascii() and name == name.lower()
        assert all(re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", label) for label in name.split("."))
        store.execute("add-user", ADMIN, {"email": f"user@{name}", "password": PASSWORD})
        assert_rendered_well_formed(data_dir)

    check()
    assert open_store(data_dir.root).snapshot.domains == store.snapshot.domains


def test_any_accepted_password_is_hashed_and_checks(data_dir: DataDir) -> None:
    store = fresh(data_dir)

    @FEW
    @given(st.text(min_size=1, max_size=72).filter(lambda s: 8 <= len(s.encode()) <= 72 and "\x00" not in s))
    @example("pass:word\nwith\ttabs and :colons:")
    @example("x" * 72)
    @example("é" * 36)
    def check(password: str) -> None:
        before = read_file(data_dir.repo, "domains/ex/example.com.yaml")
        # What the file holds whatever the password: its keys, the id, the hash's fixed prefix.
        # (Hypothesis draws strings from the code's constants too, such as "{BLF-CRYPT}".)
        skeleton = before.replace(yaml.safe_load(before)["mailboxes"]["info"]["password"], "{BLF-CRYPT}$2b$04$")
        store.execute("update-password", PROJECT_A, {"email": "info@example.com", "password": password})
        text = read_file(data_dir.repo, "domains/ex/example.com.yaml")
        stored = yaml.safe_load(text)["mailboxes"]["info"]["password"]
        assert bcrypt.checkpw(password.encode(), stored.removeprefix("{BLF-CRYPT}").encode())
        assert password not in text or password in skeleton or len(password) < 4
        assert_rendered_well_formed(data_dir)

    check()


@pytest.mark.e2e
def test_any_accepted_node_and_ip_round_trip(data_dir: DataDir) -> None:
    store = open_store(data_dir.root)
    counter = iter(range(10_000))

    @FEW
    @given(st.ip_addresses().map(str) | st.ip_addresses(v=6).map(lambda ip: ip.exploded.upper()))
    @example("1:2:3:4:5:6:7:8")
    @example("10:20:30:40:50:59:0:1")
    @example("::ffff:192.0.2.1")
    @example("0.0.0.0")
    def check(ip: str) -> None:
        name = f"n{next(counter)}"
        out = store.execute("add-node", ADMIN, {"name": name, "ip_address": ip})
        canonical = str(ipaddress.ip_address(ip))
        assert out.result["ip_address"] == canonical
        loaded = yaml.safe_load(read_file(data_dir.repo, "nodes.yaml"))  # the YAML 1.1 reader
        assert loaded["nodes"][name]["ip_address"] == canonical

    check()
    assert open_store(data_dir.root).snapshot.nodes == store.snapshot.nodes
    assert check_commit(GitRepo(data_dir.repo), store.head) == []
