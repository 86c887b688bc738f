"""The store: runs operations against the current state and turns each write into one commit.

    execute(op, actor, request)
      parse request            (InvalidInput on bad input; nothing else happens)
      preflight apply          (cheap: rule errors surface before any bcrypt work)
      prepare                  (bcrypt / key generation, OUTSIDE the write lock)
      queue the write
      ── write lock (state/fifolock.py: first come first served) ──
      for each write queued by then (a group; ours may have landed in an earlier holder's):
        apply on the state the write before it left   → Outcome(change)
        render touched domains   → YAML + rendered/ bytes for those paths only
        build tree, sign commit  (one commit per write, on top of the one before)
      flush the objects once, compare-and-swap the branch to the last commit once,
      publish the new snapshot, answer every write of the group
      ── unlock ──

A failure anywhere before the branch moves leaves the branch and the in-memory state as they
were. The store takes its signer and its clock as arguments (seams for tests).

Reads never wait for a writer: a snapshot is immutable and published whole, so a read runs on
the newest one (`current`). A commit another process made is adopted by a writer (which
refreshes first), by the background watcher, or by a reader that finds the lock free.

The accepted-head statement (state/statement.py, `refs/mailstate/accepted`; written and pushed
by state/publisher.py) names the last
commit this store validated: it moves after every write the store makes and after it adopts a
commit made elsewhere, never for a refused one, and only forward (a statement whose head is not
an ancestor of ours is left alone when a server signed it). In local mode a restarted store
starts from the statement's head and validates `main` against it, so a commit pushed while no
server ran is checked like any other. `run_background` refreshes the statement on a schedule,
pushes it upstream (upstream mode) and, in local mode, notices within a second that `main`
moved without waiting for a request.
Upstream mode's fetch and push are state/upstream_sync.py's; the adopt rule stays here.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import random
import re
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pygit2

from mailstate.compiler.render import (
    FRAGMENTS,
    domain_dir,
    render_domain,
    render_moves,
    render_nodes,
    render_replicas,
    render_settings,
)
from mailstate.state import files, senders
from mailstate.state import limits as lim
from mailstate.state.chain import range_problems, server_signed
from mailstate.state.errors import (
    BranchMoved,
    Forbidden,
    InvalidInput,
    StoreError,
    Unavailable,
    UpstreamUnavailable,
)
from mailstate.state.fifolock import FifoLock
from mailstate.state.gitrepo import GitRepo, bound_object_cache
from mailstate.state.load import ParseCache, load_commit
from mailstate.state.models import Request, parse
from mailstate.state.ops import (
    OPERATIONS,
    AppUseLookup,
    Context,
    DkimLookup,
    DnsCheck,
    DnsStatusLookup,
    Operation,
    SendingLookup,
    UsageLookup,
    WebhookRegistry,
)
from mailstate.state.publisher import StatementPublisher, is_commit
from mailstate.state.sending import SENDING_FRAGMENT
from mailstate.state.signing import Signer
from mailstate.state.snapshot import Actor, Change, Outcome, Snapshot
from mailstate.state.statement import create_statement
from mailstate.state.sync import Incoming, change_problems, full_check, validate_incoming
from mailstate.state.upstream import REJECTED_PREFIX, Upstream
from mailstate.state.upstream_sync import UpstreamSync

log = logging.getLogger("mailstate.store")

Clock = Callable[[], datetime]
StatusSource = Callable[[str], "dict[str, Any] | None"]
# Object flushes (a pack each) between background roll-ups of the small packs: a server's
# (run_background) rolls up often, its packs come fast; a library user's, e.g. `mailstate call`
# or a test, seldom.
GC_EVERY = 32
GC_EVERY_LIBRARY = 500
# The most queued writes one holder of the writers' lock lands as one group (one flush, one
# branch move): enough for every writer a server has in flight, few enough that the first
# of them is not kept waiting long for the rest.
GROUP_MAX = 32
STATEMENT_INTERVAL = 60.0  # seconds between statement refreshes (freshness for the nodes)
WATCH_INTERVAL = 1.0  # seconds between looks at main (local mode background thread)
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


_ANSWER_TRAILERS = re.compile(r"^Action: \S.*\nProject: \S+\nActor: .+\nRequest-Id: [A-Za-z0-9._-]{1,64}$", re.M)


def is_answer(message: str) -> bool:
    """True for a commit message commit_message wrote: the trailers of a write a store answered."""
    return _ANSWER_TRAILERS.search(message) is not None


@dataclass(frozen=True)
class Committed:
    """A write this store committed: what the commit listeners (state.events) are told."""

    commit: str
    operation: str
    actor: Actor
    project: int | None
    before: Snapshot
    after: Snapshot
    change: Change


@dataclass(eq=False)
class _Job:
    """One queued write: what the writer asked for, then (done) its outcome or its error."""

    op: Operation
    actor: Actor
    req: Request
    prepared: dict[str, Any]
    request_id: str
    done: bool = False
    outcome: Outcome | None = None
    error: Exception | None = None


@dataclass
class _Group:
    """The commits a group of queued writes made, oldest first, each on top of the one before."""

    base: Snapshot
    commits: list[Committed] = field(default_factory=list)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    return trim


def release_free_heap() -> bool:
    """Give the free pages of the C heap back to the kernel (glibc's malloc_trim); False where
    the C library has none.

    Writes run in many threads, and glibc keeps what a thread's arena freed for that arena: a
    server's anonymous memory crept up with its writes though Python's own objects did not
    (tracemalloc, bench/bench_soak.py), until the trim gave the free pages back."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
HEAP_ARENAS = 2


def limit_heap_arenas(arenas: int = HEAP_ARENAS) -> bool:
    """Let glibc's malloc keep at most ``arenas`` arenas (it makes up to 8 a core, one per thread
    that allocates at the same time as another); False where the C library cannot. Call before
    the threads start: an arena, once made, stays.

    A server's writes run in up to 40 worker threads, and each arena keeps the pages its threads
    freed: over 100k writes the anonymous memory grew 1.29x with the default, 1.18x with two
    (bench/bench_soak.py), at no cost in writes/s; Python holds the GIL around most allocations
    anyway."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return False
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1


class Store:
    """The state repo plus its in-memory snapshot; thread-safe, writes serialised."""

    # Mailbox usage the nodes reported (state.localdb), handed to the operations; set by open_store.
    usage_source: UsageLookup | None = None
    # The nodes' DKIM public keys (state.localdb), for dns-records; set by open_store.
    dkim_source: DkimLookup | None = None
    # When the nodes last saw each app password log in (state.localdb), for list-app-passwords.
    app_use_source: AppUseLookup | None = None
    # check-dns's lookups (state.dnscheck) and the kept verdicts (state.localdb); set by open_store.
    dns_check_source: DnsCheck | None = None
    dns_status_source: DnsStatusLookup | None = None
    # The nodes' sending figures (state.localdb) and the webhooks (state.webhooks); set by open_store.
    sending_source: SendingLookup | None = None
    webhooks: WebhookRegistry | None = None

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
        gc_every: int | None = None,
        on_write_lock: Callable[[], None] | None = None,
    ) -> None:
        bound_object_cache()  # a long-running store's memory stays flat (state.gitrepo)
        self.git = GitRepo(repo_path)
        self.signer = signer
        self.clock = clock
        self._status_source = status_source
        # The writers' lock, granted first come first served; reads never wait for it.
        self._lock = FifoLock()
        # Called by each write as soon as it holds the lock (a seam: tests act while a writer holds it).
        self._on_write_lock = on_write_lock
        # The writes waiting to land, oldest first (appended before the lock is asked for).
        self._queued: deque[_Job] = deque()
        # How many groups of writes moved the branch (each one flush and one ref update).
        self.landed_groups = 0
        head = self.git.head()
        if head is None:
            raise StoreError(f"{repo_path} has no commits; run `mailstate init` first.")
        self._cache = ParseCache.open(cache_path)
        self.upstream = upstream
        self.trusted_signers = trusted_signers
        # Called after each write this store commits (add_commit_listener): state.events.
        self._commit_listeners: list[Callable[[Committed], None]] = []
        # The accepted-head statement: it states our head while the snapshot is validated.
        self.statements = StatementPublisher(
            self.git,
            signer,
            clock,
            self._lock,
            lambda: self.head if self._validated else None,
            upstream=upstream,
            trusted_signers=trusted_signers,
        )
        self.upstream_sync = self._upstream_sync(upstream)
        self._statement_replace = False
        # Set while run_background runs: writes then leave the statement to that thread.
        self._background = False
        self._wake = threading.Event()
        self.max_tries = max_tries
        self._rng = rng or random.Random()
        self.upstream_problem: dict[str, Any] | None = None
        # True while the snapshot is a commit validated the way an incoming commit is (or
        # stated by a server, which did): only then is it stated, and only then written on.
        self._validated = False
        stated = self.statements.verified()
        if stated is not None and is_commit(self.git, stated[1]):
            # What was last accepted; main is validated against it below.
            self._snapshot = load_commit(self.git, stated[1], self._cache)
            self._validated = True
        else:
            self._snapshot = self._first_check(head)
        self._flushes_at_gc = 0
        self.heap_releases = 0  # times _housekeeping gave the C heap's free pages back
        self._gc_every = gc_every
        self._gc: subprocess.Popen[bytes] | None = None
        with self._lock:
            if self.upstream_sync is not None:
                self.upstream_sync.sync_locked(joining=True)
            elif self.head != head:
                self._refresh_locked()
            self.statements.publish_locked()
            self.statements.push_locked()

    def _upstream_sync(self, upstream: Upstream | None) -> UpstreamSync | None:
        """Upstream mode: fetch and adopt upstream's tip, push each write (state.upstream_sync)."""
        if upstream is None:
            return None
        return UpstreamSync(
            upstream,
            self._lock,
            self.statements,
            head=lambda: self.head,
            adopt=lambda tip, joining: self._adopt_tip(tip, joining=joining, source="upstream"),
            trusted_signers=self.trusted_signers,
        )

    def _first_check(self, head: str) -> Snapshot:
        """No statement to start from (a new data dir, or its statement is gone or not a server's):
        check main in full, as a data dir joining a fleet checks upstream's tip, before it is
        stated. A main that fails is refused (health shows it), read, and written on only by a
        write whose whole commit validates (_whole_check)."""
        reason = None
        if self.trusted_signers is not None and not self._signed_by_us(head):
            reason = "; ".join(range_problems(self.git.path, None, head, self.trusted_signers)) or None
        incoming = Incoming(commit=head, problems=[reason]) if reason else full_check(self.git, head, self._cache)
        if incoming.ok and incoming.snapshot is not None:
            self._validated = True
            return incoming.snapshot
        self.upstream_problem = {"commit": head, "problems": incoming.problems, "source": "local"}
        log.warning(
            "main %s is not stated: there is no accepted-head statement to start from and it does not validate "
            "(a write, e.g. an upgrade's re-render, states it once the whole commit validates): %s",
            head[:12],
            "; ".join(incoming.problems),
        )
        return load_commit(self.git, head, self._cache)

    def _signed_by_us(self, sha: str) -> bool:
        """True when `sha` carries the signature this store's own key makes of it. Ed25519 signs
        deterministically, so signing the commit's payload again tells it in process, without
        ssh-keygen (a new data dir's first commit, which `mailstate init` signed with this key)."""
        try:
            signature, payload = self.git.repo[sha].peel(pygit2.Commit).gpg_signature
            return signature is not None and self.signer.sign(payload).strip() == signature.decode().strip()
        except (StoreError, KeyError, ValueError, UnicodeDecodeError, pygit2.GitError):
            return False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def write_lock(self) -> FifoLock:
        """The writers' lock: its `waiting` is the writers queued right now (/metrics)."""
        return self._lock

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
        snap = self.current()
        if not op.write:
            return op.apply(self._context(actor, snap), req, {})
        prepared: dict[str, Any] = {}
        if op.prepare is not None:
            self._apply(op, self._context(actor), req, _PLACEHOLDER)  # the rules (limits too) before bcrypt
            prepared = op.prepare(req, self._snapshot.settings)
        return self._write(op, actor, req, prepared, clean_request_id(request_id))

    def current(self) -> Snapshot:
        """The newest published snapshot, never waiting for a writer.

        Snapshots are immutable and swapped in whole, so a reader needs no lock to use one. Local
        mode: when main moved under us (another process wrote) and the writers' lock is free with
        nobody queued, this thread adopts (or refuses) the new commit first; otherwise the caller
        keeps the current snapshot: the writer holding the lock refreshes before it writes, and
        the background watcher looks at main every second."""
        if self.upstream is None and self.git.head() != self._snapshot.commit and self._lock.try_acquire():
            try:
                self._refresh_locked()
            finally:
                self._lock.release()
        return self._snapshot

    def execute_operation(self, op: Operation, actor: Actor, req: Request, prepared: dict[str, Any]) -> Outcome:
        """Run a write operation that is not an API operation (state.upgrade) through the
        same write path: one signed commit, compare-and-swap, pushed upstream in upstream mode."""
        return self._write(op, actor, req, prepared, clean_request_id(None))

    def _context(self, actor: Actor, snap: Snapshot | None = None) -> Context:
        return Context(
            state=snap or self._snapshot,
            actor=actor,
            now=self.clock(),
            node_status=self.node_status,
            usage=self.usage_source,
            dkim_keys=self.dkim_source,
            app_uses=self.app_use_source,
            dns_check=self.dns_check_source,
            dns_status=self.dns_status_source,
            sending=self.sending_source,
            webhooks=self.webhooks,
        )

    def _apply(self, op: Operation, ctx: Context, req: Request, prepared: dict[str, Any]) -> Outcome:
        """The operation, then the plan limits on what it changes (state.limits: one rule for every
        write; 409 limit_reached or limit_below_use, and nothing is committed)."""
        outcome = op.apply(ctx, req, prepared)
        if outcome.change:
            snap = ctx.state
            lim.enforce(
                lim.State(snap.domains, snap.by_project, snap.projects),
                outcome.change.domains,
                outcome.change.projects,
            )
        return outcome

    def _write(self, op: Operation, actor: Actor, req: Request, prepared: dict[str, Any], request_id: str) -> Outcome:
        """Queue the write, then wait for the writers' lock. Whoever holds the lock lands every
        write queued by then (a group commit, _land_group): each its own validated, signed
        commit on top of the one before, the branch moved and fsynced once for them all, and
        none answered before that. A write found already landed when the lock comes just returns."""
        job = _Job(op, actor, req, prepared, request_id)
        self._queued.append(job)
        with self._lock:
            while not job.done:
                if self._on_write_lock is not None:
                    self._on_write_lock()
                self._run_group(self._take_group())
        if job.error is not None:
            raise job.error
        assert job.outcome is not None
        return job.outcome

    def _take_group(self) -> list[_Job]:
        """The oldest queued writes, in order: up to GROUP_MAX in local mode on a validated
        snapshot; one at a time upstream (each push is its own compare-and-swap) or while main
        is not validated (each write's whole commit is checked)."""
        limit = GROUP_MAX if self.upstream is None and self._validated else 1
        group: list[_Job] = []
        while self._queued and len(group) < limit:
            group.append(self._queued.popleft())
        return group

    def _run_group(self, group: list[_Job]) -> None:
        """Land `group` (lock held); every job ends done, with its outcome or its error."""
        try:
            for attempt in range(self.max_tries):
                if self.upstream is None:
                    self._refresh_locked()
                made = self._make_group(group)
                if not made.commits:
                    return
                if self._land_group(made, attempt):
                    return
            cls = Unavailable if self.upstream is None else UpstreamUnavailable
            raise cls(
                f"The state repo kept moving under other writers; gave up after {self.max_tries} tries. "
                "Nothing was changed.",
                code="store_busy" if self.upstream is None else "upstream_busy",
            )
        except Exception as exc:  # the group did not land: every write in it fails alike
            for job in group:
                job.outcome, job.error = None, exc
        finally:
            for job in group:
                job.done = True

    def _make_group(self, group: list[_Job]) -> _Group:
        """Each job's operation on the state the jobs before it left, each change that passes
        the rules one signed commit on top of the last (nothing moves yet). A job whose
        operation fails keeps its error and changes nothing; a no-op keeps `commit: None`."""
        made = _Group(base=self._snapshot)
        tip = self._snapshot
        for job in group:
            job.outcome, job.error = None, None
            try:
                outcome = self._apply(job.op, self._context(job.actor, tip), job.req, job.prepared)
                if not outcome.change:
                    outcome.result = {**outcome.result, "commit": None}
                    job.outcome = outcome
                    continue
                after = self._after(outcome.change, tip)
                message = commit_message(job.op.name, outcome.target, outcome.project, job.actor, job.request_id)
                sha, snap = self._make_commit(outcome.change, message, after, tip)
                self._whole_check(sha)
            except Exception as exc:  # this write's own failure; the others go on
                job.error = exc
                continue
            outcome.result = {**outcome.result, "commit": sha}
            job.outcome = outcome
            made.commits.append(Committed(sha, job.op.name, job.actor, outcome.project, tip, snap, outcome.change))
            tip = snap
        return made

    def _land_group(self, made: _Group, attempt: int) -> bool:
        """Move the branch to the group's last commit and adopt it; False when another writer
        moved the branch first (the caller runs the group again on the new state)."""
        last = made.commits[-1]
        stated = self._prepare_statement(last.commit)
        self.git.flush_objects(extra=[stated[0]] if stated else [])  # ONE flush for the group
        try:
            if self.upstream is None:
                self.git.move_branch(last.commit, self._expected_head())
            elif self._publish(last.commit, stated):
                self.git.set_branch(last.commit)  # upstream is the truth, and this is its tip now
            else:
                # Someone else moved upstream: take their commit (if valid) and re-run
                # the operation on the new state, which may now answer differently.
                time.sleep(self._rng.uniform(0, min(0.5, 0.005 * 2**attempt)))
                assert self.upstream_sync is not None
                self.upstream_sync.sync_locked()
                return False
        except BranchMoved:
            # Another process on this data dir won the race: re-run on its state.
            time.sleep(self._rng.uniform(0, min(0.2, 0.002 * 2**attempt)))
            return False
        self.landed_groups += 1
        # The listeners first: a listener that reads the head later then finds these writes
        # queued already (state/events.py relies on it).
        for committed in made.commits:
            self._committed(committed)
        self._adopted(last.commit, last.after, stated)
        return True

    def add_commit_listener(self, listener: Callable[[Committed], None]) -> None:
        """Call `listener(committed)` after each write this store commits, in the writer's thread
        with the write lock held: it must only hand the work over (state.events queues it)."""
        self._commit_listeners.append(listener)

    def _committed(self, committed: Committed) -> None:
        for listener in list(self._commit_listeners):
            try:
                listener(committed)
            except Exception:  # a listener must never fail a write that has landed
                log.exception("commit listener failed")

    def commit_change(self, change: Change, message: str) -> str:
        """Write `change` as one signed commit on top of HEAD and adopt it (local mode; caller holds the lock)."""
        sha, snap = self._make_commit(change, message, self._after(change, self._snapshot), self._snapshot)
        self._whole_check(sha)
        stated = self._prepare_statement(sha)
        self.git.flush_objects(extra=[stated[0]] if stated else [])
        self.git.move_branch(sha, self._expected_head())
        self._adopted(sha, snap, stated)
        return sha

    def _after(self, change: Change, base: Snapshot) -> Snapshot:
        """The state after `change` on `base` (its commit still unset), once it passed the rules an incoming
        commit with the same change must pass across domains (state.sync.change_problems); the
        first one it breaks is raised (409). On a validated snapshot that makes the commit valid
        exactly when a server would accept it from elsewhere; on one nobody validated, the commit
        is checked in full before it lands (_whole_check)."""
        self._writable()
        after = base.with_change("", change)
        found = change_problems(base, after, change)
        if found:
            raise found[0].error()
        return after

    def _whole_check(self, sha: str) -> None:
        """A write on a snapshot nobody validated (main had no server's statement and did not
        validate, e.g. rendered by an older mailstate) lands only when the whole commit it makes
        validates, as a data dir joining a fleet checks a tip: an upgrade's re-render passes,
        a write that leaves main's problems in place does not (503 state_needs_repair)."""
        if self._validated:
            return
        self.git.flush_objects()  # the check may read the commit in other processes (state.load)
        problems = full_check(self.git, sha, self._cache).problems
        if problems:
            raise Unavailable(
                f"The state repo's main does not validate ({problems[0]}) and no accepted commit is known to "
                "build on (see /v1/health); nothing was changed. An admin must repair main first.",
                code="state_needs_repair",
            )

    def _writable(self) -> None:
        """Refuse to write (503 state_needs_repair, nothing changed) while writing would move the
        branch back past writes that were answered."""
        if self.upstream_problem and self.upstream_problem.get("answered"):
            raise Unavailable(
                "The state repo's main holds answered writes on top of a commit this server refuses "
                "(see /v1/health); they are kept, so nothing can be written until an admin repairs main "
                "with a commit on top of it that validates. Nothing was changed.",
                code="state_needs_repair",
            )

    def _make_commit(self, change: Change, message: str, after: Snapshot, base: Snapshot) -> tuple[str, Snapshot]:
        """The signed commit object for `change` on top of `base` (the branch does not move; its
        objects are flushed with the rest of the group's). `after` is _after(change, base)."""
        tree = self.git.build_tree(base.commit, self.changed_files(base, change))
        when = self.clock()
        if base.commit is not None:
            # Never dated before the parent (a server whose clock is behind an admin's): nodes and
            # other servers refuse committer times that go backwards (state/chain.py).
            parent_time = self.git.repo[base.commit].peel(pygit2.Commit).commit_time
            if when.timestamp() < parent_time:
                when = datetime.fromtimestamp(parent_time, UTC)
        sha = self.git.commit(tree, base.commit, message, self.signer, when, flush=False)
        return sha, after.at(sha)

    def _prepare_statement(self, sha: str) -> tuple[str, int] | None:
        """The statement tag naming commit `sha`, issued at its commit time: (tag id, issued_at).
        It goes to disk in the same flush as the commit, so it costs no flush of its own; if the
        commit does not land, the tag is an unreferenced object that gc drops."""
        issued = int(self.git.repo[sha].peel(pygit2.Commit).commit_time)
        try:
            return create_statement(self.git.repo, self.signer, sha, issued, write=self.git.write_object), issued
        except StoreError as exc:  # never fails the write: publish_locked tries again after it
            log.warning("accepted-head statement for %s not prepared: %s", sha[:12], exc.message)
            return None

    def _expected_head(self) -> str | None:
        """What the branch must point at for our commit to land: our snapshot's commit, or
        the refused commit it is meant to replace."""
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        return refused if refused and self.git.head() == refused else self._snapshot.commit

    def _housekeeping(self) -> None:
        """Every `gc_every` flushes (a pack each: one per group of writes), roll the small packs
        up in the background: `git repack --geometric=2` merges packs until each is at least
        twice the next smaller one, so there are few packs to look through and the big ones
        are left as they are. The C heap's free pages go back to the kernel at the same pace."""
        flushes = self.git.flushes
        every = self._gc_every if self._gc_every is not None else GC_EVERY if self._background else GC_EVERY_LIBRARY
        if every <= 0 or flushes - self._flushes_at_gc < every or (self._gc is not None and self._gc.poll() is None):
            return
        self._flushes_at_gc = flushes
        if release_free_heap():
            self.heap_releases += 1
        try:
            # gc --auto then packs what others left loose, once there is much of it.
            self._gc = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'git -C "$1" repack -d -q --geometric=2 && git -C "$1" gc --auto --quiet',
                    "gc",
                    str(self.git.path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            log.warning("could not start git gc")

    def _adopted(self, sha: str, snap: Snapshot, stated: tuple[str, int] | None = None) -> None:
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        if refused and self.upstream is None and self._validated:
            self._keep_rejected(refused, sha)
        elif not self._validated:
            self.upstream_problem = None  # the write built on main, and the whole commit validated
        self._validated = True
        self._snapshot = snap
        # The write has landed; a statement that fails from here on is logged and retried on
        # the schedule, never turned into a failed write.
        self.statements.publish_locked(prepared=stated)  # one ref update: the tag is on disk already
        if not self._background:
            self.statements.push_locked()
        elif self.statements.push_due or self.statements.error:
            # The upstream push (a `git push`), or another try at a statement that failed, stays
            # off the write path. Otherwise the background thread is left asleep: waking it
            # would only make it queue for the writers' lock to find nothing to do.
            self._wake.set()
        self._housekeeping()

    def _keep_rejected(self, refused: str, replacement: str) -> None:
        # The refused commit is replaced; keep it in a ref for the admins to read.
        self.git.repo.references.create(REJECTED_PREFIX + refused, pygit2.Oid(hex=refused), force=True)
        log.warning("refused commit %s is now replaced by %s", refused[:12], replacement[:12])
        self.upstream_problem = None

    # --- upstream mode -------------------------------------------------------------------

    @property
    def upstream_error(self) -> str | None:
        """Upstream mode: why the last fetch failed (None when it worked)."""
        return self.upstream_sync.error if self.upstream_sync is not None else None

    def _publish(self, sha: str, stated: tuple[str, int] | None = None) -> bool:
        """Push `sha` upstream, with its statement; False when upstream moved (the caller re-runs)."""
        assert self.upstream_sync is not None
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        ok = self.upstream_sync.push_locked(sha, stated, refused)
        if ok and refused:
            self._keep_rejected(refused, sha)
        return ok

    def sync(self) -> dict[str, Any] | None:
        """Fetch upstream and adopt its tip if valid; returns the refused commit's report, if any."""
        if self.upstream_sync is None:
            return None
        self.upstream_sync.sync()
        return self.upstream_problem

    def _refresh_locked(self) -> None:
        tip = self.git.head()
        if tip is None:
            return
        if (
            tip == self.head
            and self._validated
            and self.upstream_problem
            and self.upstream_problem.get("source") == "local"
        ):
            self.upstream_problem = None  # someone put main back on the accepted commit
            return
        self._adopt_tip(tip, source="local")

    def _adopt_tip(self, tip: str, *, joining: bool = False, source: str) -> None:
        """Verify and validate `tip`, then serve it; or record it as refused. Lock held."""
        local = self.head
        if (tip == local and self._validated) or (self.upstream_problem and self.upstream_problem.get("commit") == tip):
            return
        fresh = joining and self.git.is_root(local) and not self._snapshot.domains
        reason = None
        if self.trusted_signers:
            # Every commit of local..tip, not only the tip (state/chain.py); a fresh data dir
            # joining a fleet, or a tip that does not descend, checks the tip alone.
            base = local if self.git.is_ancestor(local, tip) else None
            reason = "; ".join(range_problems(self.git.path, base, tip, self.trusted_signers)) or None
            if (
                reason
                and source == "upstream"
                and "not signed by a trusted key" in reason
                and self.upstream_sync is not None
                and self.upstream_sync.follow_key_rotation()
            ):
                reason = "; ".join(range_problems(self.git.path, base, tip, self.trusted_signers)) or None
        if reason is not None:
            incoming = Incoming(commit=tip, problems=[reason])
        elif not self._validated:
            incoming = full_check(self.git, tip, self._cache)  # nothing validated to check it against
        elif self.git.is_ancestor(local, tip):
            incoming = validate_incoming(self.git, self._snapshot, tip)
        elif fresh:
            incoming = full_check(self.git, tip, self._cache)  # a new data dir joining an existing fleet
        else:
            incoming = Incoming(
                commit=tip,
                problems=[f"commit {tip[:12]} does not descend from {local[:12]} (rollback or rewritten history)"],
            )
        if incoming.ok and incoming.snapshot is not None:
            if source == "upstream":
                self.git.set_branch(tip)
            self._snapshot = incoming.snapshot
            self._validated = True
            self.upstream_problem = None
            log.info("adopted %s commit %s", source, tip[:12])
            # A fresh data dir joining a fleet replaces its own root commit, which a statement
            # written before it joined may name: that one is no ancestor, and must go.
            self._statement_after_change(replace=fresh)
            return
        problem: dict[str, Any] = {"commit": tip, "problems": incoming.problems, "source": source}
        answered = self._answered(tip)
        if answered:
            # Replacing `tip` would move the branch back past writes that were answered: they
            # stay, and writes wait for an admin's repair (_writable).
            problem["answered"] = answered
        self.upstream_problem = problem  # whole, at once: health() reads it without the lock
        log.error("REFUSED %s commit %s: %s", source, tip[:12], "; ".join(incoming.problems))

    def _answered(self, tip: str) -> list[str]:
        """The writes a server answered (signed by a server key, with a store's audit trailers) that
        replacing `tip` with a commit on our head would drop: reachable from `tip`, not from our head."""
        if self.trusted_signers is None or not self._validated:
            return []
        try:
            return server_signed(self.git.path, self.head, tip, self.trusted_signers, is_answer)
        except (StoreError, pygit2.GitError, KeyError, ValueError) as exc:
            # Unknown is answered: never drop what might have been.
            log.error("could not tell whether %s holds answered writes: %s", tip[:12], exc)
            return [tip]

    def run_sync_loop(self, stop: threading.Event, interval: float) -> None:
        """Poll upstream every `interval` seconds until `stop` is set (run it in a thread)."""
        self.run_background(stop, sync_interval=interval)

    def run_background(
        self,
        stop: threading.Event,
        *,
        statement_interval: float = STATEMENT_INTERVAL,
        sync_interval: float = 30.0,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        """The server's background duties until `stop` is set (run it in one thread).

        Local mode: every `watch_interval` seconds, look whether main moved (another process,
        an admin push) and adopt or refuse it, so a refused commit shows in health() and a good
        one gets a statement without waiting for a request. Upstream mode: fetch every
        `sync_interval` seconds and retry a statement push that failed. Both: refresh the
        statement every `statement_interval` seconds even when nothing changed.
        """
        now = time.monotonic()
        next_sync, next_statement = now + sync_interval, now + statement_interval
        # Never wait longer than a second, so that `stop` is seen promptly.
        tick = min(watch_interval if self.upstream is None else sync_interval, statement_interval, 1.0)
        self._background = True
        try:
            while not stop.is_set():
                woke = self._wake.wait(tick)
                if stop.is_set():
                    break
                now = time.monotonic()
                sync = self.upstream is not None and now >= next_sync
                refresh = now >= next_statement
                if sync:
                    next_sync = now + sync_interval
                if refresh:
                    next_statement = now + statement_interval
                self._background_round(woke=woke, sync=sync, refresh=refresh)
        finally:
            self._background = False

    def _background_round(self, *, woke: bool, sync: bool, refresh: bool) -> None:
        """One round of run_background; a failure is logged (health() shows its effect)."""
        try:
            if woke:
                # A write or an adoption asked for a statement: write (and push) it now.
                self._wake.clear()
                with self._lock:
                    replace, self._statement_replace = self._statement_replace, False
                    self.statements.publish_locked(replace=replace)
                    self.statements.push_locked()
            if self.upstream is None:
                self.watch()
            elif sync:
                self.sync()
                if self.statements.push_due:
                    with self._lock:
                        self.statements.push_locked()
            if refresh:
                self.refresh_statement()
        except Exception:  # the loop must outlive one bad round
            log.exception("background round failed")

    def watch(self) -> bool:
        """Local mode: adopt or refuse a main that moved under the store; True when it looked closer.

        Costs one ref read when nothing moved."""
        if self.upstream is not None:
            return False
        tip = self.git.head()
        refused = self.upstream_problem.get("commit") if self.upstream_problem else None
        if tip is None or (tip == self._snapshot.commit and not refused) or tip == refused:
            return False
        with self._lock:
            self._refresh_locked()
        return True

    # --- the accepted-head statement (state.publisher) -------------------------------------

    @property
    def statement_error(self) -> str | None:
        return self.statements.error

    def add_statement_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(head)` each time the stated head changes (after REF moved).

        It runs in the thread that moved the statement (a write's, or the background thread),
        often with the write lock held: it must be quick and must not block, e.g. hand over to
        an event loop with `loop.call_soon_threadsafe` (api/nodes_http.py's long-poll does)."""
        self.statements.add_listener(listener)

    def remove_statement_listener(self, listener: Callable[[str], None]) -> None:
        """Undo add_statement_listener (a no-op when it is not registered)."""
        self.statements.remove_listener(listener)

    @property
    def statement(self) -> dict[str, Any] | None:
        """The statement this store last wrote or verified: {"tag", "head", "issued_at"}."""
        stated = self.statements.stated
        if stated is None:
            return None
        tag, head, issued = stated
        return {"tag": tag, "head": head, "issued_at": issued}

    def refresh_statement(self) -> bool:
        """Re-sign the statement of the accepted head now (freshness), and push it upstream."""
        return self.statements.refresh()

    def _statement_after_change(self, *, replace: bool = False) -> None:
        """The accepted head moved (lock held): state it. A server's background thread does it
        right away off the write path; without one (`mailstate call`, a library user) it is
        done here. A write has landed by now, so a statement that fails is logged and retried
        on the schedule, never turned into a failed write."""
        if self._background:
            self._statement_replace = self._statement_replace or replace
            self._wake.set()
            return
        self.statements.publish_locked(replace=replace)
        self.statements.push_locked()

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
        stated = self.statement
        body["statement"] = {
            "head": stated["head"] if stated else None,
            "issued_at": stated["issued_at"] if stated else None,
            "error": self.statement_error,
        }
        if self.statement_error:
            body["status"] = "degraded"
        return body

    def changed_files(self, snap: Snapshot, change: Change) -> dict[str, bytes | None]:
        """Repo path → new bytes (None deletes) for exactly the paths `change` touches."""
        settings = change.settings or snap.settings
        nodes = change.nodes or snap.nodes
        out: dict[str, bytes | None] = {}
        if change.nodes is not None:
            change = _with_readdressed(snap, change)
        # An alias domain's sender lines live in its target's sender_login_maps (state.senders):
        # the targets of every changed alias domain (before and after) get that fragment anew.
        targets = {
            d.alias_of
            for n, new in change.domains.items()
            for d in (snap.domains.get(n), new)
            if d is not None and d.alias_of
        }
        # Each rendered domain's alias domains after the change (the snapshot's index: no scan).
        names = {n for n, d in change.domains.items() if d is not None} | targets
        after = [snap.domains[u] for n in names for u in snap.alias_users.get(n, ()) if u not in change.domains]
        after += [d for d in change.domains.values() if d is not None and d.alias_of in names]
        users = senders.alias_index(after)
        projects = {**snap.projects, **change.projects}
        for name, dom in change.domains.items():
            path = files.domain_path(name)
            out[domain_dir(name)] = None
            if dom is None:
                out[path] = None
                continue
            out[path] = files.dump_domain(dom, self.git.read(snap.commit, path))
            project = projects.get(dom.project_id) if dom.project_id is not None else None
            rendered = render_domain(dom, settings, users.get(name, ()), project, nodes)
            if rendered:
                del out[domain_dir(name)]
                # A fragment the domain no longer has (virtual_alias_maps without aliases) goes.
                out.update({f"{domain_dir(name)}/{frag}": None for frag in FRAGMENTS})
                out.update(rendered)
        for name in sorted(targets - set(change.domains)):
            target = snap.domains.get(name)
            if target is not None and target.email_enabled:
                sender_path = f"{domain_dir(name)}/{senders.SENDER_FRAGMENT}"
                out[sender_path] = render_domain(target, settings, users.get(name, ()), nodes=nodes).get(sender_path)
        for project_id, project_file in change.projects.items():
            ppath = files.project_path(project_id)
            out[ppath] = (
                None if project_file is None else files.dump_project(project_file, self.git.read(snap.commit, ppath))
            )
            # The project's send limits are in each of its domains' sending fragment (state.sending).
            for name in sorted(snap.by_project.get(project_id, ())):
                target = snap.domains.get(name)
                if name in change.domains or target is None or not target.email_enabled:
                    continue
                sending_path = f"{domain_dir(name)}/{SENDING_FRAGMENT}"
                out[sending_path] = render_domain(target, settings, users.get(name, ()), project_file, nodes).get(
                    sending_path
                )
        if change.nodes is not None:
            out[files.NODES_PATH] = files.dump_nodes(change.nodes, self.git.read(snap.commit, files.NODES_PATH))
            out.update(render_nodes(change.nodes))
        moves = moves_after(snap.moves, change)
        if moves != snap.moves:
            out.update(render_moves(moves))
        replicas = replicas_after(snap.replicas, change)
        if replicas != snap.replicas:
            out.update(render_replicas(replicas))
        if change.settings is not None:
            out[files.SETTINGS_PATH] = files.dump_settings(change.settings)
            out.update(render_settings(change.settings))
        return out

    # --- node status ---------------------------------------------------------------------

    def node_status(self, name: str) -> dict[str, Any] | None:
        """A node's last report (from the status source) plus where it stands against the accepted head.

        `diverged` is true when the node's applied commit is not an ancestor of the accepted
        head (a commit the server never accepted, or one it replaced, or unknown here); then
        `commits_behind` is None, since "behind" would hide that the histories split.
        Otherwise `diverged` is false and `commits_behind` counts the commits the node lacks,
        and `behind_since` is the commit time (unix seconds) of the oldest of them (None when
        it lacks none): list-nodes turns it into `lag_s`.
        """
        if self._status_source is None:
            return None
        status = self._status_source(name)
        if not status:
            return status
        applied = status.get("applied_commit")
        head = self.head
        if not applied:
            return {**status, "commits_behind": None, "diverged": False}
        if not self.git.is_ancestor(applied, head):
            return {**status, "commits_behind": None, "diverged": True}
        behind = self.git.commits_between(applied, head)
        return {
            **status,
            "commits_behind": behind,
            "diverged": False,
            "behind_since": self._oldest_after(applied, head) if behind else None,
        }

    def _oldest_after(self, ancestor: str, head: str, limit: int = 10_000) -> int | None:
        """Commit time of the first commit after `ancestor` on head's first-parent line (the
        store writes a straight line); bounded, so a node far behind costs `limit` steps at most
        (the time found there is then a lower bound of its lag)."""
        try:
            commit = self.git.repo[head].peel(pygit2.Commit)
            for _ in range(limit):
                if not commit.parents or str(commit.parents[0].id) == ancestor:
                    break
                commit = commit.parents[0]
            return int(commit.commit_time)
        except (KeyError, ValueError, pygit2.GitError):
            return None


def moves_after(
    moves: Mapping[str, tuple[str, str | None, str | None]], change: Change
) -> Mapping[str, tuple[str, str | None, str | None]]:
    """The snapshot's `moves` index once `change` is applied (only its domains can differ)."""
    out = dict(moves)
    for name, dom in change.domains.items():
        out.pop(name, None)
        if dom is not None and dom.home is not None and (dom.moving_to or dom.moved_from):
            out[name] = (dom.home, dom.moving_to, dom.moved_from)
    return out


def replicas_after(replicas: Mapping[str, tuple[str, str]], change: Change) -> Mapping[str, tuple[str, str]]:
    """The snapshot's `replicas` index once `change` is applied (only its domains can differ)."""
    out = dict(replicas)
    for name, dom in change.domains.items():
        out.pop(name, None)
        if dom is not None and dom.home is not None and dom.replica is not None:
            out[name] = (dom.home, dom.replica)
    return out


def _with_readdressed(snap: Snapshot, change: Change) -> Change:
    """`change` plus, unchanged, every domain homed on a node whose address it changes: their
    passwd lines and home fragments name the address, so they are rendered again."""
    assert change.nodes is not None
    moved = {
        name
        for name in set(snap.nodes.nodes) | set(change.nodes.nodes)
        if (snap.nodes.nodes[name].address if name in snap.nodes.nodes else None)
        != (change.nodes.nodes[name].address if name in change.nodes.nodes else None)
    }
    extra = {d: snap.domains[d] for node in moved for d in snap.homes.get(node, ()) if d not in change.domains}
    if not extra:
        return change
    return Change(domains={**change.domains, **extra}, nodes=change.nodes, settings=change.settings)


def _redact(url: str) -> str:
    """A URL without any user:password part, for health output and logs."""
    return re.sub(r"//[^/@]*@", "//***@", url)
