"""Mailbox owners' files on the node: Sieve scripts and app passwords, beside the releases.

    <root>/sieve/<domain>/<local>.sieve            each mailbox's script (Dovecot's per-user
                                                    `sieve`, the bundle's userdb override_fields;
                                                    Dovecot keeps its compiled binary in the
                                                    mailbox's home, ~/.mailstate-sieve)
    <root>/app-passwords/<domain>                  the domain's app passwords (the passdbs'
                                                    passwd-file); an empty file for every other
                                                    enabled domain (Dovecot logs a missing one on
                                                    every login)
    <root>/owners.json                             the commit these files follow

Why beside the releases, not in them: a change to one mailbox's filters then costs one file,
whatever the size of the state (a release would have to link every script).

A tick validates the commit's fragments before the swap (``stage``: pipull/sieve.py and
apppass.py; a refusal refuses the whole commit, nothing is written) and writes them once the
release is live (``apply``), so a rollback never meets them. Only what changed between the
commit in owners.json and the new one is read (``git diff-tree``); without a usable owners.json
(a node's first apply, an upgrade of pi-pull) every domain is read and the directories are made
to match. Each file is replaced by rename. A script gets an mtime a little in the future
(SCRIPT_AHEAD_S): Pigeonhole runs a binary only when it is newer than its script, so a binary that
a delivery compiled from the old script while the new one was written is never taken for it.
A tick whose owners.json lags behind the applied commit (a failure after the swap) catches up.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import Refused, TickError
from .fsutil import atomic_write, rmtree, write_file
from .mirror import Mirror
from .rules import is_domain, is_local_part
from .runner import Runner, short

SIEVE_DIR = "sieve"
APP_DIR = "app-passwords"
MARKER = "owners.json"
EMPTY = ".empty"  # the placeholder every enabled domain without app passwords links to
VMD = "virtual_mailbox_domains"  # every enabled domain has one: a domain's presence
SIEVE_FRAGMENT = "sieve_scripts"  # pipull/sieve.py
APP_FRAGMENT = "app_passwords"  # pipull/apppass.py
_WATCHED = (VMD, SIEVE_FRAGMENT, APP_FRAGMENT)
APP_USES_KEPT = 1000
SCRIPT_AHEAD_S = 2  # a new script's mtime is this far ahead of now (see the module docstring)
FSYNC_EACH = 16  # up to this many new scripts are fsynced one by one; more: one os.sync()


@dataclass
class DomainFiles:
    """One domain's owner files as the new commit has them: None leaves a kind as it is."""

    present: bool
    scripts: dict[str, bytes] | None = None
    app: bytes | None = None


@dataclass
class Staged:
    commit: str
    full: bool = False
    domains: dict[str, DomainFiles] = field(default_factory=dict)
    seconds: float = 0.0  # what reading and validating took (for the log)


class OwnerFiles:
    def __init__(self, cfg: Config, mirror: Mirror, runner: Runner, log: logging.Logger) -> None:
        self.cfg = cfg
        self.mirror = mirror
        self.runner = runner
        self.log = log
        self.sieve_dir = os.path.join(cfg.root, SIEVE_DIR)
        self.app_dir = os.path.join(cfg.root, APP_DIR)
        self.marker_path = os.path.join(cfg.root, MARKER)
        self._unsynced: list[str] = []  # scripts written by this apply, not yet fsynced

    # ---- owners.json

    def marker(self) -> dict[str, Any]:
        try:
            with open(self.marker_path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def behind(self, applied: str | None) -> bool:
        """True when the files do not follow ``applied`` yet."""
        return bool(applied) and self.marker().get("commit") != applied

    # ---- stage: read and validate what changed (before the swap)

    def stage(self, tip: str) -> Staged:
        base = self.marker().get("commit")
        if isinstance(base, str) and base == tip:
            return Staged(tip)
        if isinstance(base, str) and self.mirror.has_commit(base) and self.mirror.is_ancestor(base, tip):
            return self._read(Staged(tip), self._diff(base, tip))
        return self._read(Staged(tip, full=True), self._listing(tip))

    def _diff(self, base: str, tip: str) -> dict[str, dict[str, str]]:
        """{domain: {file: new blob id, "" when gone}} of the watched files that differ."""
        r = self.mirror.git(
            "diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", base, tip, "--", "rendered/domains/"
        )
        if r.returncode != 0:
            raise TickError(f"git diff-tree {base[:12]} {tip[:12]} failed: {short(r.stderr)}")
        out: dict[str, dict[str, str]] = {}
        fields = r.stdout.split(b"\0")
        for i in range(0, len(fields) - 1, 2):
            place = self._place(fields[i + 1])
            if place is not None:
                new = fields[i].decode("ascii", "replace").split()[3]
                out.setdefault(place[0], {})[place[1]] = "" if not new.strip("0") else new
        return out

    def _listing(self, tip: str) -> dict[str, dict[str, str]]:
        r = self.mirror.git("ls-tree", "-r", "-z", tip, "--", "rendered/domains/")
        if r.returncode != 0:
            raise TickError(f"git ls-tree {tip[:12]} failed: {short(r.stderr)}")
        out: dict[str, dict[str, str]] = {}
        for entry in r.stdout.split(b"\0"):
            meta, _, path = entry.partition(b"\t")
            place = self._place(path)
            if place is not None:
                out.setdefault(place[0], {})[place[1]] = meta.decode("ascii", "replace").split()[2]
        return out

    @staticmethod
    def _place(path: bytes) -> tuple[str, str] | None:
        parts = path.decode("utf-8", "replace").split("/")
        if len(parts) != 5 or parts[4] not in _WATCHED:
            return None
        if not is_domain(parts[3]) or parts[2] != parts[3][:2]:
            raise Refused("unsafe or misplaced domain directory {!r}".format("/".join(parts[:4])))
        return parts[3], parts[4]

    def _read(self, staged: Staged, changes: dict[str, dict[str, str]]) -> Staged:
        # Imported here: a tick without a commit to apply (every minute) needs neither.
        from . import apppass, sieve

        limit = self.cfg.max_file_bytes
        with self.mirror.batch() as cat:
            for domain, files in sorted(changes.items()):
                present = bool(files.get(VMD)) if (staged.full or VMD in files) else True
                entry = DomainFiles(present)
                oid = files.get(SIEVE_FRAGMENT)
                where = f"rendered/domains/{domain[:2]}/{domain}/"
                if oid:
                    entry.scripts = sieve.parse_fragment(domain, cat.read(oid, where + SIEVE_FRAGMENT, limit))
                elif staged.full or SIEVE_FRAGMENT in files:
                    entry.scripts = {}
                oid = files.get(APP_FRAGMENT)
                if oid:
                    entry.app = cat.read(oid, where + APP_FRAGMENT, limit)
                    apppass.check_fragment(domain, entry.app)
                elif staged.full or APP_FRAGMENT in files:
                    entry.app = b""
                staged.domains[domain] = entry
        return staged

    # ---- apply: write what was staged (after the release is live)

    def apply(self, staged: Staged) -> str:
        """Make the directories follow ``staged.commit``; a one-line summary for the log."""
        for top in (self.sieve_dir, self.app_dir):
            os.makedirs(top, mode=0o755, exist_ok=True)
        empty = os.path.join(self.app_dir, EMPTY)
        if not os.path.isfile(empty):
            atomic_write(empty, b"", 0o644)
        scripts = apps = 0
        self._unsynced = []
        # How many domains have app passwords (a node without any never asks Dovecot's stats).
        count = 0 if staged.full else int(self.marker().get("app_domains") or 0)
        for domain, entry in sorted(staged.domains.items()):
            had = 0 if staged.full else int(bool(_size(os.path.join(self.app_dir, domain))))
            if not entry.present:
                self._remove(domain)
                count -= had
                continue
            apps += self._write_app(domain, entry.app)
            count += int(bool(_size(os.path.join(self.app_dir, domain)))) - had
            if entry.scripts is not None:
                scripts += self._write_scripts(domain, entry.scripts)
        if staged.full:
            self._sweep(staged.domains)
        self._flush()
        marker = {"commit": staged.commit, "app_domains": max(0, count)}
        atomic_write(self.marker_path, (json.dumps(marker, sort_keys=True) + "\n").encode(), 0o644)
        return f"owners: {scripts} sieve script(s) and {apps} app password file(s) written"

    def _flush(self) -> None:
        """Make the new scripts durable before the marker says this commit is applied: a few
        are fsynced one by one, a whole first apply (thousands) with one os.sync()."""
        unsynced, self._unsynced = self._unsynced, []
        if not self.cfg.sync or not unsynced:
            return
        if len(unsynced) > FSYNC_EACH:
            os.sync()
            return
        for path in unsynced:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remove(self, domain: str) -> None:
        for path in (os.path.join(self.sieve_dir, domain), os.path.join(self.app_dir, domain)):
            if os.path.lexists(path):
                rmtree(path)

    def _sweep(self, domains: dict[str, DomainFiles]) -> None:
        """After a full read: what belongs to no enabled domain of the commit goes."""
        keep = {d for d, e in domains.items() if e.present}
        for top in (self.sieve_dir, self.app_dir):
            for name in os.listdir(top):
                if name not in keep and not name.startswith("."):
                    rmtree(os.path.join(top, name))

    def _write_app(self, domain: str, data: bytes | None) -> int:
        """The domain's passwd-file for the app-password passdbs; an empty one (linked) when it has none."""
        path = os.path.join(self.app_dir, domain)
        if not data:
            # None: unchanged, but a domain enabled just now still needs its empty file.
            if data is None and not os.path.exists(path):
                os.link(os.path.join(self.app_dir, EMPTY), path)
            elif data == b"" and _read_or_none(path) != b"":
                tmp = f"{path}.tmp-{os.getpid()}"
                _unlink(tmp)
                os.link(os.path.join(self.app_dir, EMPTY), tmp)
                os.replace(tmp, path)
            return 0
        if _read_or_none(path) == data:
            return 0
        old = _mtime(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        _unlink(tmp)
        atomic_write(tmp, data, 0o640 if self.cfg.passwd_group else 0o644)
        _owned_by_group(tmp, self.cfg.passwd_group)
        # Dovecot re-reads a passwd-file when its mtime (whole seconds) or its size changed: a
        # new version always gets a later second, so a same-size replacement is never missed.
        _later_than(tmp, old)
        os.replace(tmp, path)
        return 1

    def _write_scripts(self, domain: str, scripts: dict[str, bytes]) -> int:
        where = os.path.join(self.sieve_dir, domain)
        if not scripts:
            if os.path.lexists(where):
                rmtree(where)
            return 0
        os.makedirs(where, mode=0o755, exist_ok=True)
        for name in os.listdir(where):
            local, dot, ext = name.rpartition(".")
            if not dot or local not in scripts or ext != "sieve":
                os.unlink(os.path.join(where, name))
        written = 0
        for local, data in sorted(scripts.items()):
            if not is_local_part(local):  # checked by sieve.parse_fragment; the name becomes a path
                raise Refused(f"unsafe local part {local[:64]!r}")
            script = os.path.join(where, f"{local}.sieve")
            if _read_or_none(script) == data:
                continue
            tmp = f"{script}.tmp-{os.getpid()}"
            _unlink(tmp)
            write_file(tmp, data, 0o644)  # made durable by _flush, before the marker moves
            self._unsynced.append(script)
            ahead = time.time() + SCRIPT_AHEAD_S
            os.utime(tmp, (ahead, ahead))
            os.replace(tmp, script)
            written += 1
        return written

    # ---- app password use (for the report)

    def app_password_uses(self, st: dict[str, Any], now: float) -> list[dict[str, Any]] | None:
        """The app passwords that logged in since the last look (Dovecot's stats), queued in
        state.json until a report carries them; None when this node has no app passwords."""
        pending = [u for u in st.get("app_uses_pending", []) if isinstance(u, dict)]
        if not self.marker().get("app_domains"):
            return pending or None
        r = self.runner.run([*shlex.split(self.cfg.doveadm), "stats", "dump"], timeout=30)
        if r.returncode != 0:
            self.log.warning(f"doveadm stats dump failed: {short(r.stderr) or f'rc={r.returncode}'}")
            return pending or None
        from .apppass import logins, new_uses

        counts = logins(r.stdout)
        kept = st.get("app_logins")
        before: dict[str, int] = kept if isinstance(kept, dict) else {}
        for user, slot in new_uses(before, counts):
            pending.append({"email": user, "slot": slot, "used_at": int(now)})
        if counts != before:
            st["app_logins"] = counts
        st["app_uses_pending"] = pending[-APP_USES_KEPT:]
        return st["app_uses_pending"] or None


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _later_than(path: str, previous: float) -> float:
    """Give ``path`` an mtime in a later whole second than ``previous`` (now, if that is later)."""
    when = float(max(int(os.stat(path).st_mtime), int(previous) + 1))
    os.utime(path, (when, when))
    return when


def _owned_by_group(path: str, group: str) -> None:
    if not group:
        return
    import grp

    os.chown(path, 0 if os.geteuid() == 0 else -1, grp.getgrnam(group).gr_gid)
