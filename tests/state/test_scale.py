"""What the scale work changed on the server, checked for correctness (the timings
live in bench/bench_scale.py): loaded models share one fields set without any write leaking
through it, and the bench's fast seed builds exactly the tree the store's own path builds."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.seed import SeedInfo, seed_state
from mailstate.state import files, worktree
from mailstate.state.errors import StateInvalid
from mailstate.state.load import ParseCache, load_commit
from mailstate.state.models import Mailbox
from mailstate.state.plan import load_revision, load_worktree, plan, plan_worktree
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A


def _boxes(store: Store, domain: str) -> dict[str, Mailbox]:
    return dict(store.snapshot.domains[domain].mailboxes)


def test_loaded_models_share_a_fields_set_and_copies_do_not_leak(store: Store, tmp_path: Path) -> None:
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    for local in ("a", "b", "c"):
        store.execute("add-user", PROJECT_A, {"email": f"{local}@example.com", "password": PASSWORD})
    cache_path = tmp_path / "cache" / "domains.json"
    cache_path.parent.mkdir()
    for round_ in ("parsed", "cached"):
        cache = ParseCache.open(cache_path)
        snap = load_commit(store.git, store.head, cache)
        cache.save()
        boxes = snap.domains["example.com"].mailboxes
        sets = {id(box.__pydantic_fields_set__) for box in boxes.values()}
        assert len(sets) == 1, round_
        shared = next(iter(boxes.values())).__pydantic_fields_set__
        before = set(shared)
        changed = boxes["a"].model_copy(update={"active": False, "quota_mb": 7})
        assert changed.__pydantic_fields_set__ is not shared and set(shared) == before
        assert (boxes["a"].active, boxes["a"].quota_mb, boxes["b"].active) == (True, 1024, True), round_
        assert changed.active is False and changed.quota_mb == 7
    # And through the store: a write on a loaded state changes one mailbox only.
    reopened = Store(store.git.path, store.signer, cache_path=cache_path)
    reopened.execute("remove-user", PROJECT_A, {"email": "b@example.com"})
    after = _boxes(reopened, "example.com")
    assert [after[k].active for k in ("a", "b", "c")] == [True, False, True]


@pytest.mark.e2e
def test_the_fast_seed_builds_the_same_signed_tree(tmp_path: Path) -> None:
    loose = seed_state(tmp_path / "loose", 600, fast=False)
    fast = seed_state(tmp_path / "fast", 600, fast=True)

    def git(info: SeedInfo, *args: str) -> str:
        repo = info.data_dir.repo
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    assert git(loose, "rev-parse", "main^{tree}") == git(fast, "rev-parse", "main^{tree}")
    assert git(fast, "rev-list", "--count", "main") == "2"  # init + the one seed commit
    assert git(fast, "for-each-ref", "refs/bench") == ""  # fast-import's throwaway ref is gone
    verify = subprocess.run(
        [
            "git",
            "-C",
            str(fast.data_dir.repo),
            "-c",
            f"gpg.ssh.allowedSignersFile={fast.data_dir.allowed_signers}",
            "verify-commit",
            "main",
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert files.domain_path(fast.domains[0]) in git(fast, "ls-tree", "-r", "--name-only", "main")


def _clone(store: Store, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(store.git.path), str(dest)], check=True, capture_output=True)
    return dest


def _full_plan(wt: Path) -> dict[str, object]:
    return plan(load_revision(wt, "HEAD"), load_worktree(wt), base="b", head="h").as_dict()


@pytest.mark.e2e
def test_worktree_plan_parses_only_changed_files_and_agrees_with_the_full_read(store: Store, tmp_path: Path) -> None:
    for name in ("main.example", "alias.example", "other.example"):
        store.execute("link-domain", ADMIN, {"domain": name, "project_id": PROJECT_A.project_id})
        store.execute("enable-email", PROJECT_A, {"domain": name})
    store.execute("add-user", PROJECT_A, {"email": "info@main.example", "password": PASSWORD})
    store.execute("add-user", PROJECT_A, {"email": "x@other.example", "password": PASSWORD})
    store.execute("add-alias-domain", PROJECT_A, {"domain": "alias.example", "target": "main.example"})
    wt = _clone(store, tmp_path / "wt")
    assert worktree.changed_domain_paths(store.git, wt, store.head) == []
    # Touched but unchanged: same content, nothing to report.
    other = wt / files.domain_path("other.example")
    other.write_bytes(other.read_bytes())
    assert worktree.changed_domain_paths(store.git, wt, store.head) == []
    assert not plan_worktree(wt)

    # An alias domain's change reaches its (unchanged) target's sender lines.
    alias = wt / files.domain_path("alias.example")
    alias.write_text(alias.read_text().replace("alias_of: main.example\n", ""))
    assert worktree.changed_domain_paths(store.git, wt, store.head) == [files.domain_path("alias.example")]
    fast = plan_worktree(wt)
    assert {**fast.as_dict(), "base": "b", "head": "h"} == _full_plan(wt)
    assert any("main.example" in e.name for e in fast.rendered), fast.rendered

    # A new untracked domain file and a deleted one.
    (wt / files.domain_path("other.example")).unlink()
    new = wt / files.domain_path("new.example")
    new.parent.mkdir(parents=True, exist_ok=True)
    new.write_text("domain: new.example\nproject_id: null\nemail_enabled: false\nmailboxes: {}\n")
    assert worktree.changed_domain_paths(store.git, wt, store.head) == sorted(
        files.domain_path(n) for n in ("alias.example", "other.example", "new.example")
    )
    fast = plan_worktree(wt)
    assert {**fast.as_dict(), "base": "b", "head": "h"} == _full_plan(wt)
    assert fast.names("domains", "domain_added") == ["new.example"] and fast.names("domains", "domain_removed") == [
        "other.example"
    ]

    # A stray untracked file under domains/ is refused, as the full read refuses it.
    (wt / "domains" / "notes.txt").write_text("hello")
    with pytest.raises(StateInvalid) as caught:
        plan_worktree(wt)
    assert caught.value.problems == [
        "domains/notes.txt: unexpected file (domain files live at domains/<bb>/<domain>.yaml)"
    ]


def test_the_cache_writes_entries_exactly_as_model_dump(store: Store) -> None:
    from mailstate.state.load import _JSON_NATIVE, _domain_to_json

    assert _JSON_NATIVE  # else the fast path is off and this test checks model_dump against itself
    for name in ("a.example", "b.example"):
        store.execute("link-domain", ADMIN, {"domain": name, "project_id": PROJECT_A.project_id})
        store.execute("enable-email", PROJECT_A, {"domain": name})
    store.execute("add-user", PROJECT_A, {"email": "x@a.example", "password": PASSWORD})
    store.execute("add-user", PROJECT_A, {"email": "y@a.example", "password": PASSWORD, "quota_mb": 7})
    store.execute(
        "set-forwarding", PROJECT_A, {"email": "x@a.example", "destinations": ["z@example.org"], "keep_copy": False}
    )
    store.execute("add-alias", PROJECT_A, {"address": "@a.example", "destinations": ["y@a.example"]})
    store.execute("add-alias-domain", PROJECT_A, {"domain": "b.example", "target": "a.example"})
    # inbound protection: a domain's and a mailbox's spam policy (models) and sender rules (JSON)
    store.execute("set-spam-policy", PROJECT_A, {"domain": "a.example", "action": "reject", "reject_score": 9})
    store.execute("set-spam-policy", PROJECT_A, {"email": "y@a.example", "action": "off"})
    store.execute("add-sender-rule", PROJECT_A, {"domain": "a.example", "sender": "@spam.test", "action": "block"})
    store.execute("add-sender-rule", PROJECT_A, {"email": "x@a.example", "sender": "b@c.test", "action": "allow"})
    for dom in store.snapshot.domains.values():
        assert _domain_to_json(dom) == dom.model_dump(mode="json")


def test_the_sorted_domain_list_is_carried_across_writes_exactly(store: Store) -> None:
    for i in range(6):
        store.execute("link-domain", ADMIN, {"domain": f"d{i}.example", "project_id": PROJECT_A.project_id})
    store.execute("list-domains", ADMIN, {"limit": 2})  # builds the list once
    for body in (
        ("link-domain", {"domain": "a0.example", "project_id": 5}),
        ("unlink-domain", {"domain": "d3.example"}),
        ("add-domain", {"domain": "zz.example"}),
        ("link-domain", {"domain": "d3.example", "project_id": 5}),
        ("remove-domain", {"domain": "zz.example"}),
        ("add-node", {"name": "n1"}),
    ):
        store.execute(body[0], ADMIN, body[1])
        snap = store.snapshot
        assert "sorted_domains" in snap.__dict__  # carried over, not rebuilt
        assert snap.sorted_domains == sorted(snap.domains), body
    names = [d["domain"] for d in store.execute("list-domains", ADMIN, {"limit": 1000}).result["linked_not_enabled"]]
    assert names == sorted(store.snapshot.domains)


def _many_domains(store: Store, count: int) -> None:
    for i in range(count):
        store.execute("link-domain", ADMIN, {"domain": f"w{i}.example", "project_id": PROJECT_A.project_id})
        store.execute("enable-email", PROJECT_A, {"domain": f"w{i}.example"})
        store.execute("add-user", PROJECT_A, {"email": f"u{i}@w{i}.example", "password": PASSWORD})


@pytest.mark.e2e
def test_a_cold_start_parsed_by_worker_processes_equals_one_parsed_here(store: Store, tmp_path: Path) -> None:
    _many_domains(store, 6)
    serial = load_commit(store.git, store.head, ParseCache(), parallel_min=10**9)
    cache_path = tmp_path / "cache" / "domains.json"
    cache_path.parent.mkdir()
    cache = ParseCache.open(cache_path)
    parallel = load_commit(store.git, store.head, cache, parallel_min=1)
    assert parallel.domains.parsed_count() == 0  # type: ignore[attr-defined]  # the workers' entries stay unparsed
    assert dict(parallel.domains.items()) == dict(serial.domains.items()) and len(serial.domains) == 6
    assert parallel.by_project == serial.by_project and parallel.alias_users == serial.alias_users
    # What the workers parsed was written to the cache, and serves a warm start.
    warm = load_commit(store.git, store.head, ParseCache.open(cache_path))
    assert dict(warm.domains.items()) == dict(serial.domains.items())


@pytest.mark.e2e
def test_workers_report_the_first_bad_file_as_a_serial_parse_does(store: Store) -> None:
    _many_domains(store, 4)
    bad = "domains/" + files.domain_path("w2.example").split("/", 1)[1]
    broken = store.git.read(store.head, bad)
    assert broken is not None
    tree = store.git.build_tree(store.head, {bad: broken.replace(b"quota_mb: ", b"quota_mb: -", 1)})
    commit = str(store.git.repo.create_commit(None, _sig(), _sig(), "bad", tree, [store.head]))
    with pytest.raises(StateInvalid) as serial:
        load_commit(store.git, commit, ParseCache(), parallel_min=10**9)
    with pytest.raises(StateInvalid) as parallel:
        load_commit(store.git, commit, ParseCache(), parallel_min=1)
    assert parallel.value.problems == serial.value.problems and bad in serial.value.problems[0]


def _sig() -> Any:
    import pygit2

    return pygit2.Signature("t", "t@example.org", 0, 0)
