"""One tick: fetch, verify, forward-only check, build, swap, reload (roll back on failure), prune, report."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config, read_sync_key
from .errors import (
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STALE,
    EXIT_USAGE,
    ConfigError,
    Locked,
    Refused,
    Stale,
    TickError,
)
from .fsutil import utcnow
from .lifecycle import Lifecycle
from .log import LOGGER_NAME, add_secret
from .mirror import ACCEPTED_REF, APPLIED_REF, Mirror, Quarantine, no_statement_message
from .postscreen import refusals
from .release import Releases
from .report import Reporter
from .runner import Runner
from .spam import filter_state
from .statefile import Lock, StateFile

if TYPE_CHECKING:
    from .dkim import Dkim
    from .fleet import Fleet
    from .ownerfiles import OwnerFiles, Staged
    from .sending import Sync
    from .spampolicy import Sync as SpamSync
    from .statement import Statement
    from .trust import Trust

# Why chain, dkim, statement, trust and verify are imported where they are used, not here: a
# no-op tick (the timer's every minute) needs none of them, and ``pi_pull.py`` is a zipapp,
# whose modules Python compiles again on every run (zipimport writes no .pyc): importing them
# costs ~35 ms, where a no-op tick's whole budget is 150 ms at 100k mailboxes.

HISTORY_MAX = 50


@dataclass
class TickResult:
    status: str  # "ok" | "error" | "refused" | "stale"
    exit_code: int
    applied_commit: str | None
    message: str
    error: str | None = None
    changed: bool = False


class Agent:
    """One node's puller. ``tick()`` runs one fetch/verify/apply/report cycle.

    The parts (mirror, releases, reporter, state file, lock) are attributes, so an embedder or a
    bench can wrap any of them.
    """

    def __init__(
        self,
        cfg: Config,
        runner: Runner | None = None,
        log: logging.Logger | None = None,
        sync_key: str | None = None,
        clock: Callable[[], float] | None = None,
        freshness_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.runner = runner or Runner()
        self.log = log or logging.getLogger(LOGGER_NAME)
        self.root = cfg.root
        self.mirror = Mirror(cfg, self.runner, self.log)
        self.releases = Releases(cfg, self.runner, self.log, self.mirror)
        self.reporter = Reporter(cfg, self.log, self._credentials)
        # Graveyard, purge, upgrade move, usage; ``clock`` (epoch seconds) is the tests' seam.
        self.lifecycle = Lifecycle(cfg, self.mirror, self.releases, self.log, clock or time.time)
        self._clock_arg = clock
        self._dkim: Dkim | None = None
        self._sending: Sync | None = None
        self._spam_policies: SpamSync | None = None
        self._fleet: Fleet | None = None
        self._trust: Trust | None = None
        self._owners: OwnerFiles | None = None
        self.state = StateFile(cfg.root)
        self.lock = Lock(cfg.root)
        # Freshness compares with the server's Issued-At: the wall clock, never ``clock`` (it
        # fast-forwards the lifecycle's purge in tests, which must not make statements stale).
        # ``freshness_clock`` is the staleness tests' seam: a later clock instead of a sleep.
        self.clock: Callable[[], float] = freshness_clock
        self._sync_key = sync_key
        if sync_key is not None:
            self._mask_key()

    @property
    def spam_policies(self) -> SpamSync:
        """The state's spam policies, made into rspamd's settings (pipull/spampolicy.py; [spam] enabled)."""
        if self._spam_policies is None:
            from .spampolicy import Sync as SpamSync

            self._spam_policies = SpamSync(self.cfg, self.mirror, self.log, self.runner)
        return self._spam_policies

    @property
    def dkim(self) -> Dkim:
        """This node's DKIM keys and OpenDKIM's tables (off unless [dkim] enabled = yes)."""
        if self._dkim is None:
            from .dkim import Dkim

            self._dkim = Dkim(self.cfg, self.runner, self.log, self._clock_arg or time.time)
        return self._dkim

    @property
    def owners(self) -> OwnerFiles:
        """Mailbox owners' Sieve scripts and app passwords beside the releases (pipull/ownerfiles.py)."""
        if self._owners is None:
            from .ownerfiles import OwnerFiles

            self._owners = OwnerFiles(self.cfg, self.mirror, self.runner, self.log)
        return self._owners

    @property
    def sending(self) -> Sync:
        """The outbound limits the policy service reads (<root>/policy, pipull/sending.py)."""
        if self._sending is None:
            from .sending import Sync

            self._sending = Sync(self.cfg, self.mirror, self.log)
        return self._sending

    def _sending_report(self) -> tuple[list[dict[str, Any]] | None, int | None]:
        """What the policy service published for the next report (policy.py Publisher): its
        entries and their sequence number; (None, None) when there is nothing to send."""
        from .policy import PENDING, read_pending

        found = read_pending(os.path.join(self.sending.dir, PENDING))
        if found is None or not found["entries"]:
            return None, None
        return found["entries"], int(found["seq"])

    def _sending_acked(self, seq: int) -> None:
        from .fsutil import atomic_write
        from .policy import ACKED

        try:
            atomic_write(os.path.join(self.sending.dir, ACKED), f"{seq}\n".encode())
        except OSError as e:  # sent again with the next report
            self.log.error(f"could not note the sending figures as reported: {e}")

    @property
    def fleet(self) -> Fleet:
        """This node's part in the fleet: trust in the other nodes, credentials, move-domain's work."""
        if self._fleet is None:
            from .fleet import Fleet

            self._fleet = Fleet(
                self.cfg, self.runner, self.log, self.mirror, self.releases, self.lifecycle, self.basic_token
            )
        return self._fleet

    @property
    def more_work(self) -> bool:
        """Whether the last tick left move work that did not fit its budget (follow mode ticks again)."""
        return self._fleet is not None and self._fleet.more

    @property
    def trust(self) -> Trust:
        """Server keys learned from endorsements (server key rotation), kept in <root>/trust.json."""
        if self._trust is None:
            from .trust import Trust

            self._trust = Trust(self.cfg, self.runner, self.log)
        return self._trust

    # ---- secrets

    @property
    def sync_key(self) -> str:
        """The node's sync key, read from its file on first use; masked in the log from then on."""
        if self._sync_key is None:
            self._sync_key = read_sync_key(self.cfg.sync_key_file)
            self._mask_key()
        return self._sync_key

    def _mask_key(self) -> None:
        assert self._sync_key is not None
        add_secret(self.log, self._sync_key)
        add_secret(self.log, self.basic_token())

    def basic_token(self) -> str:
        key = self.sync_key
        return base64.b64encode(f"{self.cfg.node_name}:{key}".encode()).decode()

    def _credentials(self) -> tuple[str, str]:
        return self.sync_key, self.basic_token()

    def _fetch_env(self) -> dict[str, str]:
        """The sync key reaches git only through the environment, never argv or the URL."""
        if not (self.cfg.remote_is_http and self.cfg.send_credentials):
            return {}
        self.mirror.check_git_version()
        return {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": "Authorization: Basic " + self.basic_token(),
        }

    # ---- the tick

    def tick(self) -> TickResult:
        """Run one tick under the lock; never raises for a tick that failed (see TickResult)."""
        t0 = time.monotonic()
        self.lock.acquire()
        try:
            try:
                st, original = self.state.load()
            except TickError as e:
                self.log.error(str(e))
                return TickResult("error", EXIT_ERROR, None, str(e), error=str(e))
            self.lifecycle.housekeeping(st)
            first = not st.get("applied_commit")
            # Before this tick can reload Dovecot (which forgets its login counts).
            app_uses = self.owners.app_password_uses(st, self.clock())
            result = self._guarded_tick(st)
            if result.status == "ok":
                result = self._owners_caught_up(st, result)
            self._record_status(st, result)
            dkim_keys = (
                self.dkim.step() if self.cfg.dkim else None
            )  # after the tick: the tables follow the release that is live now
            self.sending.step(st.get("applied_commit"))  # the same: the limits of the live release
            if self.cfg.spam:
                self.spam_policies.step(st.get("applied_commit"))  # rspamd's settings of the live release
            sending, seq = self._sending_report()
            # Not in the tick of a node's first apply: a usage pass starts by reading every mailbox
            # list (~7 s at 1M mailboxes, on top of the first apply); the next tick starts it.
            usage = None if first and result.changed else self.lifecycle.usage(st)
            fleet = self.fleet.step(st)
            spam_filter = filter_state(self.cfg, self.runner)
            if spam_filter is not None:
                fleet = {**fleet, "spam_filter": spam_filter}
            screened = refusals(self.cfg, self.runner)
            if screened is not None:
                fleet = {**fleet, "postscreen": screened}
            sent = self.reporter.send(
                st,
                result.status,
                result.error,
                usage=usage,
                dkim_keys=dkim_keys,
                app_uses=app_uses,
                sending=sending,
                extras=fleet,
            )
            if sent and dkim_keys:
                self.dkim.reported(dkim_keys)
            if sent and app_uses:
                st["app_uses_pending"] = []
            if sent and seq is not None:
                self._sending_acked(seq)
            line = f"{result.message} ({time.monotonic() - t0:.2f}s)"
            if result.status == "ok":
                self.log.info(line)
            else:
                self.log.error(line)
            try:
                self.state.save(st, original)
            except OSError as e:
                self.log.error(f"cannot write {self.state.path}: {e}")
            return result
        finally:
            self.lock.release()

    def _owners_caught_up(self, st: dict[str, Any], result: TickResult) -> TickResult:
        """Owners' files that lag behind the applied commit (a failure after a swap, a new pi-pull)
        are brought up to it; a failure here makes the tick an error (the release stays live)."""
        applied = st.get("applied_commit")
        try:
            if isinstance(applied, str) and self.owners.behind(applied):
                self.log.info(self.owners.apply(self.owners.stage(applied)))
        except (Refused, TickError, OSError) as e:
            msg = f"owners: {e}"
            return TickResult("error", EXIT_ERROR, applied, f"error: {msg}", error=msg, changed=result.changed)
        return result

    def _guarded_tick(self, st: dict[str, Any]) -> TickResult:
        applied = st.get("applied_commit")
        try:
            return self._tick(st)
        except Refused as e:
            return TickResult("refused", EXIT_REFUSED, applied, f"refused: {e}", error=str(e))
        except Stale as e:
            return TickResult("stale", EXIT_STALE, applied, f"stale: {e}", error=str(e))
        except TickError as e:
            # A fetch that failed leaves the statement kept from an earlier tick as the newest one.
            stale = self._staleness(st, str(e))
            if stale is not None:
                return TickResult("stale", EXIT_STALE, applied, f"stale: {stale}", error=stale)
            return TickResult("error", EXIT_ERROR, applied, f"error: {e}", error=str(e))
        except ConfigError:
            raise
        except Exception as e:  # keep serving; report what went wrong
            msg = f"{type(e).__name__}: {e}"
            return TickResult("error", EXIT_ERROR, applied, "error: " + msg, error=msg)

    @staticmethod
    def _record_status(st: dict[str, Any], result: TickResult) -> None:
        """A no-op ok tick leaves state.json untouched unless it clears an earlier failure."""
        if result.status != "ok" or result.changed:
            st["last_status"] = result.status
            st["last_error"] = result.error
        elif st.get("last_status") not in (None, "ok"):
            st["last_status"] = "ok"
            st["last_error"] = None

    def _tick(self, st: dict[str, Any]) -> TickResult:
        self.mirror.ensure()
        applied = st.get("applied_commit")
        current = self.releases.current_commit()
        self.mirror.adopt(applied)
        env = self._fetch_env()
        remote = self.mirror.ls_remote(env)
        if remote is None:
            raise Refused(no_statement_message(self.mirror.safe_url()))
        known: dict[str, Any] = st["statement"] if isinstance(st.get("statement"), dict) else {}
        if applied and current == applied and remote == known.get("tag"):
            self._check_fresh(st)  # a host that keeps serving the same old statement
            return TickResult("ok", EXIT_OK, applied, f"up to date at {applied[:12]}")
        trust = self._trust_key()
        refused: dict[str, Any] = st["refused"] if isinstance(st.get("refused"), dict) else {}
        if refused.get("tag") == remote and refused.get("trust") == trust and refused.get("error"):
            # The same statement under the same trust gets the same verdict: nothing is downloaded again.
            raise Refused(str(refused["error"]))
        self._fetched: str | None = None
        try:
            with self.mirror.open_quarantine() as quarantine:
                return self._apply(st, quarantine, env, applied, current)
        except Refused as e:
            st["refused"] = {"tag": self._fetched or remote, "trust": trust, "error": str(e)}
            raise

    def _trust_key(self) -> str:
        """What a verdict on a statement depends on besides the statement: the node's keys and limits."""
        h = hashlib.sha256(self.releases.reuse_key().encode())
        h.update(f"{self.cfg.max_fetch_mb} {self.cfg.max_file_mb}".encode())
        for path in (self.cfg.allowed_signers, self.cfg.revoked_signers, self.trust.path):
            try:
                with open(path, "rb") as fh:
                    h.update(b"\0" + fh.read(1 << 20))
            except OSError:
                h.update(b"\0-")
        return h.hexdigest()

    def _apply(
        self, st: dict[str, Any], quarantine: Quarantine, env: dict[str, str], applied: str | None, current: str | None
    ) -> TickResult:
        """Fetch and verify the statement, then apply its head (inside the quarantine)."""
        from .chain import ChainVerifier
        from .statement import MAX_STATEMENT_BYTES, parse_statement, verify_statement
        from .verify import check_allowed_signers

        tag = self.mirror.fetch(env)
        self._fetched = tag
        stmt = parse_statement(tag, self.mirror.read_object(tag, "tag", MAX_STATEMENT_BYTES))
        check_allowed_signers(self.cfg)
        now = self.clock()
        if stmt.issued_at > now + self.cfg.clock_skew:
            raise Refused(
                f"the accepted-head statement {tag[:12]} is issued {stmt.issued_at - int(now)} s in the future "
                f"(over [freshness] clock_skew = {self.cfg.clock_skew:g} s; is this node's clock right?)"
            )
        learned = self.trust.follow(stmt, now, self.cfg.clock_skew)  # server key rotation
        signers = self.trust.signers_file() if learned is None else self.trust.candidate(learned)
        verify_statement(self.runner, self.cfg, stmt, signers)
        if learned is not None:
            self.trust.save(learned)
            signers = self.trust.signers_file(learned)
        head = stmt.head
        if not self.mirror.has_commit(head):
            raise Refused(f"the accepted-head statement names {head[:12]}, which the remote did not send")
        target = head
        if applied and (head == applied or self.mirror.is_ancestor(head, applied)):
            target = applied  # a statement at or behind what is live changes nothing
        if applied and current == applied and target == applied:
            if self._newer(st, stmt):
                self._record_statement(st, stmt)
            self._check_fresh(st)
            note = "" if head == applied else f" (the statement names the older {head[:12]})"
            return TickResult("ok", EXIT_OK, applied, f"up to date at {applied[:12]}{note}")
        if self._is_stale(stmt.issued_at):
            # A frozen feed (TUF's freeze attack): an old statement never brings a commit live.
            raise Stale(self._stale_message(stmt.issued_at, f"statement {tag[:12]} names {head[:12]}, not applied"))

        if applied and target != applied and not self.mirror.is_ancestor(applied, target):
            raise Refused(
                f"rollback: fetched {target[:12]} does not descend from applied {applied[:12]} (force-push to an older or "
                "unrelated commit?)"
            )
        # Every commit of applied..target, not only the tip (pipull/chain.py; the first apply: the tip).
        checked = ChainVerifier(
            self.mirror, self.cfg, self.runner, signers, now=now, clock_skew=self.cfg.clock_skew
        ).verify(applied if applied and target != applied else None, target)
        self.log.debug(f"verified {checked} commit signature(s) up to {target[:12]}")

        t_build = time.monotonic()
        owners = self.owners.stage(target)  # refused here, the commit goes nowhere
        owners.seconds = time.monotonic() - t_build
        new, changed, fallback = self._stage(target, applied, current)
        build_s = time.monotonic() - t_build
        self._reload_or_roll_back(target, changed, fallback)
        self.lifecycle.after_reload(st, target, current if current and current != target else applied)
        quarantine.accept({ACCEPTED_REF: tag, APPLIED_REF: target})
        self._record_applied(st, target, applied, fallback)
        self._record_statement(st, stmt)
        self._apply_owners(owners)
        reloaded = ", ".join(changed) if changed else "nothing (no service files changed)"
        return TickResult(
            "ok",
            EXIT_OK,
            target,
            f"applied {target[:12]}: {new['domains']} domains, {new['mailboxes']} mailboxes, "
            f"build {build_s:.2f}s, reloaded {reloaded}",
            changed=True,
        )

    def _apply_owners(self, staged: Staged) -> None:
        """Write the owners' files once the release is live (a later tick retries a failure: owners.json lags)."""
        try:
            if staged.domains or staged.full:
                t = time.monotonic()
                done = self.owners.apply(staged)
                self.log.info(f"{done} (read {staged.seconds:.3f}s, write {time.monotonic() - t:.3f}s)")
            elif self.owners.behind(staged.commit):
                self.owners.apply(staged)  # nothing of theirs changed: owners.json follows the commit
        except (TickError, OSError) as e:
            raise TickError(f"owners: {e} (the release is live; the next tick tries again)") from None

    # ---- freshness

    @staticmethod
    def _newer(st: dict[str, Any], stmt: Statement) -> bool:
        """A statement older than the one kept (a replay) never replaces it."""
        known = st.get("statement")
        return (
            not isinstance(known, dict)
            or not isinstance(known.get("issued_at"), int)
            or stmt.issued_at >= known["issued_at"]
        )

    def _is_stale(self, issued_at: int) -> bool:
        return bool(self.cfg.max_staleness) and self.clock() - issued_at > self.cfg.max_staleness

    def _stale_message(self, issued_at: int, why: str) -> str:
        age = int(self.clock() - issued_at)
        return (
            f"the newest verified accepted-head statement was issued {age} s ago, over [freshness] max_staleness = "
            f"{self.cfg.max_staleness:g} s ({why}); keeping the last good release"
        )

    def _staleness(self, st: dict[str, Any], why: str) -> str | None:
        """The stale message when the statement kept in state.json is too old, else None."""
        known = st.get("statement")
        issued = known.get("issued_at") if isinstance(known, dict) else None
        if not isinstance(issued, int) or not self._is_stale(issued):
            return None
        return self._stale_message(issued, why)

    def _check_fresh(self, st: dict[str, Any]) -> None:
        stale = self._staleness(st, "the remote serves nothing newer")
        if stale is not None:
            raise Stale(stale)

    @staticmethod
    def _record_statement(st: dict[str, Any], stmt: Statement) -> None:
        """The last verified statement (Issued-At: how fresh the node's view of the server is)."""
        st["statement"] = {"tag": stmt.tag, "head": stmt.head, "issued_at": stmt.issued_at}
        st.pop("refused", None)

    def _stage(
        self, tip: str, applied: str | None, current: str | None
    ) -> tuple[dict[str, Any], list[str], str | None]:
        """Make releases/<tip> live; return (its manifest, services to reload, release to fall back to)."""
        if current == tip and self.releases.manifest(tip):
            # A previous run swapped to tip but died before recording it: adopt the live
            # release (never rebuild the directory `current` points at) and reload both.
            fallback = applied if applied and applied != tip and self.releases.exists(applied) else None
            return self.releases.manifest(tip), ["postfix", "dovecot"], fallback
        new = self.releases.build(tip, current)
        old = self.releases.manifest(current)
        changed = []
        if not old or old.get("postfix_digest") != new["postfix_digest"]:
            changed.append("postfix")
        if not old or old.get("dovecot_digest") != new["dovecot_digest"]:
            changed.append("dovecot")
        self.lifecycle.before_swap(tip, current)
        self.sending.check(current, tip)  # the sending files, like every rendered line: before anything goes live
        if self.cfg.spam:
            self.spam_policies.check(current, tip)  # the spam policies too
        if self.cfg.sync:
            os.sync()
        self.releases.swap_to(tip)
        return new, changed, current

    def _reload_or_roll_back(self, tip: str, changed: list[str], fallback: str | None) -> None:
        """Reload; if that fails, swap back to ``fallback``, reload again, drop the new release."""
        failures = self.releases.reload(changed)
        if not failures:
            return
        self.releases.swap_to(fallback)
        again = self.releases.reload(changed)
        if fallback != tip:
            try:
                self.releases.remove(tip)
            except OSError:
                pass
        msg = "; ".join(failures)
        if fallback:
            msg += f"; rolled back to {fallback[:12]}"
        else:
            msg += "; no previous release to roll back to, removed current"
        if again:
            msg += "; reload after rollback failed too: " + "; ".join(again)
        raise TickError(msg)

    def _record_applied(self, st: dict[str, Any], tip: str, applied: str | None, fallback: str | None) -> None:
        if applied != tip:
            st["previous_commit"] = fallback if fallback and fallback != tip else applied
        st["applied_commit"] = tip
        st["applied_at"] = utcnow()
        st["history"] = [tip, *[s for s in st.get("history", []) if s != tip][: HISTORY_MAX - 1]]
        self.releases.prune(st)
        self.mirror.gc_auto()


def run_once(agent: Agent, log: logging.Logger) -> int:
    """One tick; the exceptions that escape a tick become their exit codes."""
    try:
        return agent.tick().exit_code
    except Locked as e:
        log.error(str(e))
        return EXIT_LOCKED
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except OSError as e:
        log.error(f"tick failed: {e}")
        return EXIT_ERROR
