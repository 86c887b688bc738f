"""The statement publisher: writes and pushes the signed accepted-head statement of a store.

The accepted-head statement (state/statement.py, `refs/mailstate/accepted`) names the last commit
a store validated. The publisher points REF at a statement of the head the store hands it,
forward only, re-signs it on a schedule (freshness for the nodes), and in upstream mode
force-pushes it with a lease. It shares the store's writers' lock, passed in: the `_locked`
methods expect the caller to hold it, `refresh` takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pygit2

from mailstate.state.errors import StatementInvalid, StoreError, UpstreamUnavailable
from mailstate.state.fifolock import FifoLock
from mailstate.state.gitrepo import GitRepo
from mailstate.state.signing import Signer
from mailstate.state.statement import REF as STATEMENT_REF
from mailstate.state.statement import create_statement, parse_statement, read_statement, verify_statement
from mailstate.state.upstream import Upstream

log = logging.getLogger("mailstate.store")

Stated = tuple[str, str, int]  # (tag id, head, issued_at)


def is_commit(git: GitRepo, sha: str) -> bool:
    try:
        return isinstance(git.repo[sha], pygit2.Commit)
    except (KeyError, ValueError):
        return False


class StatementPublisher:
    """The statement a store last wrote or verified, and the means to move and push it."""

    def __init__(
        self,
        git: GitRepo,
        signer: Signer,
        clock: Callable[[], datetime],
        lock: FifoLock,
        accepted: Callable[[], str | None],
        *,
        upstream: Upstream | None = None,
        trusted_signers: Path | None = None,
    ) -> None:
        self.git = git
        self.signer = signer
        self.clock = clock
        self.lock = lock
        # The head to state: the store's, while it is validated (else None: never a statement for
        # a commit nobody validated).
        self.accepted = accepted
        self.upstream = upstream
        self.trusted_signers = trusted_signers
        # REF is written without an fsync: after a power cut it names either the old or the new
        # statement, and both tags were on disk before it moved. `_refs` reads it.
        try:
            self._refs = pygit2.Repository(str(git.path))
        except pygit2.GitError as exc:
            raise StoreError(f"{git.path} is not a git repository.") from exc
        self._stated_value: Stated | None = None
        self._listeners: list[Callable[[str], None]] = []  # called with each new stated head
        self.error: str | None = None
        self.upstream_tag: str | None = None  # the tag id upstream's REF holds, as far as we know
        self.push_due = False

    # --- what is stated --------------------------------------------------------------------

    @property
    def stated(self) -> Stated | None:
        return self._stated_value

    @stated.setter
    def stated(self, value: Stated | None) -> None:
        # Every assignment goes through here, so a listener learns of each new stated head
        # wherever it came from (a write, an adoption, another process's statement).
        old = self._stated_value
        self._stated_value = value
        if value is not None and (old is None or old[1] != value[1]):
            for listener in list(self._listeners):
                try:
                    listener(value[1])
                except Exception:  # a listener must never fail a write
                    log.exception("statement listener failed")

    def add_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str], None]) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def verified(self) -> Stated | None:
        """The statement at REF when a server signed it (remembered as stated), else None."""
        found = read_statement(self._refs)
        if found is None or not self.server_signed(found[1]):
            return None
        st = parse_statement(found[1])
        self.stated = (found[0], st.head, st.issued_at)
        return self.stated

    def server_signed(self, raw: bytes) -> bool:
        """True when `raw` is a statement a server key signed (or nothing can be checked)."""
        try:
            if self.trusted_signers is None:
                parse_statement(raw)
            else:
                verify_statement(raw, self.trusted_signers)
        except StatementInvalid as exc:
            log.warning("ignoring an accepted-head statement: %s", exc.message)
            return False
        return True

    # --- moving REF --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-sign the statement of the accepted head now (freshness), and push it upstream."""
        with self.lock:
            moved = self.publish_locked(refresh=True)
            self.push_locked()
            return moved

    def publish_locked(
        self, *, refresh: bool = False, replace: bool = False, prepared: tuple[str, int] | None = None
    ) -> bool:
        """Point REF at a statement of the accepted head, forward only; True when it moved.

        Forward only: a statement at REF whose head is not an ancestor of ours (another process
        stated a newer commit) stays, if a server signed it. With `refresh`, a statement of the
        same head is re-issued with a new Issued-At; with `replace`, whatever is there goes.
        `prepared` is a (tag id, issued_at) already on disk that states our head (the write's).
        """
        head = self.accepted()
        if head is None:
            return False  # never a statement for a commit nobody validated
        try:
            with self.git.ref_lock():
                tag, issued = self._write_ref(head, refresh=refresh, replace=replace, prepared=prepared)
        except _Keep:
            return False
        except (StoreError, OSError) as exc:
            self.error = (
                exc.message if isinstance(exc, StoreError) else "the accepted-head statement could not be written"
            )
            log.error("accepted-head statement for %s not written: %s", head[:12], self.error)
            return False
        self.stated = (tag, head, issued)
        self.error = None
        self.push_due = self.upstream is not None
        return True

    def _write_ref(
        self, head: str, *, refresh: bool, replace: bool, prepared: tuple[str, int] | None
    ) -> tuple[str, int]:
        """The statement REF now names (ref lock held); raises _Keep when REF stays as it is."""
        ref = self._refs.references.get(STATEMENT_REF)
        current = str(ref.target) if ref is not None else None
        known = self.stated
        if known is not None and current == known[0]:
            if known[1] == head and not refresh:
                raise _Keep
            theirs: tuple[str, int] | None = (known[1], known[2])
        else:
            theirs = self._foreign(head, refresh=refresh, replace=replace)
            if theirs is None and self.stated is not None and self.stated[0] == current:
                raise _Keep  # adopted as it is
        if prepared is not None:
            tag, issued = prepared
        else:
            issued = int(self.clock().timestamp())
            if theirs is not None and theirs[0] == head:
                issued = max(issued, theirs[1])  # Issued-At never goes back either
            tag = create_statement(self.git.repo, self.signer, head, issued, write=self.git.write_object)
            self.git.flush_objects(extra=[tag])  # on disk before the ref names it
        try:
            # Written from Python, not through `_refs`: libgit2 would look the tag up first, and
            # a handle that looks objects up keeps every pack it meets open for good.
            self.git.put_ref(STATEMENT_REF, tag, sync=False)
        except OSError as exc:
            raise StoreError("git could not update the accepted-head statement.") from exc
        return tag, issued

    def _foreign(self, head: str, *, refresh: bool, replace: bool) -> tuple[str, int] | None:
        """Decide about a statement at REF that this store did not write (ref lock held).

        Returns its (head, issued_at) when ours may replace it, None when there is none (or
        when it states our head and is adopted as it is, `stated` then names it);
        raises _Keep when it must stay (a server stated a head ours does not descend from).
        """
        found = read_statement(self._refs)
        if found is None:
            return None
        try:
            theirs = parse_statement(found[1])
        except StatementInvalid as exc:
            log.warning("replacing a malformed accepted-head statement: %s", exc.message)
            return None
        if replace:
            return None
        if theirs.head == head and not refresh:
            # Another process stated our head already: nothing to add (the scheduled refresh
            # re-signs it, so even a forged one lives one interval at most).
            self.stated = (found[0], theirs.head, theirs.issued_at)
            return None
        if (
            is_commit(self.git, theirs.head)
            and not self.git.is_ancestor(theirs.head, head)
            and self.server_signed(found[1])
        ):
            log.info("accepted-head statement left at %s (not an ancestor of %s)", theirs.head[:12], head[:12])
            raise _Keep
        return (theirs.head, theirs.issued_at)

    # --- upstream ----------------------------------------------------------------------------

    def push_locked(self) -> None:
        """Upstream mode: force-push our statement to upstream REF with a lease on what upstream
        held; leave a newer one (another server's) in place. Failures are logged, retried later."""
        if self.upstream is None or self.stated is None or not self.push_due:
            return
        tag, head, _issued = self.stated
        if tag == self.upstream_tag:
            self.push_due = False  # it went up with the write
            self.error = None
            return
        for _attempt in range(3):
            try:
                result = self.upstream.push_statement(tag, expect=self.upstream_tag)
                if result.ok:
                    self.upstream_tag = tag
                    self.push_due = False
                    self.error = None
                    return
                found = self.upstream.fetch_statement()  # someone else pushed one: look at it
            except UpstreamUnavailable as exc:
                self.error = f"statement push: {exc.message}"
                log.warning("accepted-head statement not pushed upstream (retried later): %s", exc.message)
                return
            self.upstream_tag = found[0] if found else None
            if found is None:
                continue
            try:
                theirs = parse_statement(found[1]).head
            except StatementInvalid:
                continue
            if is_commit(self.git, theirs) and not self.git.is_ancestor(theirs, head) and self.server_signed(found[1]):
                self.push_due = False  # upstream states a head ours does not descend from
                return
        self.error = "statement push: upstream's statement kept changing"
        log.warning("accepted-head statement not pushed upstream: it kept changing (retried later)")


class _Keep(Exception):
    """Internal: the statement at REF must stay as it is."""
