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

import logging
import random
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pygit2

from mailstate.compiler.render import domain_dir, render_domain, render_settings
from mailstate.state import files
from mailstate.state.errors import BranchMoved, Forbidden, InvalidInput, StoreError, Unavailable, UpstreamUnavailable
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import ParseCache, load_commit
from mailstate.state.models import Request, parse
from mailstate.state.ops import OPERATIONS, Context, Operation, Outcome, UsageLookup
from mailstate.state.signing import Signer
from mailstate.state.snapshot import Actor, Change, Snapshot
from mailstate.state.sync import Incoming, full_check, validate_incoming, verify_signature
from mailstate.state.upstream import REJECTED_PREFIX, Upstream

log = logging.getLogger("mailstate.store")

Clock = Callable[[], datetime]
StatusSource = Callable[[str], "dict[str, Any] | None"]
GC_EVERY = 500  # writes between background repacks of the loose objects
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PLACEHOLDER = {
    # Shapes that pass model validation, used only by the preflight apply.
    "hash": "{BLF-CRYPT}$2b$04$" + "." * 53,
    "sha256": "0" * 64,
    "sync_key": "",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def clean_request_id(value: str | None) -> str:
    """The caller's request id if it is a safe token, else a fresh one."""
    if value and _REQUEST_ID.fullmatch(value):
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

    # Mailbox usage the nodes reported (state.localdb), handed to the operations; set by open_store.
    usage_source: UsageLookup | None = None

    def __init__(
        self,
        repo_path: Path | str,
        signer: Signer,
        *,
        clock: Clock = utcnow,
        cache_path: Path | None = None,
        status_source: StatusSource | None = None,
        upstream: Upstream | None = None,
        trusted_signers: Path | None = None,
        max_tries: int = 16,
        rng: random.Random | None = None,
        gc_every: int = GC_EVERY,
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
        self.upstream = upstream
        self.trusted_signers = trusted_signers
        self.max_tries = max_tries
        self._rng = rng or random.Random()
        self.upstream_problem: dict[str, Any] | None = None
        self.upstream_error: str | None = None
        self._writes = 0
        self._gc_every = gc_every
        self._gc: subprocess.Popen[bytes] | None = None
        if upstream is not None:
            with self._lock:
                self._sync_locked(joining=True)

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
        if self.upstream is None and self.git.head() != self._snapshot.commit:
            with self._lock:
                self._refresh_locked()
        if not op.write:
            return op.apply(self._context(actor), req, {})
        prepared: dict[str, Any] = {}
        if op.prepare is not None:
            op.apply(self._context(actor), req, _PLACEHOLDER)
            prepared = op.prepare(req, self._snapshot.settings)
        return self._write(op, actor, req, prepared, clean_request_id(request_id))

    def execute_operation(self, op: Operation, actor: Actor, req: Request, prepared: dict[str, Any]) -> Outcome:
        """Run a write operation that is not an API operation (state.upgrade) through the
        same write path: one signed commit, compare-and-swap, pushed upstream in upstream mode."""
        return self._write(op, actor, req, prepared, clean_request_id(None))

    def _context(self, actor: Actor) -> Context:
        return Context(state=self._snapshot, actor=actor, now=self.clock(), node_status=self.node_status, usage=self.usage_source)

    def _write(self, op: Operation, actor: Actor, req: Request, prepared: dict[str, Any], request_id: str) -> Outcome:
        with self._lock:
            tries = self.max_tries
            for attempt in range(tries):
                if self.upstream is None:
                    self._refresh_locked()
                outcome = op.apply(self._context(actor), req, prepared)
                if not outcome.change:
                    outcome.result = {**outcome.result, "commit": None}
                    return outcome
                message = commit_message(op.name, outcome.target, outcome.project, actor, request_id)
                sha, snap = self._make_commit(outcome.change, message)
                try:
                    if self.upstream is None:
                        self.git.move_branch(sha, self._expected_head())
                    elif self._publish(sha):
                        self.git.set_branch(sha)  # upstream is the truth, and sha is its tip now
                    else:
                        # Someone else moved upstream: take their commit (if valid) and re-run
                        # the operation on the new state, which may now answer differently.
                        time.sleep(self._rng.uniform(0, min(0.5, 0.005 * 2**attempt)))
                        self._sync_locked()
                        continue
                except BranchMoved:
                    # Another process on this data dir won the race: re-run on its state.
                    time.sleep(self._rng.uniform(0, min(0.2, 0.002 * 2**attempt)))
                    continue
                self._adopted(sha, snap)
                outcome.result = {**outcome.result, "commit": sha}
                return outcome
        cls = Unavailable if self.upstream is None else UpstreamUnavailable
        raise cls(
            f"The state repo kept moving under other writers; gave up after {tries} tries. Nothing was changed.",
            code="store_busy" if self.upstream is None else "upstream_busy",
        )

    def commit_change(self, change: Change, message: str) -> str:
        """Write `change` as one signed commit on top of HEAD and adopt it (local mode; caller holds the lock)."""
        sha, snap = self._make_commit(change, message)
        self.git.move_branch(sha, self._expected_head())
        self._adopted(sha, snap)
        return sha

    def _make_commit(self, change: Change, message: str) -> tuple[str, Snapshot]:
        """The signed commit object for `change` on top of HEAD (the branch does not move)."""
        snap = self._snapshot
        tree = self.git.build_tree(snap.commit, self.changed_files(snap, change))
        sha = self.git.commit(tree, snap.commit, message, self.signer, self.clock())
        return sha, snap.with_change(sha, change)

    def _expected_head(self) -> str | None:
        """What the branch must point at for our commit to land: our snapshot's commit, or
        the refused commit it is meant to replace."""
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        return refused if refused and self.git.head() == refused else self._snapshot.commit

    def _housekeeping(self) -> None:
        """Every `gc_every` writes, let git pack the loose objects (~11 per write) in the background."""
        self._writes += 1
        if self._gc_every <= 0 or self._writes % self._gc_every or (self._gc is not None and self._gc.poll() is None):
            return
        try:
            # repack -d packs just the loose objects (cheap, incremental); gc --auto then merges
            # packs once there are too many of them.
            self._gc = subprocess.Popen(
                ["sh", "-c", 'git -C "$1" repack -d -q && git -C "$1" gc --auto --quiet', "gc", str(self.git.path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            log.warning("could not start git gc")

    def _adopted(self, sha: str, snap: Snapshot) -> None:
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        if refused and self.upstream is None:
            self._keep_rejected(refused, sha)
        self._snapshot = snap
        self._housekeeping()

    def _keep_rejected(self, refused: str, replacement: str) -> None:
        # The refused commit is replaced; keep it in a ref for the admins to read.
        self.git.repo.references.create(REJECTED_PREFIX + refused, pygit2.Oid(hex=refused), force=True)
        log.warning("refused commit %s is now replaced by %s", refused[:12], replacement[:12])
        self.upstream_problem = None

    # --- upstream mode -------------------------------------------------------------------

    def _publish(self, sha: str) -> bool:
        """Push `sha` upstream; False when upstream moved (the caller re-runs)."""
        assert self.upstream is not None
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        result = self.upstream.push(sha, expect=refused)
        if result.ok and refused:
            self._keep_rejected(refused, sha)
        return result.ok

    def sync(self) -> dict[str, Any] | None:
        """Fetch upstream and adopt its tip if valid; returns the refused commit's report, if any."""
        if self.upstream is None:
            return None
        with self._lock:
            self._sync_locked()
            return self.upstream_problem

    def _sync_locked(self, *, joining: bool = False) -> None:
        assert self.upstream is not None
        try:
            tip = self.upstream.fetch()
            self.upstream_error = None
        except UpstreamUnavailable as exc:
            self.upstream_error = exc.message
            log.error("%s", exc.message)
            return
        local = self.head
        if tip is None:
            # An empty upstream: publish what we have so that others can build on it.
            if not self.upstream.push(local).ok:
                self._sync_locked()
            return
        self._adopt_tip(tip, joining=joining, source="upstream")

    def _refresh_locked(self) -> None:
        tip = self.git.head()
        if tip is not None:
            self._adopt_tip(tip, source="local")

    def _adopt_tip(self, tip: str, *, joining: bool = False, source: str) -> None:
        """Verify and validate `tip`, then serve it; or record it as refused. Lock held."""
        local = self.head
        if tip == local or (self.upstream_problem and self.upstream_problem.get("commit") == tip):
            return
        reason = verify_signature(self.git.path, tip, self.trusted_signers) if self.trusted_signers else None
        fresh = joining and self.git.is_root(local) and not self._snapshot.domains
        if reason is not None:
            incoming = Incoming(commit=tip, problems=[reason])
        elif self.git.is_ancestor(local, tip):
            incoming = validate_incoming(self.git, self._snapshot, tip)
        elif fresh:
            incoming = full_check(self.git, tip, self._cache)  # a new data dir joining an existing fleet
        else:
            incoming = Incoming(commit=tip, problems=[f"commit {tip[:12]} does not descend from {local[:12]} (rollback or rewritten history)"])
        if incoming.ok and incoming.snapshot is not None:
            if source == "upstream":
                self.git.set_branch(tip)
            self._snapshot = incoming.snapshot
            self.upstream_problem = None
            log.info("adopted %s commit %s", source, tip[:12])
            return
        self.upstream_problem = {"commit": tip, "problems": incoming.problems, "source": source}
        log.error("REFUSED %s commit %s: %s", source, tip[:12], "; ".join(incoming.problems))

    def run_sync_loop(self, stop: threading.Event, interval: float) -> None:
        """Poll upstream every `interval` seconds until `stop` is set (run it in a thread)."""
        while not stop.wait(interval):
            try:
                self.sync()
            except Exception:  # the loop must outlive one bad fetch; the error is in health()
                log.exception("upstream sync failed")

    def health(self) -> dict[str, Any]:
        """The store's view for `/v1/health`: head, mode, upstream errors, a refused commit."""
        body: dict[str, Any] = {"status": "ok", "head": self._snapshot.commit, "mode": "local"}
        if self.upstream is not None:
            body["mode"] = "upstream"
            body["upstream"] = {"url": _redact(self.upstream.url), "error": self.upstream_error}
            if self.upstream_error:
                body["status"] = "degraded"
        if self.upstream_problem:
            body["status"] = "degraded"
            body["refused_commit"] = self.upstream_problem
        return body

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
            out.update(render_settings(change.settings))
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


def _redact(url: str) -> str:
    """A URL without any user:password part, for health output and logs."""
    return re.sub(r"//[^/@]*@", "//***@", url)
