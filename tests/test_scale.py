"""What the scale work (issue 14) changed on the server, checked for correctness (the timings
live in bench/bench_scale.py): loaded models share one fields set without any write leaking
through it, and the bench's fast seed builds exactly the tree the store's own path builds."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.seed import SeedInfo, seed_state
from mailstate.state import files
from mailstate.state.load import ParseCache, load_commit
from mailstate.state.models import Mailbox
from mailstate.state.store import Store
from tests.conftest import ADMIN, PASSWORD, PROJECT_A


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


def test_the_fast_seed_builds_the_same_signed_tree(tmp_path: Path) -> None:
    loose = seed_state(tmp_path / "loose", 600, fast=False)
    fast = seed_state(tmp_path / "fast", 600, fast=True)

    def git(info: SeedInfo, *args: str) -> str:
        repo = info.data_dir.repo
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()

    assert git(loose, "rev-parse", "main^{tree}") == git(fast, "rev-parse", "main^{tree}")
    assert git(fast, "rev-list", "--count", "main") == "2"  # init + the one seed commit
    assert git(fast, "for-each-ref", "refs/bench") == ""  # fast-import's throwaway ref is gone
    verify = subprocess.run(
        ["git", "-C", str(fast.data_dir.repo), "-c", f"gpg.ssh.allowedSignersFile={fast.data_dir.allowed_signers}", "verify-commit", "main"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert files.domain_path(fast.domains[0]) in git(fast, "ls-tree", "-r", "--name-only", "main")
