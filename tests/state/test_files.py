"""The state files: canonical YAML, comments that admins wrote, and YAML 1.1's traps."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstate.state import files
from mailstate.state.datadir import DataDir, open_store
from mailstate.state.errors import StateInvalid
from mailstate.state.files import load_yaml, parse_canonical_domain
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import check_commit
from mailstate.state.models import DomainFile, Mailbox, Node, NodesFile, Settings
from mailstate.state.models import DomainFile as _DomainFile
from mailstate.state.models import Mailbox as _Mailbox
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, make_key, read_file, tree_id

HASH_A = "{BLF-CRYPT}$2b$04$" + "a" * 53
HASH_B = "{BLF-CRYPT}$2b$04$" + "B" * 53
# Local parts that YAML 1.1 (PyYAML) reads as booleans, null, numbers or dates when unquoted.
TRICKY_LOCALS = [
    "on",
    "off",
    "yes",
    "no",
    "y",
    "n",
    "null",
    "true",
    "false",
    "123",
    "0x1f",
    "1_0",
    "1.5",
    "0o17",
    "2026-01-01",
    "1e3",
]


def sample_domain() -> DomainFile:
    return DomainFile(
        domain="example.com",
        project_id=7,
        email_enabled=True,
        mailboxes={
            "zed": Mailbox(password=HASH_A, quota_mb=10, active=False),
            "info": Mailbox(password=HASH_B, quota_mb=1024),
            "a.b+c": Mailbox(password=HASH_A, quota_mb=1),
        },
    )


def run(cwd: Path, *args: str) -> str:
    return subprocess.run(list(args), cwd=cwd, check=True, capture_output=True, text=True).stdout


def _admin_key(data: DataDir, tmp_path: Path) -> Path:
    """An admin's ed25519 key, trusted by the data dir (as the README's "Adding an admin key" says)."""
    key = tmp_path / "admin_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin", "-f", str(key)], check=True)
        keytype, b64 = Path(f"{key}.pub").read_text().split()[:2]
        with data.allowed_signers.open("a") as fh:
            fh.write(f'admin@example.org namespaces="git" {keytype} {b64}\n')
    return key


def admin_edit(data: DataDir, tmp_path: Path, path: str, edit) -> None:
    """What an admin does: clone the state repo, edit a file, commit (signed), push back."""
    key = _admin_key(data, tmp_path)
    clone = tmp_path / "clone"
    if clone.exists():
        run(clone, "git", "pull", "-q", "origin", "main")
    else:
        run(tmp_path, "git", "clone", "-q", str(data.repo), str(clone))
    target = clone / path
    target.write_text(edit(target.read_text()))
    run(
        clone,
        "git",
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key}",
        "commit",
        "-S",
        "-q",
        "-am",
        "admin: annotate",
    )
    run(clone, "git", "push", "-q", "origin", "HEAD:main")


def head_text(store: Store, path: str) -> str:
    return read_file(store.git.path, path)


# --- canonical YAML ----------------------------------------------------------------------------


def test_canonical_domain_yaml_is_stable_and_ordered() -> None:
    dom = sample_domain()
    first = files.dump_domain(dom)
    assert first == files.dump_domain(dom)
    # the same state built in another order gives the same bytes
    shuffled = DomainFile(
        domain="example.com",
        email_enabled=True,
        project_id=7,
        mailboxes={k: dom.mailboxes[k] for k in ["info", "a.b+c", "zed"]},
    )
    assert files.dump_domain(shuffled) == first
    # parse → dump is the identity on canonical bytes
    assert files.dump_domain(files.parse_domain(first, "domains/ex/example.com.yaml")) == first
    text = first.decode()
    assert text.splitlines()[:4] == ["domain: example.com", "project_id: 7", "email_enabled: true", "mailboxes:"]
    # one mailbox per block, sorted, fields in a fixed order
    assert [ln for ln in text.splitlines() if ln.startswith("  ") and not ln.startswith("    ")] == [
        "  a.b+c:",
        "  info:",
        "  zed:",
    ]
    assert "  zed:\n    password: '" + HASH_A + "'\n    quota_mb: 10\n    active: false\n" in text
    assert "{" not in text.replace("{BLF-CRYPT}", "")  # block style only, no flow mappings


def test_canonical_nodes_and_settings_are_stable() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    nodes = NodesFile(
        nodes={
            "zz": Node(ip_address=None, sync_key_sha256="1" * 64, created_at=when),
            "aa": Node(ip_address="1:2:3:4:5:6:7:8", sync_key_sha256="0" * 64, created_at=when),
        }
    )
    raw = files.dump_nodes(nodes)
    assert raw == files.dump_nodes(nodes)
    assert files.parse_nodes(raw) == nodes
    assert raw.decode().index("aa:") < raw.decode().index("zz:")
    settings = Settings(mail_root="/srv/mail", uid=8, gid=9, default_quota_mb=5, bcrypt_cost=4)
    assert files.parse_settings(files.dump_settings(settings)) == settings
    assert files.dump_settings(settings) == files.dump_settings(Settings(**settings.model_dump()))


def test_domain_path_fans_out() -> None:
    assert files.domain_path("example.com") == "domains/ex/example.com.yaml"
    assert files.domain_path("xn--bcher-kva.de") == "domains/xn/xn--bcher-kva.de.yaml"
    assert files.domain_from_path("domains/ex/example.com.yaml") == "example.com"
    assert files.domain_from_path("rendered/domains/ex/example.com/passwd") is None
    assert files.domain_from_path("domains/example.com.yaml") is None


def test_parse_domain_checks_file_name_and_syntax() -> None:
    raw = files.dump_domain(sample_domain())
    with pytest.raises(StateInvalid) as info:
        files.parse_domain(raw, "domains/ot/other.com.yaml")
    assert "domains/ex/example.com.yaml" in info.value.message
    with pytest.raises(StateInvalid) as info:
        files.parse_domain(b"domain: [unclosed", "domains/ex/example.com.yaml")
    assert "not valid YAML" in info.value.message
    with pytest.raises(StateInvalid) as info:
        files.parse_domain(raw.replace(b"project_id: 7", b"project_id: 7\nowner: bob"), "domains/ex/example.com.yaml")
    assert "owner" in info.value.message


def test_same_operations_give_same_state_bytes(tmp_path: Path) -> None:
    """Two servers doing the same hash-free writes produce byte-identical state files."""
    from mailstate.state.datadir import init_data_dir

    blobs = []
    for name in ["one", "two"]:
        dd = init_data_dir(tmp_path / name, Settings(bcrypt_cost=4), keygen=make_key)
        store = open_store(dd.root)
        store.execute("add-domain", ADMIN, {"domain": "b.example", "project_id": 5})
        store.execute("link-domain", ADMIN, {"domain": "a.example", "project_id": 5})
        store.execute("disable-email", ADMIN, {"domain": "b.example"})
        store.execute("enable-email", ADMIN, {"domain": "a.example"})
        tree = tree_id(dd.repo)
        blobs.append(tree)
    assert blobs[0] == blobs[1]


# --- comments that admins wrote ----------------------------------------------------------------


@pytest.mark.e2e
def test_admin_comments_survive_api_writes(data_dir: DataDir, mail_store: Store, tmp_path: Path) -> None:
    path = "domains/ex/example.com.yaml"

    def annotate(text: str) -> str:
        text = "# Owned by ACME; ticket OPS-42. Do not remove info@.\n" + text
        text = text.replace("mailboxes:\n", "mailboxes:\n  # the shared inbox, read by three people\n")
        return text.replace("    quota_mb: 1024\n", "    quota_mb: 1024  # raised after the March incident\n", 1)

    admin_edit(data_dir, tmp_path, path, annotate)
    store = open_store(data_dir.root)  # a restart picks up the admin's commit
    before_admin = head_text(store, path)
    assert "OPS-42" in before_admin

    store.execute("add-user", PROJECT_A, {"email": "abc@example.com", "password": PASSWORD, "quota_mb": 5})
    store.execute("add-user", PROJECT_A, {"email": "zzz@example.com", "password": PASSWORD})
    store.execute("update-password", PROJECT_A, {"email": "info@example.com", "password": "new password 9"})
    store.execute("remove-user", PROJECT_A, {"email": "zzz@example.com"})
    text = head_text(store, path)
    assert text.startswith("# Owned by ACME; ticket OPS-42. Do not remove info@.\n")
    assert "  # the shared inbox, read by three people\n" in text
    assert "quota_mb: 1024  # raised after the March incident" in text
    # the new mailboxes are in sorted place, with fields in canonical order
    body = [ln.strip() for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert body.index("abc:") < body.index("info:") < body.index("zzz:")
    i = body.index("abc:")
    assert [ln.split(":")[0] for ln in body[i + 1 : i + 5]] == ["id", "password", "quota_mb", "active"]
    # the data is what the operations said
    data = yaml.safe_load(text)
    assert data["mailboxes"]["abc"]["quota_mb"] == 5
    assert data["mailboxes"]["zzz"]["active"] is False
    assert data["mailboxes"]["info"]["password"] != yaml.safe_load(before_admin)["mailboxes"]["info"]["password"]
    # the commits are still valid: state parses and rendered/ equals compile(state)
    assert check_commit(GitRepo(data_dir.repo), store.head) == []
    assert open_store(data_dir.root).snapshot.domains["example.com"] == store.snapshot.domains["example.com"]


@pytest.mark.e2e
def test_comments_in_nodes_yaml_survive(data_dir: DataDir, store: Store, tmp_path: Path) -> None:
    store.execute("add-node", ADMIN, {"name": "mpi02", "ip_address": "192.0.2.1"})
    admin_edit(data_dir, tmp_path, "nodes.yaml", lambda t: "# rack 3, shelf 2\n" + t)
    store = open_store(data_dir.root)
    # an IPv6 address that YAML 1.1 would read as a base-60 integer when left unquoted
    store.execute("add-node", ADMIN, {"name": "mpi03", "ip_address": "1:2:3:4:5:6:7:8"})
    store.execute("rotate-node-key", ADMIN, {"name": "mpi02"})
    text = head_text(store, "nodes.yaml")
    assert text.startswith("# rack 3, shelf 2\n")
    restarted = open_store(data_dir.root)
    assert restarted.snapshot.nodes.nodes["mpi03"].ip_address == "1:2:3:4:5:6:7:8"
    assert list(yaml.safe_load(text)["nodes"]["mpi03"]) == ["ip_address", "sync_key_sha256", "created_at"]
    assert check_commit(GitRepo(data_dir.repo), store.head) == []


# --- YAML 1.1's traps: local parts that are not strings to a naive reader -----------------------

TRICKY_NODES = ["on", "no", "null", "true", "123", "0x1f", "1e3", "2026-01-01", "0o17"]


@pytest.mark.e2e
def test_tricky_node_names_roundtrip_in_both_paths(data_dir: DataDir, store: Store, tmp_path: Path) -> None:
    for name in TRICKY_NODES[:4]:
        store.execute("add-node", ADMIN, {"name": name})
    admin_edit(data_dir, tmp_path, "nodes.yaml", lambda t: "# nodes, see the wiki\n" + t)
    store = open_store(data_dir.root)
    for name in TRICKY_NODES[4:]:
        store.execute("add-node", ADMIN, {"name": name})
    store.execute("rotate-node-key", ADMIN, {"name": "on"})
    text = head_text(store, "nodes.yaml")
    assert text.startswith("# nodes, see the wiki\n")
    assert sorted(yaml.safe_load(text)["nodes"]) == sorted(TRICKY_NODES)
    restarted = Store(data_dir.repo, store.signer, cache_path=None)
    assert sorted(restarted.snapshot.nodes.nodes) == sorted(TRICKY_NODES)
    names = [n["name"] for n in restarted.execute("list-nodes", ADMIN, {}).result["nodes"]]
    assert names == sorted(TRICKY_NODES)


def _add_tricky(store: Store) -> None:
    for local in TRICKY_LOCALS:
        store.execute("add-user", PROJECT_A, {"email": f"{local}@example.com", "password": PASSWORD})


def _assert_tricky_roundtrip(data_dir: DataDir, store: Store, inactive: frozenset[str] = frozenset()) -> None:
    text = head_text(store, "domains/ex/example.com.yaml")
    loaded = yaml.safe_load(text)["mailboxes"]  # PyYAML, YAML 1.1: the strict reader
    for local in TRICKY_LOCALS:
        assert local in loaded, local
    assert all(isinstance(k, str) for k in loaded)
    for restarted in (open_store(data_dir.root), Store(data_dir.repo, store.signer, cache_path=None)):
        assert set(restarted.snapshot.domains["example.com"].mailboxes) == {"info", *TRICKY_LOCALS}
    emails = {u["email"] for u in store.execute("list-users", PROJECT_A, {}).result["users"]}
    assert {f"{local}@example.com" for local in TRICKY_LOCALS} <= emails
    passwd = head_text(store, "rendered/domains/ex/example.com/passwd")
    for local in TRICKY_LOCALS:
        assert (f"\n{local}@example.com:" in "\n" + passwd) == (local not in inactive), local
    assert check_commit(GitRepo(data_dir.repo), store.head) == []


@pytest.mark.e2e
def test_tricky_local_parts_roundtrip_canonical(data_dir: DataDir, mail_store: Store) -> None:
    _add_tricky(mail_store)
    assert "#" not in head_text(mail_store, "domains/ex/example.com.yaml")
    _assert_tricky_roundtrip(data_dir, mail_store)


@pytest.mark.e2e
def test_tricky_local_parts_roundtrip_with_comments(data_dir: DataDir, mail_store: Store, tmp_path: Path) -> None:
    admin_edit(data_dir, tmp_path, "domains/ex/example.com.yaml", lambda t: "# keep me\n" + t)
    store = open_store(data_dir.root)
    _add_tricky(store)
    # and changes to those mailboxes go through the comment-preserving path as well
    store.execute("remove-user", PROJECT_A, {"email": "on@example.com"})
    store.execute("update-password", PROJECT_A, {"email": "null@example.com", "password": "another one!"})
    text = head_text(store, "domains/ex/example.com.yaml")
    assert text.startswith("# keep me\n")
    assert yaml.safe_load(text)["mailboxes"]["on"]["active"] is False
    _assert_tricky_roundtrip(data_dir, store, inactive=frozenset({"on"}))


@pytest.mark.e2e
def test_an_admin_edit_that_keeps_tricky_keys_quoted_survives(
    data_dir: DataDir, mail_store: Store, tmp_path: Path
) -> None:
    """Existing quoted keys stay quoted when ruamel rewrites the file around them."""
    _add_tricky(mail_store)
    admin_edit(data_dir, tmp_path, "domains/ex/example.com.yaml", lambda t: t + "# trailing note\n")
    store = open_store(data_dir.root)
    store.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": PASSWORD})
    text = head_text(store, "domains/ex/example.com.yaml")
    assert "# trailing note" in text
    _tricky = set(TRICKY_LOCALS)
    assert _tricky | {"info", "later"} == set(yaml.safe_load(text)["mailboxes"])


def test_comment_preserving_rewrite_of_one_file_directly() -> None:
    dom = sample_domain()
    previous = b"# header\n" + files.dump_domain(dom)
    changed = dom.model_copy(update={"mailboxes": {**dom.mailboxes, "yes": Mailbox(password=HASH_B, quota_mb=3)}})
    out = files.dump_domain(changed, previous)
    assert out.startswith(b"# header\n")
    assert files.parse_domain(out, "domains/ex/example.com.yaml") == changed
    # without a comment, the canonical form is used
    assert files.dump_domain(changed, files.dump_domain(dom)) == files.dump_domain(changed)


# --- the fast reader of canonical domain files agrees with YAML ------------------------------

_TRAPS = [
    "on",
    "off",
    "yes",
    "no",
    "y",
    "n",
    "true",
    "null",
    "123",
    "1_0",
    "0x1f",
    "1e3",
    "2026-01-01",
    "info",
    "a.b",
    "x+y",
    "a-b_c",
]
_locals = st.one_of(
    st.sampled_from(_TRAPS),
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}", fullmatch=True).filter(
        lambda s: ".." not in s and not s.endswith(".")
    ),
)
_hash = st.from_regex(r"[./A-Za-z0-9]{53}", fullmatch=True).map(lambda h: "{BLF-CRYPT}$2b$04$" + h)
_box = st.builds(_Mailbox, password=_hash, quota_mb=st.integers(1, 1_048_576), active=st.booleans())


@settings(max_examples=80, deadline=None)
@given(
    domain=st.sampled_from(["example.com", "xn--bcher-kva.de", "a-b.example.org", "on.example", "123.example"]),
    project=st.one_of(st.none(), st.integers(1, 2**40)),
    enabled=st.booleans(),
    boxes=st.dictionaries(_locals, _box, max_size=6),
)
def test_fast_reader_equals_yaml_on_canonical_files(
    domain: str, project: int | None, enabled: bool, boxes: dict[str, _Mailbox]
) -> None:
    from mailstate.state.files import dump_domain

    boxes = {k: b for k, b in boxes.items() if ".." not in k}
    data = dump_domain(_DomainFile(domain=domain, project_id=project, email_enabled=enabled, mailboxes=boxes))
    fast = parse_canonical_domain(data)
    assert fast is not None, data.decode()
    assert fast == load_yaml(data, "x.yaml")


@settings(max_examples=150, deadline=None)
@given(
    position=st.integers(0, 400),
    insert=st.sampled_from(["#", " ", "\n", "'", "x", ": ", "  dup:\n", "-", "\t", "{}", "0"]),
)
def test_fast_reader_never_disagrees_with_yaml_on_edited_files(position: int, insert: str) -> None:
    from mailstate.state.files import dump_domain

    boxes = {
        "info": _Mailbox(password="{BLF-CRYPT}$2b$04$" + "a" * 53, quota_mb=5),
        "on": _Mailbox(password="{BLF-CRYPT}$2b$04$" + "b" * 53, quota_mb=9),
    }
    text = dump_domain(_DomainFile(domain="example.com", project_id=3, email_enabled=True, mailboxes=boxes))
    edited = text[: position % (len(text) + 1)] + insert.encode() + text[position % (len(text) + 1) :]
    fast = parse_canonical_domain(edited)
    if fast is not None:
        assert fast == load_yaml(edited, "x.yaml")
