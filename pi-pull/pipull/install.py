"""``pi_pull.py install`` and ``uninstall``: put a node bundle on this machine, and take it off.

Install reads the bundle's manifest (``bundle.json``, written by ``mailstate node bundle``) and
brings the machine to the state it describes, one step at a time. Each step first computes what
the file or directory should be, compares it with what is there, and only then changes it:

- the files (config, allowed_signers, the agent, the units, the Dovecot snippet), exact modes;
- the sync key file, mode 0600 (the key is read from stdin or a file, never printed or logged,
  never in a child's argv);
- Postfix: main.cf gets the bundle's lines through ``postconf -e`` (on a temp copy, so a dry
  run can show the result); a missing main.cf ("No configuration") starts from the bundle's
  minimal one, a missing master.cf from Postfix's own master.cf.dist;
- Dovecot: the snippet is included (conf.d/*.conf, or an added ``!include`` line) and
  ``!include auth-system.conf.ext`` in conf.d/10-auth.conf is commented out with a marker;
- the mail root, owned by the state's uid/gid;
- the node's certificate at the bundle's TLS paths (certs.py): from an ACME server with certbot
  (``--acme-email``, renewed by certbot, whose deploy hook reloads Postfix and Dovecot), or
  self-signed when there is none, so that both start;
- systemd, when it runs: daemon-reload, (re)start Postfix and Dovecot, enable the timer;
- a first tick.

A dry run prints the same steps as "would ..." and writes nothing. A second install finds
every step done and says "already installed". What install changed is recorded in
``<etc_dir>/install.json`` with a copy of every host file it changed as it was before
(``<etc_dir>/backup/``), so uninstall restores those files byte for byte. It keeps the mail
root (the Maildirs) and the release root, and says so.
"""

from __future__ import annotations

import configparser
import grp
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import certs, hostconf, postscreen
from .errors import ConfigError, TickError
from .fsutil import atomic_write
from .runner import Runner, short
from .services import systemd_running

MANIFEST = "bundle.json"
RECORD = "install.json"
BACKUP_DIR = "backup"
MASTER_CF_DIST = ("/usr/share/postfix/master.cf.dist",)
# pi_pull.py's code cache (its __main__, written by compiler/node_bundle.py): one directory per
# version of pi_pull.py, named by the first 32 hex digits of its SHA-256. Install leaves older
# versions' directories (~1 MB each) in place: a tick of the old version may be running and
# import a module from it; uninstall removes the cache.
CODE_CACHE = "/var/cache/pi-pull/code"
# Empty tables until the first tick (Installer.make_empty_tables): the maps main.cf lists per bucket.
PLACEHOLDER = "placeholder"
PLACEHOLDER_MAPS = (
    "virtual_mailbox_domains",
    "virtual_mailbox_maps",
    "virtual_alias_maps",
    "sender_login_maps",
    "fleet_transport",
    "fleet_defer",
)
FLEET_TABLES = ("tls_policy", "ccerts")  # pipull/fleet.py writes them; empty until the node is in a fleet
# The bundle's Sieve scripts install precompiles, with sievec's extra arguments: the IMAPSieve
# scripts need the plugins and extensions the bundle's Dovecot snippet gives global scripts only.
IMAPSIEVE_FLAGS = (
    "-P",
    "sieve_imapsieve",
    "-P",
    "sieve_extprograms",
    "-x",
    "+vnd.dovecot.pipe +copy +imapsieve +environment +variables",
)
SIEVE_SCRIPTS: dict[str, tuple[str, ...]] = {
    "junk.sieve": (),
    "learn-spam.sieve": IMAPSIEVE_FLAGS,
    "learn-ham.sieve": IMAPSIEVE_FLAGS,
}
# Port 25's milter socket (the bundle's manifest "rspamd": "milter_dir"): rspamd's user, Postfix's group.
RSPAMD_USER = "_rspamd"
POSTFIX_GROUP = "postfix"
MILTER_DIR_MODE = 0o2750
DIR_KEYS = ("etc_dir", "lib_dir", "systemd_dir", "postfix_dir", "dovecot_dir", "rspamd_dir")


class InstallError(TickError):
    """An install or uninstall step failed (exit 1); the steps before it are done and recorded."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def file_mode(path: str) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


@dataclass
class Bundle:
    """A bundle folder and its checked manifest."""

    path: str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str) -> Bundle:
        """Read ``<path>/bundle.json`` and check every listed file's SHA-256 (a damaged copy is refused)."""
        raw = read_bytes(os.path.join(path, MANIFEST))
        if raw is None:
            raise ConfigError(
                f"{path} is not a node bundle: {MANIFEST} is missing (write one with `mailstate node bundle`)"
            )
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{path}/{MANIFEST} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != 1:
            raise ConfigError(
                f"{path}/{MANIFEST}: unsupported bundle format {manifest.get('format') if isinstance(manifest, dict) else '?'}; "
                "use the pi_pull.py from the same bundle"
            )
        for entry in manifest.get("files", []):
            if (
                not isinstance(entry, dict)
                or entry.get("dir") not in DIR_KEYS
                or not isinstance(entry.get("name"), str)
                or entry["name"].startswith("/")
                or ".." in entry["name"].split("/")
                or not re.fullmatch(r"0[0-7]{3}", str(entry.get("mode", "")))
            ):
                raise ConfigError(f"{path}/{MANIFEST}: a bad files entry {entry!r}")
        bundle = cls(path, manifest)
        for name, digest in sorted(manifest.get("sha256", {}).items()):
            data = bundle.read(name)
            if sha256(data) != digest:
                raise ConfigError(f"bundle file {name} does not match {MANIFEST} (damaged or partly copied bundle?)")
        return bundle

    def read(self, name: str) -> bytes:
        if name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"{MANIFEST} names an unsafe file {name!r}")
        data = read_bytes(os.path.join(self.path, name))
        if data is None:
            raise ConfigError(f"bundle file {name} is missing from {self.path}")
        return data


@dataclass
class Options:
    """Where things go (every directory overridable, so tests run against temp dirs) and what to do."""

    dirs: dict[str, str] = field(default_factory=dict)
    mail_root: str = ""
    dry_run: bool = False
    start: bool = True
    tick: bool = True
    systemd: bool | None = None  # None: detect (systemd_running())
    postconf: str = "postconf"
    doveconf: str = "doveconf"
    opendkim: str = "opendkim"
    sievec: str = "sievec"  # Pigeonhole (dovecot-sieve): the bundle's Dovecot runs Sieve on delivery
    rspamadm: str = "rspamadm"  # rspamd: the bundle's port 25 milter (a bundle with rspamd files)
    systemctl: str = "systemctl"
    # The node's certificate (certs.py): from ACME when `acme` is set, else self-signed for mail_host.
    acme: certs.Acme | None = None
    mail_host: str = ""
    certbot: str = "certbot"
    openssl: str = "openssl"


class Record:
    """``<etc_dir>/install.json``: what install changed, so uninstall can undo exactly that."""

    def __init__(self, path: str) -> None:
        self.path = path
        raw = read_bytes(path)
        self.data: dict[str, Any] = {"format": 1, "files": {}, "edits": {}, "dirs": []}
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except ValueError:
                raise ConfigError(f"{path} is damaged (not JSON): fix or remove it by hand") from None
            if isinstance(loaded, dict):
                self.data.update(loaded)
        self.original = self.dump()

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def dump(self) -> bytes:
        return (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode()

    def save(self) -> bool:
        """Write the record if it changed (atomically, 0600: it names backups); True if written."""
        data = self.dump()
        if data == self.original and self.exists:
            return False
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        atomic_write(self.path, data, 0o600)
        self.original = data
        return True


class Steps:
    """Prints each step (``would ...`` in a dry run) and counts what changed."""

    def __init__(self, dry_run: bool, out: Callable[[str], None]) -> None:
        self.dry_run = dry_run
        self.out = out
        self.changes = 0

    def change(self, what: str) -> bool:
        """Announce a change; True if it should be made now (not a dry run)."""
        self.changes += 1
        self.out(("would " if self.dry_run else "") + what)
        return not self.dry_run

    def done(self, what: str) -> None:
        self.out(f"already installed: {what}")

    def note(self, what: str) -> None:
        self.out(what)


class Host:
    """File operations shared by install and uninstall: backups, exact-mode writes, removals."""

    def __init__(self, opts: Options, record: Record, steps: Steps) -> None:
        self.opts = opts
        self.record = record
        self.steps = steps

    def backup_path(self, dest: str) -> str:
        return os.path.join(self.opts.dirs["etc_dir"], BACKUP_DIR, dest.lstrip("/"))

    def keep_original(self, dest: str) -> str | None:
        """Copy ``dest`` as it is before install first touches it; returns the backup path (None: no file)."""
        if read_bytes(dest) is None:
            return None
        backup = self.backup_path(dest)
        if not os.path.exists(backup):
            os.makedirs(os.path.dirname(backup), mode=0o700, exist_ok=True)
            shutil.copy2(dest, backup)
        return backup

    def write(self, dest: str, data: bytes, mode: int) -> None:
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        atomic_write(dest, data, mode)

    def make_dir(self, path: str, mode: int = 0o755) -> None:
        """Create ``path`` (and parents), recording the ones install created so uninstall removes them."""
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path.rstrip("/"))
        if parent and parent != path:
            self.make_dir(parent, mode)
        if self.steps.change(f"create directory {path} ({mode:04o})"):
            os.mkdir(path, mode)
            os.chmod(path, mode)
            self.record.data["dirs"].append(path)

    def put_file(self, dest: str, data: bytes, mode: int, label: str = "", secret: bool = False) -> bool:
        """Install ``data`` at ``dest`` with ``mode``; returns True if something changed.

        A ``secret`` (the sync key) gets no digest in the record: nothing that verifies it is kept."""
        what = f"{dest} ({mode:04o}){label}"
        old = read_bytes(dest)
        if old == data and file_mode(dest) == mode:
            self.steps.done(what)
            return False
        verb = "install" if old is None else ("replace" if old != data else "chmod")
        if self.steps.change(f"{verb} {what}"):
            entry = self.record.data["files"].get(dest)
            if entry is None:
                entry = {"backup": self.keep_original(dest)}
                self.record.data["files"][dest] = entry
            self.write(dest, data, mode)
            entry["sha256"] = None if secret else sha256(data)
        return True

    def edit_file(
        self, dest: str, new: bytes, mode: int, what: str, extra: dict[str, Any] | None = None, done: str = ""
    ) -> bool:
        """Change a host config file (main.cf, 10-auth.conf, ...) to ``new``, keeping the original once."""
        old = read_bytes(dest)
        if old == new:
            self.steps.done(done or dest)
            return False
        if self.steps.change(what):
            edit = self.record.data["edits"].get(dest)
            if edit is None:
                edit = {"backup": self.keep_original(dest)}
                self.record.data["edits"][dest] = edit
            for key, value in (extra or {}).items():
                edit.setdefault(key, value)
            self.write(dest, new, file_mode(dest) or mode)
            edit["after"] = sha256(new)
        return True


def code_cache_dir() -> str:
    """pi_pull.py's code cache (PI_PULL_CODE_CACHE as its __main__ reads it); "" when off."""
    where = os.environ.get("PI_PULL_CODE_CACHE", CODE_CACHE)
    return where if where.startswith("/") and where != "/" else ""


def _say(line: str) -> None:
    print(line, flush=True)


def resolve_dirs(bundle: Bundle, overrides: dict[str, str]) -> dict[str, str]:
    """The install directories: the bundle's defaults, each replaced by its option if given."""
    defaults = bundle.manifest.get("dirs", {})
    dirs = {}
    for key in DIR_KEYS:
        value = overrides.get(key) or defaults.get(key)
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"--{key.replace('_', '-')} must be an absolute path")
        dirs[key] = value.rstrip("/") or "/"
    return dirs


def relocate(data: bytes, defaults: dict[str, str], dirs: dict[str, str]) -> bytes:
    """Point a config/unit file at the chosen directories instead of the bundle's defaults."""
    for key in ("etc_dir", "lib_dir"):
        old, new = defaults.get(key, ""), dirs[key]
        if old and old != new:
            data = data.replace(old.rstrip("/").encode() + b"/", new.rstrip("/").encode() + b"/")
    return data


def opendkim_tables(conf: bytes) -> list[str]:
    """The files an opendkim.conf names as its KeyTable and SigningTable (``file:``/``refile:`` or a plain path)."""
    out = []
    for line in conf.decode("utf-8", "replace").splitlines():
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[0].lower() not in ("keytable", "signingtable"):
            continue
        kind, colon, path = parts[1].strip().partition(":")
        if not colon:
            path = kind
        elif kind not in ("file", "refile"):
            continue  # another dataset type (a database, an inline list): no file to make
        if path.startswith("/"):
            out.append(path)
    return out


def read_sync_key_input(source: str | None, stdin_tty: bool | None = None) -> str | None:
    """The sync key from ``source`` ("-" = stdin; a terminal gets a prompt that does not echo)."""
    if source is None:
        return None
    if source == "-":
        if stdin_tty if stdin_tty is not None else sys.stdin.isatty():
            import getpass

            text = getpass.getpass("sync key (from add-node; not echoed): ")
        else:
            text = sys.stdin.read(4096)
    else:
        data = read_bytes(source)
        if data is None:
            raise ConfigError(f"sync key file {source} does not exist")
        text = data.decode("utf-8", "replace")
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError("the sync key must be one non-empty word (as printed by add-node)")
    return key


def run(runner: Runner, argv: list[str], timeout: float = 120) -> tuple[bool, str]:
    """Run a command; (ok, its output shortened)."""
    r = runner.run(argv, timeout=timeout)
    return r.returncode == 0, short(r.stderr + r.stdout) or f"rc={r.returncode}"


class Installer:
    """One ``install`` run: ``run()`` goes through the steps in order and returns what changed."""

    def __init__(
        self,
        bundle: Bundle,
        opts: Options,
        runner: Runner | None = None,
        sync_key: str | None = None,
        out: Callable[[str], None] = _say,
    ) -> None:
        self.bundle = bundle
        self.opts = opts
        self.runner = runner or Runner()
        self.sync_key = sync_key
        self.steps = Steps(opts.dry_run, out)
        self.record = Record(os.path.join(opts.dirs["etc_dir"], RECORD))
        self.host = Host(opts, self.record, self.steps)
        self.changed: set[str] = set()  # "postfix", "dovecot", "units", "agent"
        self.m = bundle.manifest

    def path(self, key: str, name: str) -> str:
        return os.path.join(self.opts.dirs[key], name)

    @property
    def filters_spam(self) -> bool:
        """The bundle filters port 25 with rspamd (it ships rspamd's local.d files)."""
        return isinstance(self.m.get("rspamd"), dict)

    @property
    def config_file(self) -> str:
        return self.path("etc_dir", "pi-pull.ini")

    def bundle_config(self) -> configparser.ConfigParser:
        cp = configparser.ConfigParser(interpolation=None)
        try:
            cp.read_string(self.bundle.read("pi-pull.ini").decode("utf-8"))
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ConfigError(f"the bundle's pi-pull.ini does not parse: {' '.join(str(e).split())}") from None
        return cp

    def release_root(self) -> str:
        """The agent's ``[paths] root`` in the bundle's config (uninstall names it: it is kept)."""
        return self.bundle_config().get("paths", "root", fallback="/var/lib/pi-pull").strip()

    def needs_key(self) -> bool:
        """The same rule as Config.needs_key: a report URL, or credentials sent to an http(s) remote."""
        cp = self.bundle_config()
        url = cp.get("remote", "url", fallback="").strip().lower()
        is_http = url.startswith(("http://", "https://"))
        try:
            send = cp.getboolean("remote", "send_credentials", fallback=is_http)
        except ValueError:
            send = True
        return bool(cp.get("report", "url", fallback="").strip()) or (is_http and send)

    def run(self) -> int:
        """Every step but the first tick and the timer (``enable_timer()``, after the tick); returns the
        number of changes (made, or in a dry run to make)."""
        self.check_services_installed()
        self.check_postscreen()
        self.check_certbot()
        self.check_sync_key()
        try:
            for key in ("etc_dir", "lib_dir", "systemd_dir"):
                self.host.make_dir(self.opts.dirs[key])
            self.install_files()
            self.make_milter_dir()
            self.compile_sieves()
            self.install_sync_key()
            self.configure_postfix()
            self.configure_dovecot()
            self.configure_opendkim()
            self.make_mail_root()
            self.make_empty_tables()
            self.install_certificate()
            self.make_fleet_files()
        finally:
            if not self.opts.dry_run:
                self.record.data["node"] = self.m.get("node", "")
                self.record.data["mail_root"] = self.mail_root
                self.record.data["release_root"] = self.release_root()
                if self.filters_spam:
                    self.record.data["rspamd"] = True  # uninstall restarts it on its own local.d
                self.record.save()
        if not self.opts.dry_run:
            self.check_configs()
        self.systemd_steps()
        return self.steps.changes

    # ---- preconditions (checked before anything changes)

    def check_sync_key(self) -> None:
        spec = self.m.get("sync_key", {"dir": "etc_dir", "name": "sync_key"})
        dest = self.path(spec["dir"], spec["name"])
        if self.sync_key is None and not self.opts.dry_run and read_bytes(dest) is None and self.needs_key():
            raise ConfigError(
                f"the sync key is needed and {dest} does not exist: pass --sync-key-stdin (paste the key "
                "add-node printed, then Ctrl-D) or --sync-key-file FILE"
            )

    def check_postscreen(self) -> None:
        """main.cf's DNSBL lines, with the server's rules (mailstate's compiler/postscreen.py)."""
        main_cf = self.m.get("postfix", {}).get("main_cf")
        if not main_cf:
            return
        why = postscreen.check_main_cf_lines(hostconf.setting_lines(self.bundle.read(main_cf).decode("utf-8")))
        if why is not None:
            raise InstallError(f"the bundle's {main_cf} is refused: {why}")

    def check_certbot(self) -> None:
        if self.opts.acme is not None and shutil.which(self.opts.certbot) is None:
            raise InstallError("--acme-email needs certbot, which is not installed: apt-get install certbot")

    def check_services_installed(self) -> None:
        pf, dv = self.opts.dirs["postfix_dir"], self.opts.dirs["dovecot_dir"]
        if self.opendkim_conf() is not None and shutil.which(self.opts.opendkim) is None:
            raise InstallError(
                f"opendkim is not installed ({self.opts.opendkim} is not on PATH), and this bundle signs outgoing "
                "mail with it: apt-get install opendkim opendkim-tools"
            )
        if not os.path.isdir(pf):
            raise InstallError(f"postfix is not installed ({pf} does not exist): apt-get install postfix")
        if not os.path.isfile(os.path.join(dv, "dovecot.conf")):
            raise InstallError(
                f"dovecot is not installed ({dv}/dovecot.conf does not exist): "
                "apt-get install dovecot-imapd dovecot-lmtpd"
            )
        if self.filters_spam and shutil.which(self.opts.rspamadm) is None:
            # main.cf names rspamd as port 25's milter, which tempfails every message while it does not answer.
            raise InstallError(
                f"rspamd is not installed ({self.opts.rspamadm} is not on PATH), and this bundle filters port 25 "
                "with it: apt-get install rspamd"
            )
        if shutil.which(self.opts.sievec) is None:
            # LMTP loads the sieve plugin (filters, vacation replies): without it no mail is delivered.
            raise InstallError(
                f"Pigeonhole (Dovecot's Sieve) is not installed ({self.opts.sievec} is not on PATH), and the bundle's "
                "Dovecot runs mailbox filters and vacation replies with it: apt-get install dovecot-sieve"
            )

    # ---- files

    def bundle_file(self, name: str) -> bytes:
        """A bundle file as installed: pointed at the chosen directories when the manifest says it names them."""
        data = self.bundle.read(name)
        if name in self.m.get("relocate", []):
            data = relocate(data, self.m.get("dirs", {}), self.opts.dirs)
        return data

    def install_files(self) -> None:
        for entry in self.m.get("files", []):
            data = self.bundle_file(entry["file"])
            dest = self.path(entry["dir"], entry["name"])
            if "/" in entry["name"]:
                self.host.make_dir(os.path.dirname(dest))  # e.g. the Sieve pipe directory (uninstall removes it)
            if self.host.put_file(dest, data, int(entry["mode"], 8)):
                if entry["dir"] == "systemd_dir":
                    self.changed.add("units")
                if entry["file"] == "pi_pull.py":
                    self.changed.add("agent")
                if entry["dir"] == "dovecot_dir":
                    self.changed.add("dovecot")
                if entry["dir"] == "rspamd_dir":
                    self.changed.add("rspamd")

    def make_milter_dir(self) -> None:
        """The directory of port 25's milter socket under Postfix's queue directory: rspamd (as
        _rspamd) creates the socket there, mode 0660; the directory is _rspamd's, group postfix and
        setgid, so the socket's group is postfix and only Postfix's daemons and rspamd reach it."""
        path = self.m.get("rspamd", {}).get("milter_dir")
        if not path:
            return
        try:
            uid, gid = pwd.getpwnam(RSPAMD_USER).pw_uid, grp.getgrnam(POSTFIX_GROUP).gr_gid
        except KeyError as exc:
            raise InstallError(
                f"no user {RSPAMD_USER} or group {POSTFIX_GROUP} (apt-get install rspamd postfix)"
            ) from exc
        what = f"{path} ({MILTER_DIR_MODE:04o}, owner {RSPAMD_USER}:{POSTFIX_GROUP}): rspamd's milter socket"
        with_owner = os.path.isdir(path) and os.stat(path)[stat.ST_UID : stat.ST_GID + 1] == (uid, gid)
        if with_owner and file_mode(path) == MILTER_DIR_MODE:
            self.steps.done(what)
            return
        self.host.make_dir(path)
        if self.steps.change(f"set {what}") and not self.opts.dry_run:
            os.chown(path, uid, gid)
            os.chmod(path, MILTER_DIR_MODE)
            self.record.data["milter_dir"] = path

    def compile_sieves(self) -> None:
        """The bundle's Sieve scripts precompiled with sievec, so that Dovecot, which runs them as the
        mail user, never has to write their binaries: junk.sieve (sieve_before: spam into Junk) and
        the IMAPSieve scripts that teach rspamd (learn-spam.sieve, learn-ham.sieve)."""
        for entry in self.m.get("files", []):
            if entry.get("file") in SIEVE_SCRIPTS:
                self.compile_sieve(self.path(entry["dir"], entry["name"]), SIEVE_SCRIPTS[entry["file"]])

    def compile_sieve(self, script: str, flags: tuple[str, ...]) -> None:
        binary = script[: -len(".sieve")] + ".svbin"
        if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(script):
            self.steps.done(f"{binary} (compiled)")
            return
        if not self.steps.change(f"compile {script} with sievec"):
            return
        ok, text = run(self.runner, [self.opts.sievec, *flags, script, binary])
        if not ok:
            raise InstallError(f"sievec cannot compile {script}: {text}")
        os.chmod(binary, 0o644)
        self.record.data["files"].setdefault(binary, {"backup": None, "sha256": None})
        self.changed.add("dovecot")

    def install_sync_key(self) -> None:
        spec = self.m.get("sync_key", {"dir": "etc_dir", "name": "sync_key", "mode": "0600"})
        dest = self.path(spec["dir"], spec["name"])
        mode = int(spec["mode"], 8)
        if self.sync_key is None:
            if read_bytes(dest) is None and not self.needs_key():
                self.steps.note("no sync key needed: this node sends no report and no credentials")
                return
            if read_bytes(dest) is None and self.opts.dry_run:
                self.steps.change(
                    f"install {dest} ({mode:04o}, sync key): the real run needs --sync-key-stdin or --sync-key-file"
                )
                return
            if file_mode(dest) == mode:
                self.steps.done(f"{dest} ({mode:04o}, sync key)")
            elif self.steps.change(f"chmod {dest} to {mode:04o} (sync key)"):
                os.chmod(dest, mode)
            return
        self.host.put_file(dest, (self.sync_key + "\n").encode(), mode, ", sync key", secret=True)

    # ---- postfix

    def configure_postfix(self) -> None:
        pf = self.opts.dirs["postfix_dir"]
        main_cf = os.path.join(pf, "main.cf")
        current = read_bytes(main_cf)
        spec = self.m.get("postfix", {})
        if current is None:
            self.steps.note(
                f'postfix has no {main_cf} (installed with "No configuration"): starting from the bundle\'s '
                f"minimal {spec.get('main_cf_base')}"
            )
            base = self.bundle.read(spec["main_cf_base"])
        else:
            base = current
        lines = hostconf.setting_lines(self.bundle_file(spec["main_cf"]).decode("utf-8"))
        new = hostconf.set_main_cf(self.runner, base, lines)
        before = hostconf.parse_main_cf(base.decode("utf-8", "replace"))
        originals = {line.partition("=")[0].strip(): before.get(line.partition("=")[0].strip()) for line in lines}
        if self.host.edit_file(
            main_cf,
            new,
            0o644,
            f"set {len(lines)} mailstate lines in {main_cf} (postconf -e)",
            {"kind": "postfix-main", "keys": originals if current is not None else {}},
            done=f"{main_cf} has the {len(lines)} mailstate lines",
        ):
            self.changed.add("postfix")
        master = self.ensure_master_cf(pf)
        if spec.get("master_cf"):
            self.configure_master_cf(pf, new, master, spec["master_cf"])

    def ensure_master_cf(self, pf: str) -> bytes:
        """master.cf as it is, or (none yet) as Postfix ships it; returns its content (a dry run writes nothing)."""
        master_cf = os.path.join(pf, "master.cf")
        current = read_bytes(master_cf)
        if current is not None:
            self.steps.done(f"{master_cf} (exists)")
            return current
        dist = next((p for p in MASTER_CF_DIST if os.path.isfile(p)), None)
        if dist is None:
            raise InstallError(f"{master_cf} is missing and so is Postfix's {MASTER_CF_DIST[0]}: reinstall postfix")
        data = read_bytes(dist) or b""
        if self.host.edit_file(
            master_cf, data, 0o644, f"write {master_cf} from {dist} (Postfix had none)", {"kind": "copy"}
        ):
            self.changed.add("postfix")
        return data

    def configure_master_cf(self, pf: str, main: bytes, master: bytes, bundle_file: str) -> None:
        """The bundle's master.cf entries (``service/type = ...`` lines), set with ``postconf -M -e``."""
        master_cf = os.path.join(pf, "master.cf")
        lines = hostconf.setting_lines(self.bundle.read(bundle_file).decode("utf-8"))
        new, originals = hostconf.set_master_cf(self.runner, main, master, lines)
        names = ", ".join(hostconf.master_names(lines))
        if self.host.edit_file(
            master_cf,
            new,
            0o644,
            f"set master.cf entries {names} in {master_cf} (postconf -M -e)",
            {"kind": "postfix-master", "keys": originals},
            done=f"{master_cf} has the entries {names}",
        ):
            self.changed.add("postfix")

    # ---- dovecot

    def opendkim_conf(self) -> str | None:
        """Where the bundle's opendkim.conf goes (beside the postfix dir: /etc/opendkim.conf); None without one."""
        spec = self.m.get("opendkim")
        if not isinstance(spec, dict):
            return None
        return os.path.join(
            os.path.dirname(self.opts.dirs["postfix_dir"].rstrip("/")), str(spec.get("name", "opendkim.conf"))
        )

    def configure_opendkim(self) -> None:
        """The bundle's opendkim.conf (signing-only milter; pi-pull writes its tables) beside the
        postfix dir, i.e. /etc/opendkim.conf; the original is kept and uninstall puts it back. It
        names the tables under the etc dir, so it follows ``--etc-dir`` like pi-pull.ini."""
        dest = self.opendkim_conf()
        if dest is None:
            return
        conf = str(self.m["opendkim"]["conf"])
        data = self.bundle.read(conf)
        if conf in self.m.get("relocate", []):
            data = relocate(data, self.m.get("dirs", {}), self.opts.dirs)
        if self.host.put_file(dest, data, 0o644, " (OpenDKIM, the DKIM signer)"):
            self.changed.add("opendkim")
        self.make_dkim_tables(data)

    def make_dkim_tables(self, conf: bytes) -> None:
        """Empty KeyTable and SigningTable where the config names them and there are none yet.

        OpenDKIM refuses a config whose tables are missing (``opendkim -n`` exits 78, EX_CONFIG, and
        so does its start), and pi-pull writes them only on a tick, after install has (re)started
        OpenDKIM. Empty tables sign nothing, which is also what pi-pull writes until a key has been
        reported and published. Tables that exist (pi-pull's) are never touched; uninstall removes
        the ones install made."""
        from .dkim import ensure_key_dir

        owner = self.bundle_config().get("dkim", "key_owner", fallback="opendkim").strip()
        for path in opendkim_tables(conf):
            if os.path.exists(path):
                self.steps.done(f"{path} (OpenDKIM's table)")
                continue
            key_dir = os.path.dirname(path)
            self.host.make_dir(key_dir, 0o750)
            if not self.steps.change(f"create {path} (0644, empty: nothing is signed until pi-pull writes it)"):
                continue
            ensure_key_dir(key_dir, owner)
            atomic_write(path, b"", 0o644)
            self.record.data["files"][path] = {"backup": None, "sha256": sha256(b"")}

    def configure_dovecot(self) -> None:
        dv = self.opts.dirs["dovecot_dir"]
        spec = self.m.get("dovecot", {})
        conf = os.path.join(dv, "dovecot.conf")
        text = read_bytes(conf) or b""
        new = hostconf.include_snippet(text, spec.get("snippet", "conf.d/90-mailstate.conf"))
        if new == text:
            self.steps.done(f"{conf} includes {spec.get('snippet')}")
        elif self.host.edit_file(
            conf, new, 0o644, f"add `!include {spec.get('snippet')}` to {conf}", {"kind": "dovecot-include"}
        ):
            self.changed.add("dovecot")
        if not spec.get("disable_auth_system", True):
            return
        auth = os.path.join(dv, "conf.d", "10-auth.conf")
        auth_text = read_bytes(auth)
        if auth_text is None:
            self.steps.note(f"no {auth}: make sure no system passdb (PAM, /etc/passwd) is configured")
            return
        new = hostconf.disable_auth_system(auth_text)
        what = f"comment out `!include auth-system.conf.ext` in {auth} (system users are no passdb)"
        if new == auth_text:
            self.steps.done(f"{auth} (no `!include auth-system.conf.ext`)")
        elif self.host.edit_file(auth, new, 0o644, what, {"kind": "dovecot-auth"}):
            self.changed.add("dovecot")

    # ---- mail root

    @property
    def mail_root(self) -> str:
        return self.opts.mail_root or str(self.m.get("mail_root", {}).get("path", ""))

    def make_mail_root(self) -> None:
        spec = self.m.get("mail_root", {})
        path, uid, gid = self.mail_root, int(spec.get("uid", 5000)), int(spec.get("gid", 5000))
        if not path:
            return
        mode = int(spec.get("mode", "0750"), 8)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self.steps.change(f"create mail root {path} ({mode:04o}, owner {uid}:{gid})"):
                os.makedirs(os.path.dirname(path.rstrip("/")) or "/", mode=0o755, exist_ok=True)
                os.mkdir(path, mode)
                os.chmod(path, mode)
                os.chown(path, uid, gid)
            return
        if (st.st_uid, st.st_gid) == (uid, gid):
            self.steps.done(f"mail root {path} (owner {uid}:{gid})")
        elif self.steps.change(
            f"chown {path} to {uid}:{gid} (the mail root; the Maildirs inside are left as they are)"
        ):
            os.chown(path, uid, gid)

    # ---- empty tables until the first tick (bucketed layout)

    def make_empty_tables(self) -> None:
        """With ``[services] map_buckets`` > 0, main.cf names 4 x N tables under ``<root>/current``. Until
        the first tick made a release, ``current`` points at ``<root>/placeholder``: empty tables and
        an empty passwd.d. Without them every smtpd would die at its start ("too many errors": it
        cannot open the tables) and the master would throttle smtpd for a minute; with them Postfix
        answers "unknown recipient" for everything until the first release swaps in over the link
        (``placeholder`` is no release name: pi-pull builds the first release from nothing). Nothing
        is done once ``current`` exists (a release is live, whatever its layout)."""
        cp = self.bundle_config()
        try:
            n = int(cp.get("services", "map_buckets", fallback="0").strip() or "0")
        except ValueError:
            return  # the agent's config check says what is wrong
        root = self.release_root()
        current = os.path.join(root, "current")
        if n <= 0 or not root.startswith("/"):
            return
        if os.path.lexists(current):
            self.steps.done(f"{current} (a release or the empty tables are live)")
            return
        map_type = cp.get("services", "map_type", fallback="hash").strip() or "hash"
        postmap = shlex.split(cp.get("services", "postmap", fallback="postmap").strip() or "postmap")
        if "-c" not in postmap:
            postmap += ["-c", self.opts.dirs["postfix_dir"]]
        if not self.steps.change(
            f"create {root}/{PLACEHOLDER} ({len(PLACEHOLDER_MAPS) * n} empty {map_type} tables, an empty passwd.d) and "
            f"{current} -> {PLACEHOLDER}, until the first tick applies a release"
        ):
            return
        os.makedirs(root, mode=0o755, exist_ok=True)
        final = os.path.join(root, PLACEHOLDER)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "postfix"), mode=0o755)
        os.makedirs(os.path.join(tmp, "dovecot", "passwd.d"), mode=0o755)
        first = os.path.join(tmp, "postfix", f"{PLACEHOLDER_MAPS[0]}.00")
        r = self.runner.run([*postmap, "-i", f"{map_type}:{first}"], input=b"", timeout=120)
        made = sorted(f for f in os.listdir(os.path.join(tmp, "postfix")))
        if r.returncode != 0 or not made:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InstallError(
                f"postmap cannot make an empty {map_type} table: {short(r.stderr + r.stdout) or f'rc={r.returncode}'}"
            )
        for name in PLACEHOLDER_MAPS:
            for k in range(n):
                for made_file in made:  # the table's files (hash: <name>.db), copied under each table's name
                    dest = os.path.join(tmp, "postfix", f"{name}.{k:02x}{made_file[len(PLACEHOLDER_MAPS[0]) + 3 :]}")
                    if not os.path.exists(dest):
                        shutil.copyfile(os.path.join(tmp, "postfix", made_file), dest)
                        os.chmod(dest, 0o644)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        link = f"{current}.tmp-{os.getpid()}"
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(PLACEHOLDER, link)
        os.replace(link, current)

    # ---- the certificate (certs.py)

    def install_certificate(self) -> None:
        """The node's certificate at the bundle's TLS paths: ACME (--acme-email) or self-signed."""
        spec = self.m.get("tls")
        if not isinstance(spec, dict):
            self.steps.note("the bundle names no TLS files: put the node's certificate where its main.cf says")
            return
        defaults = self.m.get("dirs", {})
        cert, key = (relocate(str(spec[k]).encode(), defaults, self.opts.dirs).decode() for k in ("cert", "key"))
        services = self.bundle_config()
        hook = certs.deploy_hook(
            cert,
            key,
            services.get("services", "postfix_reload", fallback="postfix reload"),
            services.get("services", "dovecot_reload", fallback="doveadm reload"),
        )
        step = certs.TlsStep(
            cert=cert,
            key=key,
            host=self.opts.mail_host or str(self.m.get("address") or "localhost"),
            alt_names=tuple(str(a) for a in (self.m.get("address"),) if a),
            acme=self.opts.acme,
            hook_path=self.path("lib_dir", certs.HOOK_NAME),
            hook=hook,
            files=self.host,
            say=self.steps,
            record=self.record.data,
            runner=self.runner,
            certbot=self.opts.certbot,
            openssl=self.opts.openssl,
        )
        if step.run():
            self.changed.update({"postfix", "dovecot"})  # they read the certificate when they start

    # ---- the fleet's files

    def make_fleet_files(self) -> None:
        """``<root>/fleet`` (0700) with the empty tables the fleet transport and relay listener of
        master.cf name, until pi-pull writes them from the signed state."""
        cp = self.bundle_config()
        root = self.release_root()
        if not root.startswith("/"):
            return
        fleet = os.path.join(root, "fleet")
        map_type = cp.get("services", "map_type", fallback="hash").strip() or "hash"
        postmap = shlex.split(cp.get("services", "postmap", fallback="postmap").strip() or "postmap")
        if "-c" not in postmap:
            postmap += ["-c", self.opts.dirs["postfix_dir"]]
        missing = [t for t in FLEET_TABLES if not os.path.exists(os.path.join(fleet, t))]
        if not missing:
            self.steps.done(f"{fleet} (the fleet's tables)")
            return
        if not self.steps.change(f"create {fleet} (0700) and empty {map_type} tables {', '.join(missing)}"):
            return
        os.makedirs(fleet, mode=0o700, exist_ok=True)
        for name in missing:
            path = os.path.join(fleet, name)
            atomic_write(path, b"", 0o644)
            ok, text = run(self.runner, [*postmap, f"{map_type}:{path}"])
            if not ok:
                raise InstallError(f"postmap cannot make the empty table {path}: {text}")

    # ---- checks and services

    def check_configs(self) -> None:
        """The result must parse: ``postconf -n`` and ``doveconf -n`` on the installed config."""
        ok, text = run(self.runner, [self.opts.postconf, "-c", self.opts.dirs["postfix_dir"], "-n"])
        if not ok:
            raise InstallError(f"postfix rejects its configuration after install: {text}")
        conf = os.path.join(self.opts.dirs["dovecot_dir"], "dovecot.conf")
        ok, text = run(self.runner, [self.opts.doveconf, "-c", conf, "-n"])
        if not ok:
            raise InstallError(f"dovecot rejects its configuration after install: {text}")
        self.steps.note("checked: postconf -n and doveconf -n accept the configuration")
        if self.filters_spam:
            rspamd_dir = self.opts.dirs["rspamd_dir"]
            ok, text = run(
                self.runner,
                [
                    self.opts.rspamadm,
                    f"--var=CONFDIR={rspamd_dir}",
                    f"--var=LOCAL_CONFDIR={rspamd_dir}",
                    "configtest",
                    "-c",
                    os.path.join(rspamd_dir, "rspamd.conf"),
                ],
            )
            if not ok:
                raise InstallError(f"rspamd rejects its configuration after install: {text}")
            self.steps.note(f"checked: rspamadm configtest accepts {rspamd_dir}")
        dkim_conf = self.opendkim_conf()
        if dkim_conf is not None:
            ok, text = run(self.runner, [self.opts.opendkim, "-n", "-x", dkim_conf])
            if not ok:
                raise InstallError(f"opendkim rejects its configuration after install: {text}")
            self.steps.note(f"checked: opendkim -n accepts {dkim_conf}")

    @property
    def use_systemd(self) -> bool:
        return systemd_running() if self.opts.systemd is None else self.opts.systemd

    def systemd_steps(self) -> None:
        timer = self.m.get("units", {}).get("timer", "pi-pull.timer")
        if not self.opts.start:
            self.steps.note(
                "--no-start: not reloading systemd, not (re)starting postfix/dovecot, not enabling " + timer
            )
            return
        if not self.use_systemd:
            self.steps.note(
                f"systemd is not running (a container?): skipped daemon-reload, enabling {timer} and "
                "(re)starting postfix and dovecot. Start them yourself (`postfix start`, `dovecot`) and run "
                f"the agent from cron or as `python3 {self.path('lib_dir', 'pi_pull.py')} --config "
                f"{self.config_file} --follow` (follow mode: a tick within seconds of a change, and at "
                "least every [agent] interval)"
            )
            return
        if "units" in self.changed and self.steps.change("systemctl daemon-reload"):
            self.systemctl("daemon-reload")
        self.policy_running()
        for svc in ("postfix", "dovecot"):
            self.service_running(svc)
        if isinstance(self.m.get("opendkim"), dict):
            self.service_running("opendkim")
        if self.filters_spam:
            self.service_running("rspamd")  # port 25's milter: Postfix tempfails mail while it is down

    def policy_running(self) -> None:
        """The outbound policy service (a bundle that ships it) runs before Postfix asks it: the
        submission services tempfail (451) while it does not answer. Restarted when its unit or
        the agent changed."""
        unit = self.m.get("units", {}).get("policy")
        if not unit:
            return
        enabled = self.runner.run([self.opts.systemctl, "is-enabled", "--quiet", unit], timeout=30).returncode == 0
        if not enabled:
            if self.steps.change(f"systemctl enable --now {unit}"):
                self.systemctl("enable", "--now", unit)
        elif "units" in self.changed or "agent" in self.changed:
            if self.steps.change(f"systemctl restart {unit} (its unit or the agent changed)"):
                self.systemctl("restart", unit)
        else:
            self.steps.done(f"{unit} enabled")

    def enable_timer(self) -> None:
        """``systemctl enable --now`` the follow service and the timer: after the first tick, so that tick
        never meets their runs (it would find the lock taken)."""
        units = self.m.get("units", {})
        timer = units.get("timer", "pi-pull.timer")
        if not self.opts.start or not self.use_systemd:
            return
        # Follow mode (a bundle that ships it) and the timer beside it as the fallback; they take
        # turns on pi-pull's flock, so neither ever runs a tick beside the other.
        for unit in [u for u in (units.get("follow"), timer) if u]:
            enabled = self.runner.run([self.opts.systemctl, "is-enabled", "--quiet", unit], timeout=30).returncode == 0
            if enabled:
                self.steps.done(f"{unit} enabled")
            elif self.steps.change(f"systemctl enable --now {unit}"):
                self.systemctl("enable", "--now", unit)

    def service_running(self, svc: str) -> None:
        active = self.runner.run([self.opts.systemctl, "is-active", "--quiet", svc], timeout=30).returncode == 0
        if svc in self.changed:
            verb = "restart" if active else "start"
            if self.steps.change(f"systemctl {verb} {svc} (its configuration changed)"):
                self.systemctl(verb, svc)
        elif not active:
            if self.steps.change(f"systemctl start {svc} (it is not running)"):
                self.systemctl("start", svc)
        else:
            self.steps.done(f"{svc} running")

    def systemctl(self, *args: str) -> None:
        ok, text = run(self.runner, [self.opts.systemctl, *args], timeout=300)
        if not ok:
            raise InstallError(f"systemctl {' '.join(args)} failed: {text}")
