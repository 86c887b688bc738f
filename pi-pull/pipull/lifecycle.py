"""Mailbox lifecycle on the node: the graveyard, the purge, the format 1 -> 2 Maildir move, usage.

State format 2 (docs/state-repo.md) gives every mailbox an immutable id, and its home is
``<mail_root>/<domain>/<local>~<id>``. A re-added address gets a new id, hence a new, empty
home; what is left of the old one is dealt with here:

* **Graveyard.** After a release went live (swap and reload succeeded), every directory
  ``<mail_root>/<domain>/<name>`` of a domain whose rendered files changed, or that is gone
  (removed, or email disabled), and that is not the home of a mailbox listed in the domain's
  ``mailboxes`` fragment, is renamed (atomic, same file system) to
  ``<mail_root>/.graveyard/<UTC yyyymmddTHHMMSSZ>_<domain>_<name>``. A soft-deleted mailbox is
  still listed (``inactive``): its Maildir stays where it is. Only real directories whose name
  has the shape of a mailbox directory (``<local>`` or ``<local>~<id>``) are moved; symlinks
  and anything else are left alone, and every path is opened relative to a directory fd
  without following symlinks, so no name on disk or in a commit can steer a move elsewhere.
  No compiled file can point into the graveyard: a leading dot is never a valid domain.
* **Purge.** At the start of every tick, graveyard entries older than ``purge_after_days``
  (``rendered/settings`` of the applied commit, kept in state.json; 0 = the next tick) are
  deleted. The move time is in the entry's name, so the purge survives restarts, missed ticks
  and a lost state file. ``[lifecycle] purge = no`` turns off both the moves and the purge on
  this node: where several nodes share one mail root (NFS), exactly one node may have
  ``purge = yes``.
* **Upgrade move (format 1 -> 2).** Before the swap to the first format-2 release, each
  Maildir ``<domain>/<local>`` is renamed to ``<domain>/<local>~<id>`` and a symlink
  ``<local> -> <local>~<id>`` is put in its place, so deliveries and logins through the
  still-live format-1 files land in the new directory. After the reload, a real directory
  that appeared at the old path (a delivery that raced the rename) has its messages merged
  into the new Maildir; the husk goes to the graveyard. The symlinks stay for
  ``UPGRADE_GRACE`` seconds (IMAP sessions opened before the swap still use the old path;
  without the link Dovecot would re-create it and save there), during which every usage run
  merges any such directory again; then they are removed and merged one last time.
* **Usage** (usage.py): every ``[lifecycle] usage_interval`` seconds a pass over the listed
  mailboxes starts; each tick spends at most ``usage_budget_s`` on it (only folders whose
  mtime changed are listed again) and the mailboxes it measured go into that tick's report,
  as ``usage: [{email, id, used_bytes, messages}]``.

Everything that happens here after the swap is best effort: a failure is logged and retried
on a later tick (state.json ``lifecycle``), and never fails the tick, whose release is live.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import Refused, TickError
from .mirror import Mirror
from .release import Releases
from .rules import MAILBOX_ID_RE, is_domain, is_local_part
from .runner import short
from .verify import PRINTABLE_ASCII_RE, LineSplitter

GRAVEYARD = ".graveyard"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_ENTRY_RE = re.compile(r"^([0-9]{8}T[0-9]{6}Z)_")
SETTINGS_PATH = "rendered/settings"
MAX_SETTINGS_BYTES = 4096
MAX_PURGE_DAYS = 3650
# How long the format-1 paths stay symlinks to the new homes after the upgrade went live.
UPGRADE_GRACE = 86400.0
# A file in a raced Maildir's tmp/ younger than this may be a delivery in progress: wait for it.
TMP_IN_PROGRESS = 3600.0
NAME_MAX = 255
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class NodeSettings:
    """``rendered/settings``: what the node needs from mailstate.yaml."""

    format: int
    purge_after_days: int


def parse_settings(data: bytes) -> NodeSettings:
    """Parse ``rendered/settings`` exactly as compiler/render.py writes it
    (``format 2\\npurge_after_days N\\n``); Refused on anything else."""
    splitter = LineSplitter(SETTINGS_PATH)
    lines = splitter.feed(data)
    splitter.close()
    values: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        parts = raw.split(b" ") if PRINTABLE_ASCII_RE.match(raw) else []
        key = parts[0].decode("ascii") if len(parts) == 2 else ""
        expected = ("format", "purge_after_days")[n - 1] if n <= 2 else ""
        if key != expected or not parts[1].isdigit() or len(parts[1]) > 5:
            raise Refused(
                f"{SETTINGS_PATH}, line {n}: expected '{expected or 'nothing'} <number>' (the compiler writes "
                "'format 2' and 'purge_after_days <0..3650>')"
            )
        values[key] = int(parts[1])
    if len(values) != 2:
        raise Refused(f"{SETTINGS_PATH}: expected the two lines 'format 2' and 'purge_after_days <days>'")
    if values["format"] != 2:
        raise Refused(
            f"{SETTINGS_PATH}: state format {values['format']} is not one this node knows (2); update pi-pull"
        )
    if values["purge_after_days"] > MAX_PURGE_DAYS:
        raise Refused(f"{SETTINGS_PATH}: purge_after_days {values['purge_after_days']} is over {MAX_PURGE_DAYS}")
    return NodeSettings(format=values["format"], purge_after_days=values["purge_after_days"])


def is_mailbox_dir_name(name: str) -> bool:
    """True for ``<local>`` (format 1) or ``<local>~<id>`` (format 2), as the server spells them."""
    local, sep, box_id = name.partition("~")
    return is_local_part(local) and (not sep or bool(MAILBOX_ID_RE.match(box_id)))


def graveyard_name(stamp: str, domain: str, name: str) -> str:
    """``<stamp>_<domain>_<name>``; a domain too long for one file name is shortened with a hash."""
    entry = f"{stamp}_{domain}_{name}"
    if len(entry.encode()) <= NAME_MAX - 8:  # room for a ".N" suffix on a collision
        return entry
    tag = hashlib.sha256(domain.encode()).hexdigest()[:12]
    room = NAME_MAX - 8 - len(stamp) - len(name) - len(tag) - 4
    return f"{stamp}_{domain[: max(room, 1)]}-{tag}_{name}"


def parse_mailboxes(data: bytes, domain: str) -> Iterator[tuple[str, str]]:
    """(local, id) of every line of a ``mailboxes`` fragment (already validated by the build;
    checked again here because a path is made of it)."""
    splitter = LineSplitter(f"mailboxes of {domain}")
    for raw in splitter.feed(data):
        parts = raw.decode("ascii", "replace").split(" ")
        if len(parts) != 3 or not is_local_part(parts[0]) or not MAILBOX_ID_RE.match(parts[1]):
            raise Refused(f"mailboxes of {domain}: a line is not '<local> <id> <active|inactive>'")
        yield parts[0], parts[1]
    splitter.close()


class Lifecycle:
    """The node's side of the mailbox lifecycle (see the module docstring).

    ``clock`` (seconds since the epoch) is the seam the tests drive: graveyard names, the purge
    age, the upgrade grace period and the usage interval all read it, nothing sleeps.
    """

    def __init__(
        self,
        cfg: Config,
        mirror: Mirror,
        releases: Releases,
        log: logging.Logger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.mirror = mirror
        self.releases = releases
        self.log = log
        self.clock = clock
        self.mail_root = cfg.mail_root
        self.graveyard = os.path.join(cfg.mail_root, GRAVEYARD)

    # ---- state.json

    @staticmethod
    def _peek(st: dict[str, Any]) -> dict[str, Any]:
        """``state.json``'s ``lifecycle`` object for reading (a no-op tick must not add one)."""
        ls = st.get("lifecycle")
        return ls if isinstance(ls, dict) else {}

    @staticmethod
    def _state(st: dict[str, Any]) -> dict[str, Any]:
        ls = st.get("lifecycle")
        if not isinstance(ls, dict):
            ls = st["lifecycle"] = {}
        return ls

    # ---- reading the commit

    def settings(self, sha: str) -> NodeSettings | None:
        """``rendered/settings`` of ``sha``; None for a format-1 commit (it has none)."""
        r = self.mirror.git("ls-tree", "-z", sha, "--", SETTINGS_PATH)
        if r.returncode != 0:
            raise TickError(f"git ls-tree {sha[:12]} -- {SETTINGS_PATH} failed: {short(r.stderr)}")
        entry = r.stdout.split(b"\0")[0]
        if not entry:
            return None
        meta = entry.partition(b"\t")[0].decode("ascii", "replace").split()
        if len(meta) != 3 or meta[1] != "blob" or meta[0] not in ("100644", "100755"):
            raise Refused(f"{SETTINGS_PATH} is not a regular file")
        return parse_settings(self.mirror.read_object(meta[2], "blob", MAX_SETTINGS_BYTES))

    def _tree(self, sha: str | None, domains: list[str]) -> dict[str, dict[str, str]]:
        """{domain: {file: blob id}} of ``domains`` in ``sha`` (only those: O(domains asked for))."""
        if not sha:
            return {}
        return self.releases.domain_files(sha, domains)

    def _diff(self, old: str, new: str) -> tuple[list[str], list[str]]:
        """(domains whose rendered files differ, those upgraded from format 1 to 2) between two commits,
        from ``git diff-tree`` (what changed, not the whole state)."""
        changes = self.releases.changes(old, new)
        upgraded = [
            d
            for d, ch in changes.items()
            if ch.get("mailboxes", ("", ""))[1] and not ch["mailboxes"][0] and (ch.get("passwd") or ("x", ""))[0]
        ]
        return sorted(changes), sorted(upgraded)

    def _mailboxes(self, tree: dict[str, dict[str, str]], domains: list[str]) -> dict[str, list[tuple[str, str]]]:
        """{domain: [(local, id)]} of the given format-2 domains (one ``cat-file --batch``)."""
        out: dict[str, list[tuple[str, str]]] = {}
        wanted = [d for d in domains if "mailboxes" in tree.get(d, {})]
        if not wanted:
            return out
        with self.mirror.batch() as cat:
            for domain in wanted:
                data = b"".join(
                    cat.stream(tree[domain]["mailboxes"], f"mailboxes of {domain}", self.cfg.max_file_bytes)
                )
                out[domain] = list(parse_mailboxes(data, domain))
        return out

    # ---- directories

    def _open_root(self) -> int | None:
        """An fd of the mail root; None while it does not exist (no mail was ever delivered)."""
        try:
            return os.open(self.mail_root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None

    def _open_domain(self, rfd: int, domain: str) -> int | None:
        """An fd of ``<mail_root>/<domain>`` (never through a symlink); None when there is none."""
        if not is_domain(domain):
            raise Refused(f"unsafe domain name {domain[:80]!r}")
        try:
            return os.open(domain, _OPEN_DIR, dir_fd=rfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                self.log.warning(
                    f"{self.mail_root}/{domain} is not a directory (a symlink?); its Maildirs are left alone"
                )
                return None
            raise

    def _open_graveyard(self, rfd: int, create: bool) -> int | None:
        if create:
            try:
                os.mkdir(GRAVEYARD, 0o700, dir_fd=rfd)
            except FileExistsError:
                pass
        try:
            return os.open(GRAVEYARD, _OPEN_DIR, dir_fd=rfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TickError(f"{self.graveyard} is not a directory (a symlink?); refusing to use it") from None
            raise

    def _stamp(self) -> str:
        return time.strftime(STAMP_FORMAT, time.gmtime(self.clock()))

    def _bury(self, rfd: int, dfd: int, domain: str, name: str) -> str:
        """Rename ``<domain>/<name>`` into the graveyard; returns the entry's name."""
        gfd = self._open_graveyard(rfd, create=True)
        assert gfd is not None
        try:
            base = graveyard_name(self._stamp(), domain, name)
            entry, n = base, 1
            while True:
                try:
                    os.lstat(entry, dir_fd=gfd)
                except FileNotFoundError:
                    break
                n += 1
                entry = f"{base}.{n}"  # rename(2) would silently replace an empty directory
            os.rename(name, entry, src_dir_fd=dfd, dst_dir_fd=gfd)
            os.fsync(gfd)
            os.fsync(dfd)
        finally:
            os.close(gfd)
        return entry

    # ---- graveyard: after a release went live

    def _sweep_domain(self, rfd: int, domain: str, boxes: list[tuple[str, str]] | None, keep_bare: bool) -> int:
        """Move every mailbox-shaped real directory of ``domain`` that no listed mailbox owns
        (``boxes`` None: the domain is gone, none does). ``keep_bare``: leave ``<local>`` of a
        listed mailbox (the upgrade merges it). Returns how many moved."""
        dfd = self._open_domain(rfd, domain)
        if dfd is None:
            return 0
        try:
            owned = {f"{local}~{box_id}" for local, box_id in boxes or []}
            bare = {local for local, _ in boxes or []} if keep_bare else set()
            moved = 0
            for name in sorted(os.listdir(dfd)):
                if name in owned or name in bare or not is_mailbox_dir_name(name):
                    continue
                try:
                    if not stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                        continue  # symlinks (the upgrade's) and files are never moved
                except FileNotFoundError:
                    continue
                entry = self._bury(rfd, dfd, domain, name)
                moved += 1
                self.log.info(f"moved {domain}/{name} to {GRAVEYARD}/{entry} (no mailbox owns it)")
            return moved
        finally:
            os.close(dfd)

    def _sweep(self, st: dict[str, Any], sha: str, domains: list[str]) -> None:
        """Sweep ``domains`` against the tree of ``sha``; what fails is kept for the next tick."""
        ls = self._state(st)
        tree = self._tree(sha, domains)
        boxes = self._mailboxes(tree, domains)
        watched = set(ls.get("upgrade", {}).get("domains", [])) if isinstance(ls.get("upgrade"), dict) else set()
        left: list[str] = []
        rfd = self._open_root()
        if rfd is None:
            ls.pop("sweep", None)
            return
        try:
            for domain in sorted(domains):
                if domain in tree and domain not in boxes:
                    continue  # a format-1 domain: no ids, nothing to tell apart
                try:
                    self._sweep_domain(rfd, domain, boxes.get(domain), keep_bare=domain in watched)
                except (OSError, Refused, TickError) as e:
                    self.log.warning(
                        f"cannot move the unowned Maildirs of {domain} to the graveyard: {e}; retrying next tick"
                    )
                    left.append(domain)
        finally:
            os.close(rfd)
        if left:
            ls["sweep"] = sorted(set(left))
        else:
            ls.pop("sweep", None)

    # ---- upgrade move

    def before_swap(self, tip: str, live: str | None) -> None:
        """Check ``rendered/settings`` (Refused before anything goes live), then, for an upgrade
        to format 2, rename each Maildir to its new home and leave a symlink at the old path."""
        settings = self.settings(tip)
        if settings is None or not live:
            return
        upgraded = self._diff(live, tip)[1]
        if not upgraded:
            return
        new = self._tree(tip, upgraded)
        moved = 0
        rfd = self._open_root()
        if rfd is None:
            return
        try:
            for domain, boxes in self._mailboxes(new, upgraded).items():
                dfd = self._open_domain(rfd, domain)
                if dfd is None:
                    continue
                try:
                    for local, box_id in boxes:
                        moved += self._premove(dfd, local, f"{local}~{box_id}")
                    os.fsync(dfd)
                except OSError as e:
                    raise TickError(f"moving the Maildirs of {domain} to their format-2 homes failed: {e}") from None
                finally:
                    os.close(dfd)
        finally:
            os.close(rfd)
        if moved:
            self.log.info(
                f"format 2: moved {moved} Maildir(s) to <local>~<id> (symlinks at the old paths until the reload)"
            )

    @staticmethod
    def _premove(dfd: int, old: str, new: str) -> int:
        try:
            st = os.lstat(old, dir_fd=dfd)
        except FileNotFoundError:
            return 0  # never received mail
        if not stat.S_ISDIR(st.st_mode):
            return 0  # already a symlink (an earlier attempt), or not a Maildir
        try:
            os.lstat(new, dir_fd=dfd)
            return 0  # both exist (an interrupted run): merged after the reload
        except FileNotFoundError:
            pass
        os.rename(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.symlink(new, old, dir_fd=dfd)
        return 1

    def _settle_upgrade(self, rfd: int, domain: str, boxes: list[tuple[str, str]], unlink: bool) -> bool:
        """Merge any real directory at a format-1 path into the new home; with ``unlink``, also
        remove the upgrade's symlinks. False when a merge must wait (a delivery in progress)."""
        dfd = self._open_domain(rfd, domain)
        if dfd is None:
            return True
        done = True
        try:
            for local, box_id in boxes:
                new = f"{local}~{box_id}"
                try:
                    st = os.lstat(local, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    if unlink and os.readlink(local, dir_fd=dfd) == new:
                        os.unlink(local, dir_fd=dfd)
                elif stat.S_ISDIR(st.st_mode):
                    done = self._merge(rfd, dfd, domain, local, new) and done
        finally:
            os.close(dfd)
        return done

    def _merge(self, rfd: int, dfd: int, domain: str, old: str, new: str) -> bool:
        """Move every message under ``<domain>/<old>`` (``cur``/``new`` of every folder) into the
        same place under ``<domain>/<new>``; then the rest goes to the graveyard."""
        try:
            os.lstat(new, dir_fd=dfd)
        except FileNotFoundError:
            os.rename(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)  # the swap came first: the Maildir follows
            self.log.info(f"format 2: moved {domain}/{old} to {domain}/{new}")
            return True
        base = os.path.join(self.mail_root, domain)
        src_root, dst_root = os.path.join(base, old), os.path.join(base, new)
        moved, waiting = 0, False
        now = self.clock()
        for dirpath, _dirnames, filenames in os.walk(src_root):  # never follows symlinks
            leaf = os.path.basename(dirpath)
            if leaf == "tmp":
                waiting = waiting or any(self._young(os.path.join(dirpath, f), now) for f in filenames)
                continue
            if leaf not in ("cur", "new"):
                continue
            target = os.path.join(dst_root, os.path.relpath(dirpath, src_root))
            for name in sorted(filenames):
                src = os.path.join(dirpath, name)
                if not stat.S_ISREG(os.lstat(src).st_mode):
                    continue
                self._makedirs(target, dst_root)
                os.rename(src, os.path.join(target, self._free_name(target, name)))
                moved += 1
        if moved:
            self.log.info(
                f"format 2: merged {moved} message(s) delivered to {domain}/{old} during the move into {domain}/{new}"
            )
        if waiting:
            self.log.info(f"format 2: {domain}/{old}/.../tmp holds a delivery in progress; merging again next time")
            return False
        entry = self._bury(rfd, dfd, domain, old)
        self.log.info(f"format 2: the rest of {domain}/{old} (no messages) went to {GRAVEYARD}/{entry}")
        return True

    @staticmethod
    def _young(path: str, now: float) -> bool:
        try:
            return now - os.lstat(path).st_mtime < TMP_IN_PROGRESS
        except OSError:
            return False

    @staticmethod
    def _free_name(directory: str, name: str) -> str:
        """``name``, or (never in practice: Maildir names are unique) one made unique before ``:2,``."""
        if not os.path.lexists(os.path.join(directory, name)):
            return name
        stem, sep, info = name.partition(":")
        n = 2
        while os.path.lexists(os.path.join(directory, f"{stem}.merged{n}{sep}{info}")):
            n += 1
        return f"{stem}.merged{n}{sep}{info}"

    def _makedirs(self, path: str, top: str) -> None:
        """Create ``path`` (0700, owned by the mail user like every Maildir folder)."""
        if os.path.isdir(path) and not os.path.islink(path):
            return
        parent = os.path.dirname(path)
        if parent != top and parent.startswith(top + "/"):
            self._makedirs(parent, top)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        if os.geteuid() == 0:
            os.chown(path, self.cfg.mail_uid, self.cfg.mail_gid)

    def _settle_all(self, st: dict[str, Any], sha: str, unlink: bool) -> None:
        """Merge (and with ``unlink`` end) the upgrade watch of the domains in state.json."""
        ls = self._peek(st)
        watch = ls.get("upgrade")
        if not isinstance(watch, dict):
            return
        domains = [d for d in watch.get("domains", []) if isinstance(d, str)]
        tree = self._tree(sha, domains)
        rfd = self._open_root()
        if rfd is None:
            if unlink:
                ls.pop("upgrade", None)
            return
        done = True
        try:
            for domain, boxes in self._mailboxes(tree, domains).items():
                try:
                    done = self._settle_upgrade(rfd, domain, boxes, unlink) and done
                except (OSError, Refused, TickError) as e:
                    self.log.warning(f"format 2: cannot settle the Maildirs of {domain}: {e}; retrying later")
                    done = False
        finally:
            os.close(rfd)
        if unlink and done:
            ls.pop("upgrade", None)
            self.log.info(f"format 2: the upgrade's symlinks are gone ({len(domains)} domain(s))")

    # ---- the hooks a tick calls

    def after_reload(self, st: dict[str, Any], tip: str, previous: str | None) -> None:
        """The release of ``tip`` is live (swapped and reloaded); ``previous`` was live before.
        Record the settings, settle an upgrade, move what no mailbox owns. Never raises."""
        try:
            self._after_reload(st, tip, previous)
        except (OSError, Refused, TickError, ValueError, TypeError) as e:
            # The release is live either way; what did not move waits for the domain's next change.
            self.log.warning(f"mailbox lifecycle after applying {tip[:12]}: {e}; unowned Maildirs left in place")

    def _after_reload(self, st: dict[str, Any], tip: str, previous: str | None) -> None:
        ls = self._state(st)
        settings = self.settings(tip)
        if settings is None:
            ls.pop("purge_after_days", None)
            return
        ls["purge_after_days"] = settings.purge_after_days
        if not previous or previous == tip:
            return  # the first release on this node: nothing was live, nothing to compare with
        changed, upgraded = self._diff(previous, tip)
        if upgraded:
            watch = ls.get("upgrade")
            earlier = watch.get("domains", []) if isinstance(watch, dict) else []
            domains = sorted(set(upgraded) | {d for d in earlier if isinstance(d, str)})
            ls["upgrade"] = {"domains": domains, "until": self.clock() + UPGRADE_GRACE}
            self._settle_all(st, tip, unlink=False)
        if self.cfg.purge:
            changed = sorted(set(changed) | {d for d in ls.get("sweep", []) if isinstance(d, str)})
            if changed:
                self._sweep(st, tip, changed)

    def housekeeping(self, st: dict[str, Any]) -> None:
        """Every tick, before anything else: purge, retry what failed, end the upgrade's grace
        period when it is over. Cheap when there is nothing to do (one directory listing)."""
        ls = self._peek(st)
        applied = st.get("applied_commit")
        try:
            if self.cfg.purge:
                self.purge(st)
            if isinstance(applied, str) and applied:
                if self.cfg.purge and ls.get("sweep"):
                    self._sweep(st, applied, [d for d in ls["sweep"] if isinstance(d, str)])
                watch = ls.get("upgrade")
                if isinstance(watch, dict) and self.clock() >= float(watch.get("until", 0)):
                    self._settle_all(st, applied, unlink=True)
        except (OSError, Refused, TickError, ValueError, TypeError) as e:
            self.log.warning(f"mailbox lifecycle: {e}; retrying next tick")

    def purge(self, st: dict[str, Any]) -> int:
        """Delete the graveyard entries older than ``purge_after_days``; returns how many."""
        days = self._peek(st).get("purge_after_days")
        if not isinstance(days, int) or days < 0:
            return 0
        rfd = self._open_root()
        if rfd is None:
            return 0
        try:
            gfd = self._open_graveyard(rfd, create=False)
        finally:
            os.close(rfd)
        if gfd is None:
            return 0
        now = self.clock()
        purged = 0
        try:
            for name in sorted(os.listdir(gfd)):
                m = _ENTRY_RE.match(name)
                if m is None:
                    continue  # not ours: left alone
                import calendar  # here, not at the top: a no-op tick with an empty graveyard never needs it

                try:
                    moved_at = calendar.timegm(time.strptime(m.group(1), STAMP_FORMAT))
                except ValueError:
                    continue
                if now - moved_at < days * 86400:
                    continue
                st_ = os.lstat(name, dir_fd=gfd)
                if stat.S_ISDIR(st_.st_mode):
                    # rmtree's fd-based walk never follows a symlink inside the entry.
                    shutil.rmtree(os.path.join(self.graveyard, name))
                else:
                    os.unlink(name, dir_fd=gfd)
                purged += 1
                self.log.info(f"purged {GRAVEYARD}/{name} (purge_after_days = {days})")
        finally:
            os.close(gfd)
        return purged

    def _homed_elsewhere(self, sha: str) -> set[str]:
        """The domains whose home is another node: the release's IMAP proxy passdb lists exactly them."""
        from .fleetfiles import PROXY_PASSDB

        out: set[str] = set()
        try:
            with open(os.path.join(self.releases.dir, sha, "dovecot", PROXY_PASSDB), "rb") as fh:
                for line in fh:
                    out.add(line.split(b":", 1)[0].decode("ascii", "replace"))
        except FileNotFoundError:
            pass
        return out

    def usage(self, st: dict[str, Any]) -> list[dict[str, object]] | None:
        """The usage entries this tick measured (None when none is due, or this node does not
        report). A pass over every listed mailbox starts every ``usage_interval`` (its start
        time goes to state.json); each tick spends at most ``usage_budget_s`` on it and the next
        one continues where it stopped (usage.Scanner; ``usage_pass`` in state.json)."""
        if not self.cfg.report_url or self.cfg.usage_interval <= 0:
            return None
        ls = self._peek(st)
        applied = st.get("applied_commit")
        now = self.clock()
        last = ls.get("usage_at")
        if not isinstance(applied, str) or "purge_after_days" not in ls:
            return None  # nothing applied yet, or format 1 (no ids to report under)
        in_pass = isinstance(ls.get("usage_pass"), dict)  # usage.PASS_STATE (not imported for a tick with no usage due)
        if not in_pass and isinstance(last, (int, float)) and 0 <= now - last < self.cfg.usage_interval:
            return None
        from .usage import PASS_STATE, USAGE_CACHE_DIR, Scanner

        if not in_pass:
            ls["usage_at"] = now

        def listed() -> list[tuple[str, str, str]]:
            tree = self.releases.list_rendered(applied)  # once per usage pass: every mailbox
            # A domain homed on another node has its mail there: that node reports it (this one
            # would report the empty Maildirs it does not have, and the latest report counts).
            elsewhere = self._homed_elsewhere(applied)
            boxes = self._mailboxes(tree, sorted(d for d in tree if d not in elsewhere))
            if isinstance(ls.get("upgrade"), dict):
                self._settle_all(st, applied, unlink=False)
            return [(d, local, box_id) for d in boxes for local, box_id in boxes[d]]

        t0 = time.monotonic()
        scanner = Scanner(self.mail_root, os.path.join(self.cfg.root, USAGE_CACHE_DIR), self.cfg.usage_budget_s)
        try:
            out = scanner.step(ls, applied, listed)
        except (OSError, Refused, TickError) as e:
            ls.pop(PASS_STATE, None)
            self.log.warning(f"usage: cannot list the mailboxes of {applied[:12]}: {e}")
            return None
        left = "; pass continues next tick" if PASS_STATE in ls else ""
        self.log.info(
            f"usage: measured {len(out)} mailbox(es) in {time.monotonic() - t0:.2f}s"
            f" ({scanner.listed} listing(s), {scanner.hits} folder(s) unchanged){left}"
        )
        return out
