#!/usr/bin/env python3
"""pi-pull: the mailstate node agent.

Pulls the signed mailstate "state repo", verifies it, and applies the compiled
Postfix/Dovecot files under ``rendered/`` to this node atomically.

Runs on small mail nodes (e.g. a Raspberry Pi): Python 3.9+ standard library
only, plus ``git`` (>= 2.31 when sending credentials to an http(s) remote),
``ssh-keygen`` and ``postmap``.

Usage::

    pi_pull.py --config /etc/pi-pull/pi-pull.ini --once   # one tick (systemd timer)
    pi_pull.py --config /etc/pi-pull/pi-pull.ini          # loop every [agent] interval

One tick:

1. fetch ``<remote> <branch>`` into a local bare mirror (``<root>/mirror.git``);
2. verify the tip's SSH signature against the node's *local* allowed_signers
   (never keys from the repo), before anything is materialised;
3. require the tip to descend from the last applied commit (a force-push to an
   older or unrelated commit is refused as a rollback);
4. materialise ``rendered/`` from git objects (no work tree) into
   ``<root>/releases/<sha>/``, validate it, and postmap the maps;
5. swap ``<root>/current`` atomically (rename of a temporary symlink);
6. reload Postfix / Dovecot only if their files changed;
7. if a reload fails: swap back, reload again, keep the last good release;
8. prune old releases (keep ``keep_releases``; never ``current`` or the
   previous good one);
9. report ``{name, sync_key, applied_commit, status, error}`` to the server; a
   report that cannot be delivered is stored and sent on the next tick.

A tick with nothing new only talks to the remote (and the report URL): it
writes nothing to disk.

Release layout under ``root``::

    mirror.git/                                  bare mirror (objects only)
    releases/<sha>/postfix/virtual_mailbox_domains (+ .db)
    releases/<sha>/postfix/virtual_mailbox_maps    (+ .db)
    releases/<sha>/dovecot/passwd.d/<domain>
    releases/<sha>/COMMIT
    releases/<sha>/MANIFEST.json
    current -> releases/<sha>
    state.json
    .lock

Exit codes:

    0  applied a new commit, or already up to date
    1  error (fetch failed, postmap failed, reload failed and rolled back, ...)
    2  usage or configuration error
    3  refused: bad/missing/untrusted signature, rollback, or invalid content
    4  another pi-pull run holds the lock

Log lines go to stderr, one line per event, prefixed ``pi-pull:``. The sync key
is read from its key file (mode 0600), passed to git only through the
environment, and never logged.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import errno
import fcntl
import grp
import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_LOCKED = 4

EXIT_CODES_HELP = """exit codes:
  0  applied a new commit, or already up to date
  1  error (fetch/postmap/reload failed; on reload failure the previous release is kept)
  2  usage or configuration error
  3  refused (unsigned or untrusted signature, rollback, invalid rendered content)
  4  another pi-pull run holds the lock
"""

STATE_FORMAT = 1
MAP_FILES = ("virtual_mailbox_domains", "virtual_mailbox_maps")
DOMAIN_FILES = ("passwd", *MAP_FILES)
POSTMAP_TYPES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm")
MAP_TYPES = (*POSTMAP_TYPES, "texthash")
HISTORY_MAX = 50
PENDING_MAX = 20

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)" + _LABEL + r"(?:\." + _LABEL + r")+$")
LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
SHA_RE = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_EXCEPT_NL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
WS_RE = re.compile(r"\s")
# Bump when validation gets stricter: releases built by an older validator are then not reused.
VALIDATOR_VERSION = 1


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """Bad configuration or usage (exit 2)."""


class TickError(Exception):
    """An operational failure; the node keeps its last good release (exit 1)."""


class Refused(Exception):
    """The fetched commit must not be applied (exit 3)."""


class Locked(Exception):
    """Another run holds the lock (exit 4)."""


# --------------------------------------------------------------------------- logging


class Log:
    """One-line log messages on stderr; known secrets are masked."""

    def __init__(self, stream: Any = None, verbose: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        self._secrets: list[str] = []

    def add_secret(self, secret: str) -> None:
        if secret and secret not in self._secrets:
            self._secrets.append(secret)

    def _emit(self, level: str, msg: str) -> None:
        for s in self._secrets:
            msg = msg.replace(s, "***")
        msg = " ".join(msg.split("\n"))
        prefix = "pi-pull: " if level == "info" else f"pi-pull: {level}: "
        try:
            self.stream.write(prefix + msg + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def debug(self, msg: str) -> None:
        if self.verbose:
            self._emit("debug", msg)

    def info(self, msg: str) -> None:
        self._emit("info", msg)

    def warning(self, msg: str) -> None:
        self._emit("warning", msg)

    def error(self, msg: str) -> None:
        self._emit("error", msg)


# --------------------------------------------------------------------------- config


@dataclass
class Config:
    remote_url: str
    branch: str = "main"
    send_credentials: bool = False
    node_name: str = ""
    sync_key_file: str = ""
    allowed_signers: str = ""
    revoked_signers: str = ""
    root: str = "/var/lib/pi-pull"
    keep_releases: int = 5
    passwd_group: str = ""
    mail_root: str = ""
    sync: bool = True
    report_url: str = ""
    report_timeout: float = 10.0
    postfix_reload: str = ""
    dovecot_reload: str = ""
    reload_timeout: float = 120.0
    map_type: str = "hash"
    postmap: str = "postmap"
    git: str = "git"
    ssh_keygen: str = "ssh-keygen"
    fetch_timeout: float = 300.0
    interval: float = 60.0

    @property
    def remote_is_http(self) -> bool:
        return self.remote_url.lower().startswith(("http://", "https://"))

    @property
    def needs_key(self) -> bool:
        return bool(self.report_url) or (self.remote_is_http and self.send_credentials)


def _yes(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{key}: expected yes/no, got {value!r}")


def load_config(path: str) -> Config:
    """Parse the INI config file (see pi-pull.example.ini)."""
    cp = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fh:
            cp.read_file(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except configparser.Error as e:
        raise ConfigError("cannot parse config {}: {}".format(path, " ".join(str(e).split()))) from None
    base = os.path.dirname(os.path.abspath(path))

    def get(section: str, key: str, default: str | None = None) -> str:
        if cp.has_option(section, key):
            return cp.get(section, key).strip()
        if default is None:
            raise ConfigError(f"config {path}: missing [{section}] {key}")
        return default

    def get_path(section: str, key: str, default: str | None = None) -> str:
        v = get(section, key, default)
        if v and not os.path.isabs(v):
            v = os.path.normpath(os.path.join(base, v))
        return v

    def get_num(section: str, key: str, default: str, kind: Callable[[str], Any]) -> Any:
        raw = get(section, key, default)
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"config {path}: [{section}] {key} must be a number, got {raw!r}") from None

    url = get("remote", "url")
    is_http = url.lower().startswith(("http://", "https://"))
    if not is_http and "://" not in url and ":" not in url.split("/")[0] and not os.path.isabs(url):
        url = os.path.normpath(os.path.join(base, url))  # relative local path
    cfg = Config(remote_url=url)
    cfg.branch = get("remote", "branch", "main")
    cfg.send_credentials = _yes(get("remote", "send_credentials", "yes" if is_http else "no"),
                                "[remote] send_credentials")
    cfg.node_name = get("node", "name", "")
    cfg.sync_key_file = get_path("node", "sync_key_file", "")
    cfg.allowed_signers = get_path("node", "allowed_signers")
    cfg.revoked_signers = get_path("node", "revoked_signers", "")
    cfg.root = get_path("paths", "root", "/var/lib/pi-pull")
    cfg.keep_releases = get_num("paths", "keep_releases", "5", int)
    cfg.passwd_group = get("paths", "passwd_group", "")
    cfg.mail_root = get("paths", "mail_root", "")
    cfg.sync = _yes(get("paths", "sync", "yes"), "[paths] sync")
    cfg.report_url = get("report", "url", "")
    cfg.report_timeout = get_num("report", "timeout", "10", float)
    cfg.postfix_reload = get("services", "postfix_reload", "")
    cfg.dovecot_reload = get("services", "dovecot_reload", "")
    cfg.reload_timeout = get_num("services", "reload_timeout", "120", float)
    cfg.map_type = get("services", "map_type", "hash")
    cfg.postmap = get("services", "postmap", "postmap")
    cfg.git = get("agent", "git", "git")
    cfg.ssh_keygen = get("agent", "ssh_keygen", "ssh-keygen")
    cfg.fetch_timeout = get_num("agent", "fetch_timeout", "300", float)
    cfg.interval = get_num("agent", "interval", "60", float)

    if not re.match(r"^[A-Za-z0-9._/-]+$", cfg.branch) or ".." in cfg.branch:
        raise ConfigError(f"config {path}: [remote] branch {cfg.branch!r} is not a plain branch name")
    if cfg.map_type not in MAP_TYPES:
        raise ConfigError("config {}: [services] map_type must be one of {}".format(path, ", ".join(MAP_TYPES)))
    if cfg.keep_releases < 1:
        raise ConfigError(f"config {path}: [paths] keep_releases must be >= 1")
    if cfg.interval <= 0:
        raise ConfigError(f"config {path}: [agent] interval must be > 0")
    if cfg.mail_root and not os.path.isabs(cfg.mail_root):
        raise ConfigError(f"config {path}: [paths] mail_root must be absolute")
    if cfg.report_url and not cfg.report_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"config {path}: [report] url must be http(s)")
    if cfg.needs_key:
        if not cfg.node_name or not re.match(r"^[A-Za-z0-9._-]+$", cfg.node_name):
            raise ConfigError(f"config {path}: [node] name must be set (letters, digits, . _ -)")
        if not cfg.sync_key_file:
            raise ConfigError(f"config {path}: [node] sync_key_file must be set")
    if cfg.passwd_group:
        try:
            grp.getgrnam(cfg.passwd_group)
        except KeyError:
            raise ConfigError(f"config {path}: [paths] passwd_group {cfg.passwd_group!r} does not exist") from None
    for cmd_key in ("postfix_reload", "dovecot_reload", "postmap"):
        try:
            shlex.split(getattr(cfg, cmd_key))
        except ValueError as e:
            raise ConfigError(f"config {path}: [services] {cmd_key}: {e}") from None
    return cfg


def read_sync_key(path: str) -> str:
    """Read the sync key from its file; refuse group/world-readable files."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ConfigError(f"cannot open sync key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise ConfigError(f"sync key file {path} has mode {stat.S_IMODE(st.st_mode):o}; it must not be readable by group/others "
                              "(chmod 600)")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    key = data.decode("utf-8", "replace").strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"sync key file {path} must hold one non-empty key")
    return key


# --------------------------------------------------------------------------- subprocess seam


_DROP_ENV_PREFIXES = ("GIT_",)
_KEEP_ENV = ("GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "GIT_PROXY_COMMAND")


class Runner:
    """Runs subprocesses for a tick. Tests or embedders may pass their own."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        base = dict(os.environ if env is None else env)
        for k in list(base):
            if k.startswith(_DROP_ENV_PREFIXES) and k not in _KEEP_ENV:
                del base[k]
        base["GIT_TERMINAL_PROMPT"] = "0"
        base["LC_ALL"] = "C"
        self.env = base

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(self.env)
        if extra:
            env.update(extra)
        return env

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(list(argv), input=input, capture_output=True, env=self._env(env), timeout=timeout, cwd=cwd,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            return subprocess.CompletedProcess(list(argv), 127, b"", (f"{argv[0]}: command not found").encode())
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(list(argv), 124, b"",
                                               (f"{argv[0]}: timed out after {timeout}s").encode())

    def shell(self, command: str, *, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a configured shell command (reloads). Output goes to an unnamed temp file, not a
        pipe, so a command that leaves a daemon behind cannot make us wait for it."""
        with tempfile.TemporaryFile() as out:
            try:
                r = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=self._env(None), timeout=timeout)
                code = r.returncode
            except subprocess.TimeoutExpired:
                code = 124
            out.seek(0)
            text = out.read(65536)
        if code == 124 and not text:
            text = f"timed out after {timeout}s".encode()
        return subprocess.CompletedProcess(command, code, b"", text)


def _short(out: bytes, limit: int = 300) -> str:
    text = " ".join(out.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- helpers


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)  # exact mode, whatever the umask
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    _write_file(tmp, data, mode)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _digest(items: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(items):
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


# --------------------------------------------------------------------------- validation


def validate_domain(domain: str, passwd: bytes, vmm: bytes, vmd: bytes, mail_root: str = "") -> int:
    """Validate one domain's rendered fragments. Returns the mailbox count.

    Raises Refused with a one-line reason on anything unexpected.
    """
    if not DOMAIN_RE.match(domain):
        raise Refused(f"unsafe domain name {domain!r} in rendered/")

    def text(data: bytes, what: str) -> list[str]:
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(f"{what} of {domain} is not UTF-8") from None
        if CONTROL_EXCEPT_NL_RE.search(s):
            raise Refused(f"{what} of {domain} contains control characters")
        return [line for line in s.split("\n") if line != ""]

    vmd_lines = text(vmd, "virtual_mailbox_domains")
    if len(vmd_lines) != 1 or len(vmd_lines[0].split()) != 2 or vmd_lines[0].split()[0] != domain:
        raise Refused(f"virtual_mailbox_domains of {domain} must be exactly one line '{domain} OK'")

    suffix = "@" + domain
    map_users = set()
    for line in text(vmm, "virtual_mailbox_maps"):
        parts = line.split()
        if len(parts) != 2:
            raise Refused(f"virtual_mailbox_maps of {domain}: malformed line {line[:80]!r}")
        key, value = parts
        if not key.endswith(suffix) or not LOCAL_RE.match(key[: -len(suffix)]):
            raise Refused(f"virtual_mailbox_maps of {domain}: bad address {key[:80]!r}")
        if value.startswith("/") or ".." in value.split("/"):
            raise Refused(f"virtual_mailbox_maps of {domain}: unsafe path {value[:80]!r}")
        if key in map_users:
            raise Refused(f"virtual_mailbox_maps of {domain}: duplicate {key}")
        map_users.add(key)

    pw_users = set()
    for line in text(passwd, "passwd"):
        fields = line.split(":", 7)
        if len(fields) < 7:
            raise Refused(f"passwd of {domain}: line has {len(fields)} fields, expected at least 7")
        user, password, uid, gid, gecos, home, shell = fields[:7]
        extra = fields[7] if len(fields) > 7 else ""
        if not user.endswith(suffix) or not LOCAL_RE.match(user[: -len(suffix)]):
            raise Refused(f"passwd of {domain}: bad user {user[:80]!r}")
        if user in pw_users:
            raise Refused(f"passwd of {domain}: duplicate user {user}")
        if not password or WS_RE.search(password):
            raise Refused(f"passwd of {domain}: bad password field for {user}")
        if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0 or int(gid) == 0:
            raise Refused(f"passwd of {domain}: uid/gid for {user} must be non-zero numbers")
        if (not home.startswith("/") or posixpath.normpath(home) != home or home == "/"
                or ".." in home.split("/") or WS_RE.search(home)):
            raise Refused(f"passwd of {domain}: unsafe home {home[:80]!r} for {user}")
        if mail_root and not home.startswith(mail_root.rstrip("/") + "/"):
            raise Refused(f"passwd of {domain}: home of {user} is outside mail_root {mail_root}")
        if shell or gecos:
            raise Refused(f"passwd of {domain}: gecos/shell must be empty for {user}")
        for item in extra.split():
            if "=" not in item:
                raise Refused(f"passwd of {domain}: bad extra field {item[:80]!r} for {user}")
        pw_users.add(user)

    if pw_users != map_users:
        diff = sorted(pw_users ^ map_users)
        raise Refused(f"{domain}: passwd and virtual_mailbox_maps disagree (e.g. {diff[0]})")
    return len(pw_users)


# --------------------------------------------------------------------------- the agent


@dataclass
class TickResult:
    status: str  # "ok" | "error" | "refused"
    exit_code: int
    applied_commit: str | None
    message: str
    error: str | None = None
    changed: bool = False


class Agent:
    """One node's puller. ``tick()`` runs one fetch/verify/apply/report cycle."""

    def __init__(self, cfg: Config, runner: Runner | None = None, log: Log | None = None,
                 sync_key: str | None = None) -> None:
        self.cfg = cfg
        self.runner = runner or Runner()
        self.log = log or Log()
        self.root = cfg.root
        self.mirror = os.path.join(self.root, "mirror.git")
        self.releases = os.path.join(self.root, "releases")
        self.current = os.path.join(self.root, "current")
        self.state_path = os.path.join(self.root, "state.json")
        self.lock_path = os.path.join(self.root, ".lock")
        self._sync_key = sync_key
        self._lock_fd: int | None = None
        self._git_version_checked = False

    # ---- secrets

    @property
    def sync_key(self) -> str:
        if self._sync_key is None:
            self._sync_key = read_sync_key(self.cfg.sync_key_file)
            self.log.add_secret(self._sync_key)
            self.log.add_secret(self._basic_token())
        return self._sync_key

    def _basic_token(self) -> str:
        assert self._sync_key is not None
        return base64.b64encode((f"{self.cfg.node_name}:{self._sync_key}").encode()).decode()

    # ---- lock

    def acquire_lock(self) -> None:
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Locked(f"another pi-pull run holds {self.lock_path}; exiting") from None
            raise
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- state

    def load_state(self) -> tuple[dict[str, Any], str]:
        """Return (state, raw file text); the raw text lets save_state skip identical writes."""
        raw = ""
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                raw = fh.read()
            st = json.loads(raw)
            if not isinstance(st, dict):
                raise ValueError("not an object")
        except FileNotFoundError:
            st = {}
        except (OSError, ValueError) as e:
            raise TickError(f"cannot read {self.state_path}: {e} (fix or remove it)") from None
        st.setdefault("format", STATE_FORMAT)
        st.setdefault("applied_commit", None)
        st.setdefault("previous_commit", None)
        st.setdefault("history", [])
        st.setdefault("pending_reports", [])
        return st, raw

    def save_state(self, st: dict[str, Any], original: str) -> None:
        data = json.dumps(st, indent=2, sort_keys=True) + "\n"
        if data == original:
            return
        _atomic_write(self.state_path, data.encode(), 0o600)

    # ---- git

    def git(self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = 120.0) -> subprocess.CompletedProcess[bytes]:
        argv = [self.cfg.git, "--git-dir", self.mirror, "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
        argv.extend(args)
        return self.runner.run(argv, input=input, env=env, timeout=timeout)

    def ensure_mirror(self) -> None:
        if os.path.isfile(os.path.join(self.mirror, "HEAD")):
            return
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        tmp = f"{self.mirror}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        r = self.runner.run([self.cfg.git, "init", "--bare", "--quiet", tmp], timeout=60)
        if r.returncode != 0:
            raise TickError(f"git init of the mirror failed: {_short(r.stderr)}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, self.mirror)
        self.log.info(f"created mirror {self.mirror}")

    def _check_git_version(self) -> None:
        if self._git_version_checked:
            return
        self._git_version_checked = True
        r = self.runner.run([self.cfg.git, "--version"], timeout=30)
        m = re.search(rb"(\d+)\.(\d+)", r.stdout)
        if m and (int(m.group(1)), int(m.group(2))) < (2, 31):
            raise TickError(f"git {m.group(1).decode()}.{m.group(2).decode()} is too old to pass the sync key via GIT_CONFIG_COUNT "
                            "(need >= 2.31); upgrade git or use a non-http remote")

    def fetch(self) -> str:
        env: dict[str, str] = {}
        if self.cfg.remote_is_http and self.cfg.send_credentials:
            self._check_git_version()
            _ = self.sync_key
            env = {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": "Authorization: Basic " + self._basic_token(),
            }
        ref = "refs/pi-pull/tip"
        r = self.git("-c", "credential.helper=", "-c", "fetch.fsckObjects=true", "-c", "http.lowSpeedLimit=1",
                     "-c", "http.lowSpeedTime=60", "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                     "--no-recurse-submodules", self.cfg.remote_url,
                     f"+refs/heads/{self.cfg.branch}:{ref}", env=env, timeout=self.cfg.fetch_timeout)
        if r.returncode != 0:
            detail = _short(r.stderr) or f"rc={r.returncode}"
            raise TickError(f"fetch from {self._safe_url()} failed: {detail}")
        r = self.git("rev-parse", "--verify", "--quiet", ref + "^{commit}")
        sha = r.stdout.decode().strip()
        if r.returncode != 0 or not SHA_RE.match(sha):
            raise TickError(f"fetched ref {self.cfg.branch} does not name a commit")
        return sha

    def _safe_url(self) -> str:
        return re.sub(r"//[^/@]*@", "//***@", self.cfg.remote_url)

    def verify(self, sha: str) -> None:
        if not os.path.isfile(self.cfg.allowed_signers) or os.path.getsize(self.cfg.allowed_signers) == 0:
            raise TickError(f"allowed_signers {self.cfg.allowed_signers} is missing or empty; refusing to trust anything")
        args = ["-c", "gpg.ssh.allowedSignersFile=" + self.cfg.allowed_signers,
                "-c", "gpg.ssh.program=" + self.cfg.ssh_keygen]
        if self.cfg.revoked_signers:
            args += ["-c", "gpg.ssh.revocationFile=" + self.cfg.revoked_signers]
        r = self.git(*args, "verify-commit", sha)
        if r.returncode == 0:
            return
        raw = self.git("cat-file", "commit", sha).stdout
        header = raw.split(b"\n\n", 1)[0]
        if b"\ngpgsig " not in header and b"\ngpgsig-sha256 " not in header:
            raise Refused(f"commit {sha[:12]} is not signed")
        if b"BEGIN SSH SIGNATURE" not in raw:
            raise Refused(f"commit {sha[:12]} is not SSH-signed (only ssh signatures are trusted)")
        detail = _short(r.stderr + r.stdout, 200) or f"rc={r.returncode}"
        raise Refused(f"commit {sha[:12]} is not signed by a trusted key ({detail})")

    def is_ancestor(self, old: str, new: str) -> bool:
        r = self.git("merge-base", "--is-ancestor", old, new)
        return r.returncode == 0

    # ---- materialise

    def list_rendered(self, sha: str) -> dict[str, dict[str, str]]:
        """Blob ids of each domain's rendered files: {domain: {file name: blob id}}."""
        r = self.git("ls-tree", "-r", "-z", sha, "--", "rendered/domains/")
        if r.returncode != 0:
            raise TickError(f"git ls-tree {sha[:12]} failed: {_short(r.stderr)}")
        wanted: dict[str, dict[str, str]] = {}
        for entry in r.stdout.split(b"\0"):
            if not entry:
                continue
            meta, _, pathb = entry.partition(b"\t")
            try:
                mode, otype, oid = meta.decode("ascii").split(" ")
                path = pathb.decode("utf-8")
            except (UnicodeDecodeError, ValueError):
                raise Refused("undecodable tree entry under rendered/") from None
            parts = path.split("/")
            if len(parts) != 5 or parts[4] not in DOMAIN_FILES:
                self.log.debug(f"ignoring rendered path {path}")
                continue
            bb, domain, fname = parts[2], parts[3], parts[4]
            if not DOMAIN_RE.match(domain) or bb != domain[:2]:
                raise Refused("unsafe or misplaced domain directory {!r}".format("/".join(parts[:4])))
            if otype != "blob" or mode not in ("100644", "100755"):
                raise Refused(f"{path} is not a regular file (mode {mode})")
            wanted.setdefault(domain, {})[fname] = oid
        for domain, files in wanted.items():
            if "virtual_mailbox_domains" not in files:
                raise Refused(f"rendered/ for {domain} lacks virtual_mailbox_domains")
        return wanted

    def _cat_blobs(self, oids: list[str]) -> dict[str, bytes]:
        if not oids:
            return {}
        r = self.git("cat-file", "--batch", input=("\n".join(oids) + "\n").encode())
        if r.returncode != 0:
            raise TickError(f"git cat-file failed: {_short(r.stderr)}")
        data = r.stdout
        pos = 0
        blobs: dict[str, bytes] = {}
        for oid in oids:
            nl = data.index(b"\n", pos)
            header = data[pos:nl].decode("ascii", "replace").split(" ")
            if len(header) != 3 or header[0] != oid or header[1] != "blob":
                raise TickError("git cat-file: unexpected answer for {}: {}".format(oid, " ".join(header)[:100]))
            size = int(header[2])
            blobs[oid] = data[nl + 1: nl + 1 + size]
            pos = nl + 1 + size + 1
        return blobs

    def _reuse_key(self) -> str:
        return json.dumps([VALIDATOR_VERSION, self.cfg.passwd_group, self.cfg.mail_root])

    def build_release(self, sha: str, previous: str | None) -> dict[str, Any]:
        """Materialise rendered/ of ``sha`` into releases/<sha> (validated, postmapped).

        Domains whose three blobs are unchanged since ``previous`` (the live release) are not
        re-read or re-validated: their passwd-file is hard-linked from it, so a one-mailbox
        change costs little even with 100k mailboxes, and unchanged files keep their mtime.
        """
        tree = self.list_rendered(sha)
        prev = self.manifest(previous)
        prev_files: dict[str, list[Any]] = {}
        if previous and prev.get("reuse_key") == self._reuse_key() and isinstance(prev.get("files"), dict):
            prev_files = prev["files"]
        prev_passwd_dir = os.path.join(self.releases, previous or "-", "dovecot", "passwd.d")

        keys: dict[str, list[str]] = {}
        reuse: set[str] = set()
        need: set[str] = set()
        for domain, files in tree.items():
            key = [files.get("passwd", ""), files.get("virtual_mailbox_maps", ""), files["virtual_mailbox_domains"]]
            keys[domain] = key
            old = prev_files.get(domain)
            if isinstance(old, list) and old[:3] == key and os.path.isfile(os.path.join(prev_passwd_dir, domain)):
                reuse.add(domain)
                need.update(key[1:])
            else:
                need.update(key)
        need.discard("")
        blobs = self._cat_blobs(sorted(need))
        blobs[""] = b""
        counts: dict[str, int] = {}
        for domain in sorted(tree):  # validate everything new before writing anything
            if domain in reuse:
                counts[domain] = int(prev_files[domain][3])
            else:
                p_oid, m_oid, d_oid = keys[domain]
                counts[domain] = validate_domain(domain, blobs[p_oid], blobs[m_oid], blobs[d_oid], self.cfg.mail_root)

        os.makedirs(self.releases, mode=0o755, exist_ok=True)
        final = os.path.join(self.releases, sha)
        tmp = os.path.join(self.releases, f".tmp-{sha[:12]}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            passwd_dir = os.path.join(tmp, "dovecot", "passwd.d")
            os.makedirs(os.path.join(tmp, "postfix"), mode=0o755)
            os.makedirs(passwd_dir, mode=0o755)
            gid = grp.getgrnam(self.cfg.passwd_group).gr_gid if self.cfg.passwd_group else -1
            pw_mode = 0o640 if self.cfg.passwd_group else 0o644
            files_manifest: dict[str, list[Any]] = {}
            vmd_parts: list[bytes] = []
            vmm_parts: list[bytes] = []
            mailboxes = 0
            for domain in sorted(tree):
                p_oid, m_oid, d_oid = keys[domain]
                target = os.path.join(passwd_dir, domain)
                linked = False
                if domain in reuse:
                    try:
                        os.link(os.path.join(prev_passwd_dir, domain), target)
                        linked = True
                    except OSError:
                        pass
                if not linked:
                    if p_oid not in blobs:
                        blobs.update(self._cat_blobs([p_oid]))
                    _write_file(target, blobs[p_oid], pw_mode)
                    if gid >= 0:
                        os.chown(target, 0 if os.geteuid() == 0 else -1, gid)
                mailboxes += counts[domain]
                files_manifest[domain] = [p_oid, m_oid, d_oid, counts[domain]]
                for part, lst in ((blobs[d_oid], vmd_parts), (blobs[m_oid], vmm_parts)):
                    if part and not part.endswith(b"\n"):
                        part += b"\n"
                    lst.append(part)
            _write_file(os.path.join(tmp, "postfix", "virtual_mailbox_domains"), b"".join(vmd_parts))
            _write_file(os.path.join(tmp, "postfix", "virtual_mailbox_maps"), b"".join(vmm_parts))
            self.postmap(tmp)
            manifest = {
                "commit": sha,
                "built_at": _utcnow(),
                "map_type": self.cfg.map_type,
                "reuse_key": self._reuse_key(),
                "postfix_digest": _digest([(d, f"{v[1]} {v[2]}".encode()) for d, v in files_manifest.items()]
                                          + [("\0map_type", self.cfg.map_type.encode())]),
                "dovecot_digest": _digest([(d, v[0].encode()) for d, v in files_manifest.items()]),
                "domains": len(files_manifest),
                "mailboxes": mailboxes,
                "reused_domains": len(reuse),
                "files": files_manifest,
            }
            _write_file(os.path.join(tmp, "MANIFEST.json"), (json.dumps(manifest, sort_keys=True) + "\n").encode())
            _write_file(os.path.join(tmp, "COMMIT"), (sha + "\n").encode())
            if os.path.lexists(final):
                self._rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def postmap(self, release: str) -> None:
        if self.cfg.map_type not in POSTMAP_TYPES:
            return
        base = shlex.split(self.cfg.postmap)
        for name in MAP_FILES:
            target = "{}:{}".format(self.cfg.map_type, os.path.join(release, "postfix", name))
            r = self.runner.run([*base, target], timeout=600)
            if r.returncode != 0:
                detail = _short(r.stderr) or f"rc={r.returncode}"
                raise TickError(f"postmap {name} failed: {detail}")

    def _rmtree(self, path: str) -> None:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)

    # ---- current / swap

    def current_commit(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if SHA_RE.match(name) and os.path.isdir(os.path.join(self.releases, name)):
            return name
        return None

    def swap_to(self, sha: str | None) -> None:
        """Point ``current`` at releases/<sha> atomically (or remove it if sha is None)."""
        if sha is None:
            try:
                os.unlink(self.current)
            except FileNotFoundError:
                pass
            _fsync_dir(self.root)
            return
        tmp = os.path.join(self.root, f".current.tmp-{os.getpid()}")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(os.path.join("releases", sha), tmp)
        os.replace(tmp, self.current)
        _fsync_dir(self.root)

    def manifest(self, sha: str | None) -> dict[str, Any]:
        if not sha:
            return {}
        try:
            with open(os.path.join(self.releases, sha, "MANIFEST.json"), encoding="utf-8") as fh:
                m = json.load(fh)
                return m if isinstance(m, dict) else {}
        except (OSError, ValueError):
            return {}

    def reload(self, which: Sequence[str]) -> list[str]:
        """Run the reload commands for ``which``; return failure messages."""
        failures = []
        for svc in which:
            cmd = self.cfg.postfix_reload if svc == "postfix" else self.cfg.dovecot_reload
            if not cmd:
                self.log.debug(f"no {svc}_reload command configured; not reloading {svc}")
                continue
            r = self.runner.shell(cmd, timeout=self.cfg.reload_timeout)
            if r.returncode != 0:
                failures.append(f"{svc} reload failed (rc={r.returncode}): {_short(r.stderr + r.stdout, 200)}")
        return failures

    # ---- prune

    def prune(self, st: dict[str, Any]) -> None:
        keep = set(st["history"][: self.cfg.keep_releases])
        for s in (self.current_commit(), st.get("applied_commit"), st.get("previous_commit")):
            if s:
                keep.add(s)
        try:
            names = os.listdir(self.releases)
        except FileNotFoundError:
            return
        for name in names:
            if name in keep:
                continue
            path = os.path.join(self.releases, name)
            try:
                self._rmtree(path)
                self.log.debug(f"pruned release {name}")
            except OSError as e:
                self.log.warning(f"cannot prune {path}: {e}")
        st["history"] = [s for s in st["history"] if s in keep or os.path.isdir(os.path.join(self.releases, s))]

    # ---- report

    def _post(self, report: dict[str, Any]) -> None:
        body = dict(report)
        body["name"] = self.cfg.node_name
        body["sync_key"] = self.sync_key
        req = urllib.request.Request(self.cfg.report_url, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + self._basic_token(),
            "User-Agent": "pi-pull",
        })
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.report_timeout) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as e:
            reason = {401: "bad node name or sync key", 403: "address not on the node's whitelist"}.get(e.code, "")
            raise TickError(f"report rejected: HTTP {e.code} {reason or e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            why: object = e.reason if isinstance(e, urllib.error.URLError) else e
            raise TickError(f"report to {self.cfg.report_url} failed: {why}") from None

    def report(self, st: dict[str, Any], result: TickResult) -> None:
        if not self.cfg.report_url:
            return
        current = {"applied_commit": st.get("applied_commit"), "status": result.status, "error": result.error}
        pending = [r for r in st.get("pending_reports", []) if isinstance(r, dict)]
        queue = pending + ([current] if not pending or pending[-1] != current else [])
        sent = 0
        for rep in queue:
            try:
                self._post(rep)
            except TickError as e:
                self.log.warning(f"{e}; keeping {len(queue) - sent} report(s) to send next tick")
                break
            sent += 1
        st["pending_reports"] = queue[sent:][-PENDING_MAX:]
        if pending and sent:
            self.log.info(f"delivered {min(sent, len(pending))} pending report(s)")

    # ---- the tick

    def tick(self) -> TickResult:
        t0 = time.monotonic()
        self.acquire_lock()
        try:
            try:
                st, original = self.load_state()
            except TickError as e:
                self.log.error(str(e))
                return TickResult("error", EXIT_ERROR, None, str(e), error=str(e))
            try:
                result = self._tick(st)
            except Refused as e:
                result = TickResult("refused", EXIT_REFUSED, st.get("applied_commit"), f"refused: {e}", error=str(e))
            except TickError as e:
                result = TickResult("error", EXIT_ERROR, st.get("applied_commit"), f"error: {e}", error=str(e))
            except ConfigError:
                raise
            except Exception as e:  # keep serving; report what went wrong
                msg = f"{type(e).__name__}: {e}"
                result = TickResult("error", EXIT_ERROR, st.get("applied_commit"), "error: " + msg, error=msg)
            if result.status != "ok" or result.changed:
                st["last_status"] = result.status
                st["last_error"] = result.error
            elif st.get("last_status") not in (None, "ok"):
                st["last_status"] = "ok"
                st["last_error"] = None
            try:
                self.report(st, result)
            except ConfigError:
                raise
            elapsed = time.monotonic() - t0
            line = f"{result.message} ({elapsed:.2f}s)"
            if result.status == "ok":
                self.log.info(line)
            else:
                self.log.error(line)
            try:
                self.save_state(st, original)
            except OSError as e:
                self.log.error(f"cannot write {self.state_path}: {e}")
            return result
        finally:
            self.release_lock()

    def _tick(self, st: dict[str, Any]) -> TickResult:
        self.ensure_mirror()
        tip = self.fetch()
        applied = st.get("applied_commit")
        current = self.current_commit()
        if applied and tip == applied and current == applied:
            return TickResult("ok", EXIT_OK, applied, f"up to date at {applied[:12]}")

        self.verify(tip)
        if applied and tip != applied and not self.is_ancestor(applied, tip):
            raise Refused(f"rollback: fetched {tip[:12]} does not descend from applied {applied[:12]} (force-push to an older or "
                          "unrelated commit?)")

        t_build = time.monotonic()
        fallback: str | None = current
        if current == tip and self.manifest(tip):
            # A previous run swapped to tip but died before recording it: adopt the live
            # release (never rebuild the directory `current` points at) and reload both.
            new = self.manifest(tip)
            changed = ["postfix", "dovecot"]
            fallback = applied if applied and applied != tip and os.path.isdir(
                os.path.join(self.releases, applied)) else None
        else:
            new = self.build_release(tip, current)
            old = self.manifest(current)
            changed = []
            if not old or old.get("postfix_digest") != new["postfix_digest"]:
                changed.append("postfix")
            if not old or old.get("dovecot_digest") != new["dovecot_digest"]:
                changed.append("dovecot")
            if self.cfg.sync:
                os.sync()
            self.swap_to(tip)
        build_s = time.monotonic() - t_build
        failures = self.reload(changed)
        if failures:
            self.swap_to(fallback)
            again = self.reload(changed)
            if fallback != tip:
                try:
                    self._rmtree(os.path.join(self.releases, tip))
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

        if applied != tip:
            st["previous_commit"] = fallback if fallback and fallback != tip else applied
        st["applied_commit"] = tip
        st["applied_at"] = _utcnow()
        st["history"] = [tip, *[s for s in st.get("history", []) if s != tip][:HISTORY_MAX - 1]]
        self.prune(st)
        r = self.git("-c", "gc.auto=6700", "gc", "--auto", "--quiet", timeout=600)
        if r.returncode != 0:
            self.log.warning(f"git gc --auto failed: {_short(r.stderr)}")
        reloaded = ", ".join(changed) if changed else "nothing (no service files changed)"
        return TickResult("ok", EXIT_OK, tip,
                          f"applied {tip[:12]}: {new['domains']} domains, {new['mailboxes']} mailboxes, "
                          f"build {build_s:.2f}s, reloaded {reloaded}", changed=True)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi_pull.py",
        description="mailstate node agent: fetch the signed state repo, verify, and apply rendered/ "
                    "Postfix/Dovecot files atomically.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="INI config file (see pi-pull.example.ini)")
    p.add_argument("--once", action="store_true", help="run one tick and exit (what the systemd timer does)")
    p.add_argument("-v", "--verbose", action="store_true", help="also log debug lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
        return EXIT_USAGE if code not in (0,) else 0
    log = Log(verbose=args.verbose)
    try:
        cfg = load_config(args.config)
        agent = Agent(cfg, log=log)
        if cfg.needs_key:
            _ = agent.sync_key  # fail early on a missing/unsafe key file
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE

    def one() -> int:
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

    if args.once:
        return one()

    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["flag"]:
        code = one()
        if code == EXIT_USAGE:
            return code
        deadline = time.monotonic() + cfg.interval
        while not stop["flag"] and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
