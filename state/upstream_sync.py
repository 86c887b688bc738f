"""Upstream sync: a store's link to the shared upstream repo (upstream mode).

It fetches upstream's tip and hands it to the store to adopt or refuse (the store's rule, passed
in as `adopt`), pushes each write together with its statement in one atomic push, and follows a
key rotation another server announced on upstream. It shares the store's writers' lock, passed
in: the `_locked` methods expect the caller to hold it, `sync` takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mailstate.state.errors import StatementInvalid, StoreError, UpstreamUnavailable
from mailstate.state.fifolock import FifoLock
from mailstate.state.keyrotation import learn_endorsements
from mailstate.state.publisher import StatementPublisher
from mailstate.state.statement import parse_statement
from mailstate.state.upstream import Upstream

log = logging.getLogger("mailstate.store")

# adopt(tip, joining): verify and validate upstream's tip, then serve it, or record it as refused.
Adopt = Callable[[str, bool], None]


class UpstreamSync:
    """Fetch, push and key-rotation following for one store in upstream mode."""

    def __init__(
        self,
        upstream: Upstream,
        lock: FifoLock,
        statements: StatementPublisher,
        *,
        head: Callable[[], str],
        adopt: Adopt,
        trusted_signers: Path | None = None,
    ) -> None:
        self.upstream = upstream
        self.lock = lock
        self.statements = statements
        self.head = head
        self.adopt = adopt
        self.trusted_signers = trusted_signers
        self.error: str | None = None  # the last fetch's failure, for health()

    def sync(self) -> None:
        """Fetch upstream and adopt its tip if valid."""
        with self.lock:
            self.sync_locked()

    def sync_locked(self, *, joining: bool = False) -> None:
        try:
            tip = self.upstream.fetch()
            self.error = None
        except UpstreamUnavailable as exc:
            self.error = exc.message
            log.error("%s", exc.message)
            return
        if tip is None:
            # An empty upstream: publish what we have so that others can build on it.
            if not self.upstream.push(self.head()).ok:
                self.sync_locked()
            return
        self.adopt(tip, joining)

    def push_locked(self, sha: str, stated: tuple[str, int] | None, refused: str | None) -> bool:
        """Push `sha` upstream (replacing `refused` when given), with its statement in the same
        atomic push when there is one; False when upstream moved (the caller re-runs)."""
        result = self.upstream.push(sha, expect=refused, statement=stated[0] if stated else None)
        if result.ok and result.statement and stated:
            self.statements.upstream_tag = stated[0]  # its push_locked then has nothing to do
        return result.ok

    def follow_key_rotation(self) -> bool:
        """Another server may have rotated its key (state/keyrotation.py). Learn the endorsements
        its statement on upstream carries into our allowed_signers; True when a key was learned
        (only looked at when a commit failed the signature check)."""
        if self.trusted_signers is None:
            return False
        try:
            found = self.upstream.fetch_statement()
            if found is None:
                return False
            learned = learn_endorsements(self.trusted_signers, parse_statement(found[1]).endorsements)
        except (UpstreamUnavailable, StatementInvalid, StoreError) as exc:
            log.warning("could not follow a key rotation upstream: %s", exc.message)
            return False
        for key in learned:
            log.warning(
                "learned server key %s... from its endorsement on upstream (added to %s)",
                key[:40],
                self.trusted_signers,
            )
        return bool(learned)
