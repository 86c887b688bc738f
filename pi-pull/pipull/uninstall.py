"""``pi_pull.py uninstall``: undo what ``install`` recorded in ``<etc_dir>/install.json``.

Every file install changed is put back byte for byte from its backup, if nobody changed it
since install; a file edited since keeps the operator's edits and loses only install's
(postconf back to the original values, the Dovecot marker lines restored). Files install
created are removed, then the directories it created if they are empty. The mail root (the
Maildirs) and the release root are kept.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from typing import Any

from . import hostconf
from .certs import uninstall_acme
from .install import (
    BACKUP_DIR,
    RECORD,
    Host,
    Options,
    Record,
    Steps,
    _say,
    code_cache_dir,
    file_mode,
    read_bytes,
    run,
    sha256,
)
from .runner import Runner
from .services import systemd_running

TIMER = "pi-pull.timer"
SERVICE = "pi-pull.service"
FOLLOW = "pi-pull-follow.service"
POLICY = "pi-pull-policy.service"


class Uninstaller:
    """One ``uninstall`` run over the record of ``opts.dirs['etc_dir']``."""

    def __init__(self, opts: Options, runner: Runner | None = None, out: Callable[[str], None] = _say) -> None:
        self.opts = opts
        self.runner = runner or Runner()
        self.steps = Steps(opts.dry_run, out)
        self.record = Record(os.path.join(opts.dirs["etc_dir"], RECORD))
        self.host = Host(opts, self.record, self.steps)

    def run(self) -> int:
        """Undo every recorded step; returns the number of changes (made, or to make in a dry run)."""
        if not self.record.exists:
            self.steps.note(f"not installed: no {self.record.path}, nothing to undo")
            return 0
        data = self.record.data
        use_systemd = self.opts.start and (systemd_running() if self.opts.systemd is None else self.opts.systemd)
        if use_systemd:
            self.stop_units()
        uninstall_acme(data, self.steps, self.runner)  # first: no renewal may run the hook while it goes
        for dest, edit in sorted(data.get("edits", {}).items()):
            self.undo_edit(dest, edit)
        for dest, entry in sorted(data.get("files", {}).items()):
            self.undo_file(dest, entry)
        self.remove_own_files()
        self.remove_code_cache()
        self.remove_milter_socket(data.get("milter_dir"))
        for path in reversed(data.get("dirs", [])):
            self.remove_dir(path)
        if use_systemd:
            self.restart_services()
        elif self.opts.start:
            self.steps.note(
                "systemd is not running: restart postfix and dovecot yourself so they drop the mailstate settings"
            )
        else:
            self.steps.note("--no-start: stop the timer and restart postfix and dovecot yourself")
        self.keep_notes(data)
        return self.steps.changes

    # ---- systemd

    def stop_units(self) -> None:
        for unit in (FOLLOW, TIMER, POLICY):
            if self.runner.run([self.opts.systemctl, "is-enabled", "--quiet", unit], timeout=30).returncode == 0:
                if self.steps.change(f"systemctl disable --now {unit}"):
                    run(self.runner, [self.opts.systemctl, "disable", "--now", unit])
        if self.runner.run([self.opts.systemctl, "is-active", "--quiet", SERVICE], timeout=30).returncode == 0:
            if self.steps.change(f"systemctl stop {SERVICE}"):
                run(self.runner, [self.opts.systemctl, "stop", SERVICE])

    def restart_services(self) -> None:
        if self.steps.change("systemctl daemon-reload"):
            run(self.runner, [self.opts.systemctl, "daemon-reload"])
        # OpenDKIM too when install put the bundle's opendkim.conf in place (now the original again).
        dkim = any(dest.endswith("/opendkim.conf") for dest in self.record.data.get("files", {}))
        rspamd = bool(self.record.data.get("rspamd"))  # back on its own local.d (the originals restored)
        for svc in ("postfix", "dovecot", *(("opendkim",) if dkim else ()), *(("rspamd",) if rspamd else ())):
            if self.runner.run([self.opts.systemctl, "is-active", "--quiet", svc], timeout=30).returncode != 0:
                continue
            if self.steps.change(f"systemctl restart {svc} (back to its own configuration)"):
                ok, text = run(self.runner, [self.opts.systemctl, "restart", svc], timeout=300)
                if not ok:
                    self.steps.note(f"warning: systemctl restart {svc} failed: {text}")

    # ---- files

    def undo_edit(self, dest: str, edit: dict[str, Any]) -> None:
        """A host config file install edited: restore the backup, or (edited since) only undo install's part."""
        current = read_bytes(dest)
        backup = edit.get("backup")
        if current is None:
            self.steps.note(f"{dest} is gone already")
            return
        if sha256(current) == edit.get("after"):
            if backup is None:
                if self.steps.change(f"remove {dest} (install created it)"):
                    os.unlink(dest)
            else:
                self.restore(dest, backup)
            return
        new = self.reverse(dest, current, edit)
        self.steps.note(f"{dest} changed since install: keeping those changes, undoing only install's")
        if new != current and self.steps.change(f"undo install's edit of {dest}"):
            self.host.write(dest, new, file_mode(dest) or 0o644)

    def reverse(self, dest: str, current: bytes, edit: dict[str, Any]) -> bytes:
        kind = edit.get("kind")
        if kind == "postfix-main":
            return hostconf.revert_main_cf(self.runner, current, edit.get("keys", {}))
        if kind == "postfix-master":
            main = read_bytes(os.path.join(os.path.dirname(dest), "main.cf")) or b""
            return hostconf.revert_master_cf(self.runner, main, current, edit.get("keys", {}))
        if kind == "dovecot-auth":
            return hostconf.restore_auth_system(current)
        if kind == "dovecot-include":
            return hostconf.remove_include(current)
        return current

    def restore(self, dest: str, backup: str) -> None:
        data = read_bytes(backup)
        if data is None:
            self.steps.note(f"warning: the backup {backup} of {dest} is missing; leaving {dest} as it is")
            return
        if self.steps.change(f"restore {dest} as it was before install"):
            self.host.write(dest, data, file_mode(backup) or 0o644)
            shutil.copystat(backup, dest)

    def undo_file(self, dest: str, entry: dict[str, Any]) -> None:
        backup = entry.get("backup")
        if backup:
            self.restore(dest, backup)
            return
        if read_bytes(dest) is None:
            return
        digest = entry.get("sha256")
        changed = " (changed since install)" if digest and sha256(read_bytes(dest) or b"") != digest else ""
        if self.steps.change(f"remove {dest}{changed}"):
            os.unlink(dest)

    def remove_code_cache(self) -> None:
        """pi_pull.py's unpacked sources and bytecode (its __main__ made them; nothing else uses them)."""
        where = code_cache_dir()
        if where and os.path.isdir(where) and self.steps.change(f"remove {where} (pi_pull.py's code cache)"):
            shutil.rmtree(where, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(where))  # /var/cache/pi-pull, if nothing else is in it
            except OSError:
                pass

    def remove_own_files(self) -> None:
        """The record and the backups (after they served), last."""
        backups = os.path.join(self.opts.dirs["etc_dir"], BACKUP_DIR)
        if os.path.isdir(backups) and self.steps.change(f"remove {backups} (the originals are restored)"):
            shutil.rmtree(backups)
        if self.steps.change(f"remove {self.record.path}"):
            os.unlink(self.record.path)

    def remove_dir(self, path: str) -> None:
        if not os.path.isdir(path):
            return
        if self.opts.dry_run:
            self.steps.change(f"remove directory {path} (if nothing else is left in it)")
            return
        leftover = sorted(os.listdir(path))
        if leftover:
            self.steps.note(f"kept {path}: it holds files install did not put there ({', '.join(leftover[:5])})")
            return
        self.steps.change(f"remove directory {path}")
        os.rmdir(path)

    def remove_milter_socket(self, path: object) -> None:
        """rspamd's milter socket (main.cf no longer names it), so that its directory can go too."""
        if not isinstance(path, str) or not os.path.isdir(path):
            return
        for name in sorted(os.listdir(path)):
            where = os.path.join(path, name)
            if stat.S_ISSOCK(os.lstat(where).st_mode) and self.steps.change(f"remove rspamd's milter socket {where}"):
                os.unlink(where)

    def keep_notes(self, data: dict[str, Any]) -> None:
        mail_root = data.get("mail_root")
        if mail_root:
            self.steps.note(
                f"kept the mail root {mail_root} and the Maildirs in it (remove them by hand if they are not needed)"
            )
        root = data.get("release_root")
        if root and os.path.isdir(root):
            self.steps.note(
                f"kept the release root {root} (mirror, releases, state.json): `rm -rf {root}` when it is not needed"
            )
