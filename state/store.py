"""The store: runs operations against the current state and turns each write into one commit.

    execute(op, actor, request)
      parse request            (InvalidInput on bad input; nothing else happens)
      preflight apply          (cheap: rule errors surface before any bcrypt work)
      prepare                  (bcrypt / key generation, OUTSIDE the write lock)
      ── write lock ──
      apply on current state   → Outcome(change)
      render touched domains   → YAML + rendered/ bytes for those paths only
      build tree, sign commit, compare-and-swap the branch, swap in the new snapshot
      ── unlock ──

A failure anywhere before the branch moves leaves the branch and the in-memory state as they
were. The store takes its signer and its clock as arguments (seams for tests).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from compiler.render import domain_dir, render_domain
from state import files
from state.errors import Forbidden, InvalidInput, StoreError
from state.gitrepo import GitRepo
from state.load import ParseCache, load_commit
from state.models import Request, parse
from state.ops import OPERATIONS, Context, Operation, Outcome
from state.signing import Signer
from state.snapshot import Actor, Change, Snapshot

Clock = Callable[[], datetime]
StatusSource = Callable[[str], "dict[str, Any] | None"]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PLACEHOLDER = {
    # Shapes that pass model validation, used only by the preflight apply.
    "hash": "{BLF-CRYPT}$2b$04$" + "." * 53,
    "sha256": "0" * 64,
    "sync_key": "",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def clean_request_id(value: str | None) -> str:
    """The caller's request id if it is a safe token, else a fresh one."""
    if value and _REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


def _trailer_value(text: str) -> str:
    # A newline in a trailer would let a caller forge further trailers in the audit log.
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200] or "-"


def commit_message(action: str, target: str, project: int | None, actor: Actor, request_id: str) -> str:
    """`<action> <target>` and the audit trailers."""
    subject = f"{action} {target}".strip()
    return (
        f"{_trailer_value(subject)}\n\n"
        f"Action: {action}\n"
        f"Project: {project if project is not None else 'none'}\n"
        f"Actor: {_trailer_value(actor.name)}\n"
        f"Request-Id: {request_id}\n"
    )


class Store:
    """The state repo plus its in-memory snapshot; thread-safe, writes serialised."""

    def __init__(
        self,
        repo_path: Path | str,
        signer: Signer,
        *,
        clock: Clock = utcnow,
        cache_path: Path | None = None,
        status_source: StatusSource | None = None,
    ) -> None:
        self.git = GitRepo(repo_path)
        self.signer = signer
        self.clock = clock
        self._status_source = status_source
        self._lock = threading.Lock()
        head = self.git.head()
        if head is None:
            raise StoreError(f"{repo_path} has no commits; run `mailstate init` first.")
        self._cache = ParseCache.open(cache_path)
        self._snapshot = load_commit(self.git, head, self._cache)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def head(self) -> str:
        assert self._snapshot.commit is not None
        return self._snapshot.commit

    # --- running operations ------------------------------------------------------------

    def execute(self, name: str, actor: Actor, data: Any = None, *, request_id: str | None = None) -> Outcome:
        """Run operation `name`; a write's result carries `"commit"` (None for a no-op)."""
        op = OPERATIONS.get(name)
        if op is None:
            raise InvalidInput(f"Unknown operation {name!r}.", code="unknown_operation")
        req = parse(op.request, data)
        if op.admin and not actor.is_admin:
            raise Forbidden("This operation needs an admin token.", code="admin_required")
        if not op.write:
            return op.apply(self._context(actor), req, {})
        prepared: dict[str, Any] = {}
        if op.prepare is not None:
            op.apply(self._context(actor), req, _PLACEHOLDER)
            prepared = op.prepare(req, self._snapshot.settings)
        return self._write(op, actor, req, prepared, clean_request_id(request_id))

    def _context(self, actor: Actor) -> Context:
        return Context(state=self._snapshot, actor=actor, now=self.clock(), node_status=self.node_status)

    def _write(self, op: Operation, actor: Actor, req: Request, prepared: dict[str, Any], request_id: str) -> Outcome:
        with self._lock:
            outcome = op.apply(self._context(actor), req, prepared)
            if not outcome.change:
                outcome.result = {**outcome.result, "commit": None}
                return outcome
            message = commit_message(op.name, outcome.target, outcome.project, actor, request_id)
            sha = self.commit_change(outcome.change, message)
            outcome.result = {**outcome.result, "commit": sha}
            return outcome

    def commit_change(self, change: Change, message: str) -> str:
        """Write `change` as one signed commit on top of HEAD and adopt it. Caller holds the lock."""
        snap = self._snapshot
        parent = snap.commit
        tree = self.git.build_tree(parent, self.changed_files(snap, change))
        sha = self.git.commit(tree, parent, message, self.signer, self.clock())
        self.git.move_branch(sha, parent)
        self._snapshot = snap.with_change(sha, change)
        return sha

    def changed_files(self, snap: Snapshot, change: Change) -> dict[str, bytes | None]:
        """Repo path → new bytes (None deletes) for exactly the paths `change` touches."""
        settings = change.settings or snap.settings
        out: dict[str, bytes | None] = {}
        for name, dom in change.domains.items():
            path = files.domain_path(name)
            out[domain_dir(name)] = None
            if dom is None:
                out[path] = None
                continue
            out[path] = files.dump_domain(dom, self.git.read(snap.commit, path))
            rendered = render_domain(dom, settings)
            if rendered:
                del out[domain_dir(name)]
                out.update(rendered)
        if change.nodes is not None:
            out[files.NODES_PATH] = files.dump_nodes(change.nodes, self.git.read(snap.commit, files.NODES_PATH))
        if change.settings is not None:
            out[files.SETTINGS_PATH] = files.dump_settings(change.settings)
        return out

    # --- node status ---------------------------------------------------------------------

    def node_status(self, name: str) -> dict[str, Any] | None:
        """A node's last report (from the status source) plus how far behind HEAD it is."""
        if self._status_source is None:
            return None
        status = self._status_source(name)
        if not status:
            return status
        applied = status.get("applied_commit")
        behind = self.git.commits_between(applied, self.head) if applied else None
        return {**status, "commits_behind": behind}
