"""Reading back what a store wrote, and running operations that must fail.

Files and counts are read from the bare repo on disk with a fresh pygit2 repository (never the
store's own objects), in process: these helpers keep the library tests in the quick loop. The
git CLI's view of the same repos is checked by the e2e tests (``git fsck``, ``git verify-commit``).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from mailstate.state.errors import MailstateError
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PROJECT_A, commit_count, read_file


def show(store: Store, path: str) -> str | None:
    """A file at the tip of `main` (None if absent)."""
    return read_file(store.git.path, path)


def domain_yaml(store: Store, domain: str) -> dict[str, Any] | None:
    text = show(store, f"domains/{domain[:2]}/{domain}.yaml")
    return None if text is None else yaml.safe_load(text)


def nodes_yaml(store: Store) -> dict[str, Any]:
    return yaml.safe_load(show(store, "nodes.yaml") or "") or {}


def passwd(store: Store, domain: str) -> str | None:
    return show(store, f"rendered/domains/{domain[:2]}/{domain}/passwd")


def err(store: Store, op: str, actor: Actor, data: Any) -> MailstateError:
    """Run an operation that must fail; return the error (and check nothing was committed)."""
    before = commit_count(store.git.path)
    with pytest.raises(MailstateError) as info:
        store.execute(op, actor, data)
    assert commit_count(store.git.path) == before
    return info.value


def linked(
    store: Store, domain: str = "example.com", project: int | None = PROJECT_A.project_id, enable: bool = True
) -> None:
    """`domain` linked to `project` (admin) and, unless enable=False, its email enabled."""
    store.execute("link-domain", ADMIN, {"domain": domain, "project_id": project})
    if enable:
        store.execute("enable-email", Actor.project(project) if project else ADMIN, {"domain": domain})
