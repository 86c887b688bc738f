"""Aliases, forwarding, catch-alls and alias domains through a real store: every success path,
every error code, isolation between projects, the rendered virtual_alias_maps, and the
signed commits with their trailers. Hostile values (hypothesis) are refused with the repo
untouched and every compiled alias line well-formed."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstate.state import aliases as al
from mailstate.state.errors import MailstateError
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B, commit_count, commit_message
from tests.helpers.store import domain_yaml, err, linked, show

A, B = PROJECT_A, PROJECT_B


def amap(store: Store, domain: str) -> str | None:
    return show(store, f"rendered/domains/{domain[:2]}/{domain}/virtual_alias_maps")


@pytest.fixture
def world(mail_store: Store) -> Store:
    """example.com (A, info@ mailbox), other.com (A, bob@), b.example (B, eve@)."""
    s = mail_store
    linked(s, "other.com", A.project_id)
    s.execute("add-user", A, {"email": "bob@other.com", "password": PASSWORD})
    linked(s, "b.example", B.project_id)
    s.execute("add-user", B, {"email": "eve@b.example", "password": PASSWORD})
    return s


def trailers(store: Store) -> str:
    """The last commit's message: its subject and trailers."""
    return commit_message(store.git.path)


def test_add_update_remove_list_alias(world: Store) -> None:
    before = commit_count(world.git.path)
    out = world.execute(
        "add-alias",
        A,
        {"address": "Sales@Example.com", "destinations": ["info@example.com", "Bob@other.com", "x@gmail.com"]},
    )
    assert (
        out.created
        and out.result["commit"]
        and {k: v for k, v in out.result.items() if k != "commit"}
        == {"address": "sales@example.com", "destinations": ["info@example.com", "bob@other.com", "x@gmail.com"]}
    )
    assert commit_count(world.git.path) == before + 1
    log = trailers(world)
    assert "add-alias sales@example.com" in log and "Action: add-alias" in log and "Project: 101" in log
    assert domain_yaml(world, "example.com")["aliases"] == {
        "sales": ["info@example.com", "bob@other.com", "x@gmail.com"]
    }
    assert amap(world, "example.com") == "sales@example.com info@example.com,bob@other.com,x@gmail.com\n"
    # A no-op update makes no commit; a real one replaces every destination.
    assert (
        world.execute(
            "update-alias",
            A,
            {"address": "sales@example.com", "destinations": ["info@example.com", "bob@other.com", "x@gmail.com"]},
        ).result["commit"]
        is None
    )
    world.execute("update-alias", A, {"address": "sales@example.com", "destinations": ["bob@other.com"]})
    assert amap(world, "example.com") == "sales@example.com bob@other.com\n"
    listed = world.execute("list-aliases", A, {}).result["aliases"]
    assert listed == [
        {"address": "sales@example.com", "domain": "example.com", "catch_all": False, "destinations": ["bob@other.com"]}
    ]
    assert world.execute("list-aliases", B, {}).result == {"aliases": []}
    assert world.execute("list-aliases", A, {"domain": "other.com"}).result == {"aliases": []}
    world.execute("remove-alias", A, {"address": "sales@example.com"})
    assert amap(world, "example.com") is None and "aliases" not in domain_yaml(world, "example.com")


def test_catch_all_maps_every_mailbox_and_alias_to_itself(world: Store) -> None:
    world.execute("add-user", A, {"email": "anna@example.com", "password": PASSWORD})
    world.execute("add-user", A, {"email": "gone@example.com", "password": PASSWORD})
    world.execute("remove-user", A, {"email": "gone@example.com"})
    world.execute("add-alias", A, {"address": "sales@example.com", "destinations": ["anna@example.com"]})
    world.execute("add-alias", A, {"address": "@example.com", "destinations": ["info@example.com"]})
    assert amap(world, "example.com") == (
        "@example.com info@example.com\n"
        "anna@example.com anna@example.com\n"
        "gone@example.com gone@example.com\n"  # soft-deleted: refused on delivery, never the catch-all's
        "info@example.com info@example.com\n"
        "sales@example.com anna@example.com\n"
    )
    assert world.execute("list-aliases", A, {"domain": "example.com"}).result["aliases"][0]["catch_all"] is True
    # Without the catch-all, no self-mappings and no file.
    world.execute("remove-alias", A, {"address": "@example.com"})
    assert amap(world, "example.com") == "sales@example.com anna@example.com\n"


def test_forwarding_with_and_without_copy_and_soft_delete(world: Store) -> None:
    out = world.execute(
        "set-forwarding", A, {"email": "info@example.com", "destinations": ["bob@other.com", "x@gmail.com"]}
    )
    assert out.result["destinations"] == ["bob@other.com", "x@gmail.com"] and out.result["keep_copy"] is True
    assert amap(world, "example.com") == "info@example.com info@example.com,bob@other.com,x@gmail.com\n"
    world.execute(
        "set-forwarding", A, {"email": "info@example.com", "destinations": ["bob@other.com"], "keep_copy": False}
    )
    assert amap(world, "example.com") == "info@example.com bob@other.com\n"
    user = world.execute("list-users", A, {"domain": "example.com"}).result["users"][0]
    assert (user["forward_to"], user["keep_copy"]) == (["bob@other.com"], False)
    # A soft-deleted mailbox loses its forwarding in the compiled maps; restore brings it back.
    world.execute("remove-user", A, {"email": "info@example.com"})
    assert amap(world, "example.com") is None
    assert (
        err(world, "set-forwarding", A, {"email": "info@example.com", "destinations": ["bob@other.com"]}).code
        == "mailbox_inactive"
    )
    world.execute("restore-user", A, {"email": "info@example.com"})
    assert amap(world, "example.com") == "info@example.com bob@other.com\n"
    world.execute("set-forwarding", A, {"email": "info@example.com", "destinations": []})
    assert amap(world, "example.com") is None
    assert (
        world.execute("set-forwarding", A, {"email": "info@example.com", "destinations": []}).result["commit"] is None
    )


def test_alias_domain(world: Store) -> None:
    linked(world, "old.example", A.project_id)
    out = world.execute("add-alias-domain", A, {"domain": "old.example", "target": "example.com"})
    assert (out.result["domain"], out.result["alias_of"]) == ("old.example", "example.com")
    assert amap(world, "old.example") == "@old.example @example.com\n"
    domains = {d["domain"]: d for d in world.execute("list-domains", A, {}).result["domains"]}
    assert domains["old.example"]["alias_of"] == "example.com" and domains["example.com"]["alias_of"] is None
    assert err(world, "disable-email", A, {"domain": "example.com"}).code in (
        "alias_domains_remain",
        "active_mailboxes_remain",
    )
    world.execute("remove-user", A, {"email": "info@example.com", "hard_delete": True})
    assert err(world, "disable-email", A, {"domain": "example.com"}).code == "alias_domains_remain"
    assert err(world, "remove-domain", ADMIN, {"domain": "example.com"}).code == "alias_domains_remain"
    world.execute("remove-alias-domain", A, {"domain": "old.example"})
    assert amap(world, "old.example") is None
    assert err(world, "remove-alias-domain", A, {"domain": "old.example"}).code == "alias_not_found"
    world.execute("disable-email", A, {"domain": "example.com"})


def test_alias_domain_target_invalid(world: Store) -> None:
    linked(world, "old.example", A.project_id)
    linked(world, "dark.example", A.project_id, enable=False)
    for target in ("b.example", "dark.example", "old.example", "nowhere.example"):
        assert (
            err(world, "add-alias-domain", A, {"domain": "old.example", "target": target}).code
            == "alias_domain_target_invalid"
        )
    world.execute("add-alias-domain", A, {"domain": "old.example", "target": "example.com"})
    linked(world, "older.example", A.project_id)
    # The target is itself an alias domain; and a chain the other way round.
    assert (
        err(world, "add-alias-domain", A, {"domain": "older.example", "target": "old.example"}).code
        == "alias_domain_target_invalid"
    )
    assert (
        err(world, "add-alias-domain", A, {"domain": "example.com", "target": "other.com"}).code
        == "alias_domain_target_invalid"
    )
    assert (
        err(world, "add-alias-domain", B, {"domain": "old.example", "target": "example.com"}).code == "domain_not_found"
    )
    assert (
        err(world, "add-alias", A, {"address": "@old.example", "destinations": ["info@example.com"]}).code
        == "address_in_use"
    )


def test_error_codes(world: Store) -> None:
    add = {"address": "sales@example.com", "destinations": ["info@example.com"]}
    world.execute("add-alias", A, add)
    assert err(world, "add-alias", A, add).code == "alias_exists"
    assert (
        err(world, "add-alias", A, {"address": "info@example.com", "destinations": ["bob@other.com"]}).code
        == "address_in_use"
    )
    assert err(world, "add-user", A, {"email": "sales@example.com", "password": PASSWORD}).code == "address_in_use"
    assert (
        err(world, "update-alias", A, {"address": "nope@example.com", "destinations": ["info@example.com"]}).code
        == "alias_not_found"
    )
    assert err(world, "remove-alias", A, {"address": "nope@example.com"}).code == "alias_not_found"
    many = {"address": "many@example.com", "destinations": [f"u{i}@gmail.com" for i in range(51)]}
    assert err(world, "add-alias", A, many).code == "too_many_destinations"
    assert (
        err(
            world,
            "set-forwarding",
            A,
            {"email": "info@example.com", "destinations": [f"u{i}@x.org" for i in range(51)]},
        ).code
        == "too_many_destinations"
    )
    fifty = {"address": "fifty@example.com", "destinations": [f"u{i}@gmail.com" for i in range(50)]}
    assert world.execute("add-alias", A, fifty).created
    for bad in (
        {"address": "a@example.com", "destinations": []},
        {"address": "a@example.com", "destinations": ["x@y.org", "X@y.org"]},
        {"address": "a@example.com", "destinations": "x@y.org"},
        {"address": "a b@example.com", "destinations": ["x@y.org"]},
    ):
        assert err(world, "add-alias", A, bad).code in ("invalid_destinations", "invalid_email")
    assert (
        err(world, "add-alias", A, {"address": "x@dark-nothing.example", "destinations": ["a@b.org"]}).code
        == "domain_not_found"
    )
    assert (
        err(world, "set-forwarding", A, {"email": "nobody@example.com", "destinations": ["a@b.org"]}).code
        == "mailbox_not_found"
    )


def test_loops_are_refused_across_domains(world: Store) -> None:
    world.execute("add-alias", A, {"address": "a@example.com", "destinations": ["b@other.com"]})
    world.execute("add-alias", A, {"address": "b@other.com", "destinations": ["c@example.com"]})
    e = err(world, "add-alias", A, {"address": "c@example.com", "destinations": ["a@example.com"]})
    assert e.code == "alias_loop" and "a@example.com" in e.message
    assert (
        err(world, "add-alias", A, {"address": "self@example.com", "destinations": ["self@example.com"]}).code
        == "alias_loop"
    )
    # Forwarding into the chain and back.
    world.execute("add-alias", A, {"address": "x@example.com", "destinations": ["info@example.com"]})
    world.execute("set-forwarding", A, {"email": "info@example.com", "destinations": ["bob@other.com"]})
    assert (
        err(world, "set-forwarding", A, {"email": "bob@other.com", "destinations": ["x@example.com"]}).code
        == "alias_loop"
    )
    # A catch-all whose target is unknown falls back to itself.
    assert (
        err(world, "add-alias", A, {"address": "@example.com", "destinations": ["nobody@example.com"]}).code
        == "alias_loop"
    )
    # Through an alias domain: x@old -> x@example.com -> (alias) -> x@old.
    linked(world, "old.example", A.project_id)
    world.execute("add-alias", A, {"address": "loop@example.com", "destinations": ["loop@old.example"]})
    assert err(world, "add-alias-domain", A, {"domain": "old.example", "target": "example.com"}).code == "alias_loop"
    # Removing a mailbox can make its mail fall to a catch-all that comes back to it.
    world.execute("add-user", A, {"email": "t@other.com", "password": PASSWORD})
    world.execute("add-alias", A, {"address": "hop@other.com", "destinations": ["t@other.com"]})
    world.execute("add-alias", A, {"address": "@other.com", "destinations": ["hop@other.com"]})
    assert err(world, "remove-user", A, {"email": "t@other.com", "hard_delete": True}).code == "alias_loop"


def test_depth_cap(world: Store) -> None:
    world.execute(
        "add-alias", A, {"address": f"h{al.MAX_ALIAS_DEPTH - 1}@example.com", "destinations": ["info@example.com"]}
    )
    for i in range(al.MAX_ALIAS_DEPTH - 2, -1, -1):
        world.execute("add-alias", A, {"address": f"h{i}@example.com", "destinations": [f"h{i + 1}@example.com"]})
    assert (
        err(world, "add-alias", A, {"address": "top@example.com", "destinations": ["h0@example.com"]}).code
        == "alias_chain_too_long"
    )


def test_isolation_between_projects(world: Store) -> None:
    world.execute("add-alias", B, {"address": "sales@b.example", "destinations": ["eve@b.example"]})
    for op, body in (
        ("add-alias", {"address": "evil@b.example", "destinations": ["x@y.org"]}),
        ("add-alias", {"address": "@b.example", "destinations": ["x@y.org"]}),
        ("add-alias-domain", {"domain": "b.example", "target": "example.com"}),
        ("remove-alias-domain", {"domain": "b.example"}),
        ("list-aliases", {"domain": "b.example"}),
    ):
        assert err(world, op, A, body).code == "domain_not_found", op
    for op, body in (
        ("update-alias", {"address": "sales@b.example", "destinations": ["x@y.org"]}),
        ("remove-alias", {"address": "sales@b.example"}),
    ):
        assert err(world, op, A, body).code == "alias_not_found", op
    assert (
        err(world, "set-forwarding", A, {"email": "eve@b.example", "destinations": ["x@y.org"]}).code
        == "mailbox_not_found"
    )
    # A destination may be any address, another project's too (like an external one).
    world.execute("add-alias", A, {"address": "to-b@example.com", "destinations": ["sales@b.example"]})
    assert "to-b" not in str(world.execute("list-aliases", B, {}).result)


def test_a_domain_goes_with_its_aliases_and_comments_survive(world: Store) -> None:
    world.execute("add-alias", A, {"address": "sales@other.com", "destinations": ["bob@other.com"]})
    world.execute("remove-user", A, {"email": "bob@other.com", "hard_delete": True})
    world.execute("disable-email", A, {"domain": "other.com"})
    assert "aliases" not in domain_yaml(world, "other.com") and amap(world, "other.com") is None


def test_admin_comments_survive_an_alias_write(world: Store) -> None:
    world.execute("add-alias", A, {"address": "sales@example.com", "destinations": ["info@example.com"]})
    path = "domains/ex/example.com.yaml"
    text = (show(world, path) or "").replace("  sales:\n", "  sales: # the sales team\n")
    from mailstate.state import files as f

    snap = world.snapshot
    dom = snap.domains["example.com"].model_copy(
        update={"aliases": {"sales": ["info@example.com"], "zz": ["bob@other.com"]}}
    )
    out = f.dump_domain(dom, ("# reviewed by ops\n" + text).encode()).decode()
    assert "# reviewed by ops" in out and "# the sales team" in out and "  zz:" in out


LINE = re.compile(r"^(@|[a-z0-9][a-z0-9._+-]*@)[a-z0-9.-]+ [^\s,:]+(,[^\s,:]+)*$")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    address=st.one_of(
        st.text(max_size=40),
        st.sampled_from(["a\n@example.com", "@", "@@example.com", "a:b@example.com", "x@example.com\n"]),
    ),
    dests=st.lists(
        st.one_of(
            st.text(max_size=30), st.sampled_from(["a@b.org\nx", "a b@c.org", "a@b.org,c@d.org", "@b.org", "a@b:c.org"])
        ),
        max_size=4,
    ),
)
def test_hostile_values_never_break_a_map(world: Store, pipull: Any, address: str, dests: list[str]) -> None:
    head = world.head
    try:
        world.execute("add-alias", A, {"address": address, "destinations": dests})
    except MailstateError as exc:
        assert exc.code and world.head == head
    text = amap(world, "example.com") or ""
    for line in text.splitlines():
        assert LINE.fullmatch(line), line
    if text:  # and the node's own validator takes the compiled fragment as it is
        assert pipull.aliasmap.check_bytes("example.com", text.encode()) == len(text.splitlines())
    if world.head != head:
        world.execute(
            "remove-alias",
            A,
            {"address": world.execute("list-aliases", A, {"domain": "example.com"}).result["aliases"][0]["address"]},
        )


def test_admin_may_manage_any_projects_aliases(world: Store) -> None:
    world.execute("add-alias", ADMIN, {"address": "ops@b.example", "destinations": ["eve@b.example"]})
    assert "Project: 202" in trailers(world)
    assert (
        world.execute("list-aliases", Actor.admin(), {"domain": "b.example"}).result["aliases"][0]["address"]
        == "ops@b.example"
    )


def test_plan_names_alias_changes(world: Store) -> None:
    from mailstate.state.plan import plan

    before = world.snapshot
    world.execute("add-alias", A, {"address": "sales@example.com", "destinations": ["info@example.com"]})
    world.execute("add-alias", A, {"address": "@example.com", "destinations": ["info@example.com"]})
    world.execute("set-forwarding", A, {"email": "bob@other.com", "destinations": ["x@gmail.com"], "keep_copy": False})
    linked(world, "old.example", A.project_id)
    world.execute("add-alias-domain", A, {"domain": "old.example", "target": "example.com"})
    result = plan(before, world.snapshot)
    lines = [e.line() for e in result.aliases]
    assert "+ sales@example.com (alias -> info@example.com)" in lines
    assert "+ @example.com (catch-all -> info@example.com)" in lines
    assert "~ bob@other.com: forwards to x@gmail.com (no copy kept)" in lines
    assert "+ @old.example (alias domain of example.com)" in lines
    assert "virtual_alias_maps" in result.render_text()
    middle = world.snapshot
    world.execute("update-alias", A, {"address": "sales@example.com", "destinations": ["bob@other.com"]})
    world.execute("remove-alias", A, {"address": "@example.com"})
    lines = [e.line() for e in plan(middle, world.snapshot).aliases]
    assert lines == ["- @example.com (catch-all)", "~ sales@example.com: alias -> bob@other.com (was info@example.com)"]


@pytest.mark.e2e
def test_an_incoming_commit_with_a_loop_across_domains_is_refused(world: Store, data_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pull request may not sneak in what the API refuses: a loop over two domain files, each
    fine on its own, with rendered/ recompiled so that only the loop is wrong."""
    import yaml

    from mailstate.api.cli import main
    from mailstate.state.sync import validate_incoming

    world.execute("add-alias", A, {"address": "a@example.com", "destinations": ["b@other.com"]})
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    path = work / "domains/ot/other.com.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["aliases"] = {"b": ["a@example.com"]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["compile", str(work)]) == 0
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    subprocess.run([*git, "commit", "-q", "-S", "-am", "loop"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:refs/pr/1"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    verdict = validate_incoming(world.git, world.snapshot, sha)
    assert not verdict.ok and any("loop" in p and "other.com" in p for p in verdict.problems), verdict.problems
    assert main(["check", str(work)]) == 1


_LOCALS = st.one_of(
    st.sampled_from(
        ["on", "off", "yes", "no", "y", "n", "true", "null", "123", "1e3", "2026-01-01", "info", "a.b", "x+y"]
    ),
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,12}", fullmatch=True).filter(
        lambda s: ".." not in s and not s.endswith(".")
    ),
)
_ADDRESS = st.builds(
    lambda local, dom: f"{local}@{dom}", _LOCALS, st.sampled_from(["on.example", "123.example", "x.y.org"])
)


@settings(max_examples=80, deadline=None)
@given(
    boxes=st.dictionaries(
        _LOCALS,
        st.one_of(st.none(), st.tuples(st.lists(_ADDRESS, min_size=1, max_size=3, unique=True), st.booleans())),
        max_size=4,
    ),
    aliases=st.dictionaries(
        st.one_of(_LOCALS, st.just("@")), st.lists(_ADDRESS, min_size=1, max_size=3, unique=True), max_size=4
    ),
    alias_of=st.one_of(st.none(), st.sampled_from(["old.example", "on.example"])),
)
def test_fast_reader_equals_yaml_with_aliases(
    boxes: dict[str, Any], aliases: dict[str, list[str]], alias_of: str | None
) -> None:
    """The fast reader of canonical domain files (the cold start) reads aliases, forwarding and
    alias_of exactly as the YAML loader does, YAML 1.1's traps included."""
    from mailstate.state.files import dump_domain, load_yaml, parse_canonical_domain
    from mailstate.state.models import DomainFile, Mailbox

    hsh = "{BLF-CRYPT}$2b$04$" + "a" * 53
    mailboxes = {
        local: Mailbox(
            id=f"20261201-{i:06x}",
            password=hsh,
            quota_mb=5,
            forward_to=fwd[0] if fwd else None,
            keep_copy=fwd[1] if fwd else True,
        )
        for i, (local, fwd) in enumerate(boxes.items())
        if ".." not in local
    }
    aliases = {k: d for k, d in aliases.items() if k not in mailboxes and ".." not in k and not (k == "@" and alias_of)}
    data = dump_domain(
        DomainFile(
            domain="example.com",
            project_id=3,
            email_enabled=True,
            alias_of=alias_of,
            mailboxes=mailboxes,
            aliases=aliases,
        )
    )
    fast = parse_canonical_domain(data)
    assert fast is not None, data.decode()
    assert fast == load_yaml(data, "x.yaml")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    email=st.one_of(
        st.text(max_size=30), st.sampled_from(["info@example.com", "INFO@example.com\n", "info@example.com "])
    ),
    dests=st.one_of(
        st.text(max_size=20),
        st.lists(st.one_of(st.text(max_size=25), st.sampled_from(["|/bin/sh", "/etc/passwd", "a@b.org "])), max_size=3),
    ),
    keep=st.one_of(st.booleans(), st.sampled_from([0, 1, "yes", None])),
    target=st.one_of(st.text(max_size=25), st.sampled_from(["other.com", "example.com", "b.example", "x y.org"])),
)
def test_hostile_forwarding_and_alias_domains_are_refused_or_clean(
    world: Store, pipull: Any, email: Any, dests: Any, keep: Any, target: Any
) -> None:
    head = world.head
    for op, body in (
        ("set-forwarding", {"email": email, "destinations": dests, "keep_copy": keep}),
        ("add-alias-domain", {"domain": "example.com", "target": target}),
    ):
        before = world.head
        try:
            world.execute(op, A, body)
        except MailstateError as exc:
            assert exc.code and world.head == before
    for name in ("example.com", "other.com"):
        text = amap(world, name) or ""
        if text:
            assert pipull.aliasmap.check_bytes(name, text.encode()) == len(text.splitlines())
    if world.head != head:  # a valid call went through: undo it for the next example
        world.execute("set-forwarding", A, {"email": "info@example.com", "destinations": []})
        if world.snapshot.domains["example.com"].alias_of:
            world.execute("remove-alias-domain", A, {"domain": "example.com"})
