"""The INI config (see pi-pull.example.ini) and the sync key file."""

from __future__ import annotations

import configparser
import grp
import os
import re
import shlex
import stat
from dataclasses import dataclass

from .errors import ConfigError
from .rules import NODE_NAME_RULE, is_node_name

POSTMAP_TYPES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm")
MAP_TYPES = (*POSTMAP_TYPES, "texthash")


@dataclass
class Config:
    """Every setting of one node; defaults are those of an empty config section."""

    remote_url: str
    send_credentials: bool = False
    # Follow mode (pipull/follow.py): the server's long poll, when [remote] url is not the server.
    wake_url: str = ""
    node_name: str = ""
    sync_key_file: str = ""
    allowed_signers: str = ""
    revoked_signers: str = ""
    root: str = "/var/lib/pi-pull"
    keep_releases: int = 5
    passwd_group: str = ""
    mail_root: str = ""
    mail_uid: int = 0
    mail_gid: int = 0
    sync: bool = True
    report_url: str = ""
    report_timeout: float = 10.0
    postfix_reload: str = ""
    dovecot_reload: str = ""
    reload_timeout: float = 120.0
    map_type: str = "hash"
    postmap: str = "postmap"
    # 0: one table per map and a flat passwd.d (older bundles); N: N tables per map and
    # passwd.d/<c>/<bb>/ (pipull/buckets.py; main.cf and Dovecot's args must match).
    map_buckets: int = 0
    git: str = "git"
    ssh_keygen: str = "ssh-keygen"
    fetch_timeout: float = 300.0
    interval: float = 60.0
    poll_interval: float = 5.0  # follow mode without a long poll: seconds between ls-remote looks
    max_fetch_mb: int = 256
    max_file_mb: int = 32
    # [lifecycle] (pipull/lifecycle.py): graveyard moves and purge on this node; usage every N seconds.
    purge: bool = True
    usage_interval: float = 900.0
    usage_budget_s: float = 2.0  # seconds of usage measurement per tick at most (usage.Scanner)
    # [freshness]: a tick whose newest verified statement is older than max_staleness seconds is
    # "stale" (exit 5, keeps serving; 0 = never). clock_skew: how far in the future an Issued-At,
    # a committer time or an endorsement may lie before it is refused.
    max_staleness: float = 600.0
    clock_skew: float = 300.0
    # [dkim] (pipull/dkim.py): this node's signing keys and OpenDKIM's tables; off unless enabled.
    dkim: bool = False
    dkim_key_dir: str = "/etc/pi-pull/dkim"
    dkim_key_owner: str = "opendkim"
    dkim_publish_wait: float = 86400.0
    dkim_rotate_days: float = 0.0
    dkim_reload: str = "systemctl reload opendkim"
    dkim_openssl: str = "openssl"
    # [spam] (pipull/spam.py): rspamd filters port 25; each report says whether it answers.
    spam: bool = False
    spam_controller: str = "127.0.0.1:11334"
    spam_rspamc: str = "rspamc"
    spam_reload: str = "systemctl reload rspamd"  # after pipull/spampolicy.py rewrote rspamd's settings
    # [postscreen] (pipull/postscreen.py): where each report counts postscreen's refusals: a log file,
    # "journal", "auto" (the mail log if there is one, else the journal) or "" (not counted).
    postscreen_log: str = ""
    postscreen_journalctl: str = "journalctl"
    # [owners] (pipull/ownerfiles.py): which app passwords logged in, from Dovecot's stats.
    doveadm: str = "doveadm"
    # [policy] (pipull/policy.py): the submission ports' outbound limits (Postfix check_policy_service).
    policy_listen: str = "127.0.0.1:10040"
    policy_db: str = ""  # default <root>/policy/counts.sqlite
    # [fleet] (pipull/fleet.py): how this node relays, proxies and syncs to the other nodes of a
    # fleet whose nodes have addresses. Every node of a fleet uses the same ports.
    fleet_dir: str = ""  # default <root>/fleet: Dovecot include, TLS tables, credentials (0700)
    fleet_relay_port: int = 2525
    fleet_doveadm_port: int = 12345
    fleet_tls_cert: str = "/etc/pi-pull/tls/fullchain.pem"
    fleet_tls_key: str = "/etc/pi-pull/tls/privkey.pem"
    # The policy service's fleet listener (pipull/policyfleet.py): a node that is not a login's
    # home asks the home's policy service here, waiting at most policy_timeout seconds.
    fleet_policy_port: int = 10041
    fleet_policy_timeout: float = 1.0
    fleet_ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    fleet_dovecot_config: str = "/etc/dovecot/dovecot.conf"
    fleet_doveadm: str = "doveadm"
    fleet_postqueue: str = "postqueue"
    fleet_postmap: str = ""  # default: [services] postmap
    fleet_url: str = ""  # default: [report] url with /fleet for /report
    fleet_sync_budget_s: float = 20.0
    fleet_sync_stall_s: float = 30.0  # doveadm sync -T: a stream stalled this long is given up, retried
    fleet_replicate_interval: float = 1.0  # follow mode: seconds between passes of changed mailboxes
    fleet_replicate_full_s: float = 600.0  # a replicated mailbox is synced at least this often

    @property
    def max_fetch_bytes(self) -> int:
        return self.max_fetch_mb * 1024 * 1024

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024

    @property
    def remote_is_http(self) -> bool:
        return self.remote_url.lower().startswith(("http://", "https://"))

    @property
    def needs_key(self) -> bool:
        return bool(self.report_url) or bool(self.wake_url) or (self.remote_is_http and self.send_credentials)


class _Reader:
    """Typed access to the parsed file; every failure is a ConfigError naming file and key."""

    def __init__(self, cp: configparser.ConfigParser, path: str) -> None:
        self.cp = cp
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def get_str(self, section: str, key: str, default: str | None = None) -> str:
        if self.cp.has_option(section, key):
            return self.cp.get(section, key).strip()
        if default is None:
            raise ConfigError(f"config {self.path}: missing [{section}] {key}")
        return default

    def get_path(self, section: str, key: str, default: str | None = None) -> str:
        v = self.get_str(section, key, default)
        if v and not os.path.isabs(v):
            v = os.path.normpath(os.path.join(self.base, v))
        return v

    def get_bool(self, section: str, key: str, default: bool) -> bool:
        try:
            return self.cp.getboolean(section, key, fallback=default)
        except ValueError:
            raise ConfigError(f"[{section}] {key}: expected yes/no, got {self.cp.get(section, key)!r}") from None

    def get_int(self, section: str, key: str, default: int) -> int:
        try:
            return self.cp.getint(section, key, fallback=default)
        except ValueError:
            raise ConfigError(self._not_a_number(section, key)) from None

    def get_float(self, section: str, key: str, default: float) -> float:
        try:
            return self.cp.getfloat(section, key, fallback=default)
        except ValueError:
            raise ConfigError(self._not_a_number(section, key)) from None

    def _not_a_number(self, section: str, key: str) -> str:
        return f"config {self.path}: [{section}] {key} must be a number, got {self.cp.get(section, key).strip()!r}"


def _parse(path: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fh:
            cp.read_file(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except configparser.Error as e:
        raise ConfigError("cannot parse config {}: {}".format(path, " ".join(str(e).split()))) from None
    return cp


def _remote_url(r: _Reader) -> str:
    url = r.get_str("remote", "url")
    is_http = url.lower().startswith(("http://", "https://"))
    if not is_http and "://" not in url and ":" not in url.split("/")[0] and not os.path.isabs(url):
        url = os.path.normpath(os.path.join(r.base, url))  # relative local path
    return url


def load_config(path: str) -> Config:
    """Parse and check the INI config file (see pi-pull.example.ini)."""
    r = _Reader(_parse(path), path)
    cfg = Config(remote_url=_remote_url(r))
    # [remote] branch (older configs) is ignored: a node follows the accepted-head statement.
    cfg.send_credentials = r.get_bool("remote", "send_credentials", cfg.remote_is_http)
    cfg.node_name = r.get_str("node", "name", "")
    cfg.sync_key_file = r.get_path("node", "sync_key_file", "")
    cfg.allowed_signers = r.get_path("node", "allowed_signers")
    cfg.revoked_signers = r.get_path("node", "revoked_signers", "")
    cfg.root = r.get_path("paths", "root", "/var/lib/pi-pull")
    cfg.keep_releases = r.get_int("paths", "keep_releases", 5)
    cfg.passwd_group = r.get_str("paths", "passwd_group", "")
    cfg.mail_root = r.get_str("paths", "mail_root", "")
    cfg.mail_uid = r.get_int("paths", "mail_uid", 0)
    cfg.mail_gid = r.get_int("paths", "mail_gid", 0)
    cfg.sync = r.get_bool("paths", "sync", True)
    cfg.report_url = r.get_str("report", "url", "")
    cfg.report_timeout = r.get_float("report", "timeout", 10.0)
    cfg.postfix_reload = r.get_str("services", "postfix_reload", "")
    cfg.dovecot_reload = r.get_str("services", "dovecot_reload", "")
    cfg.reload_timeout = r.get_float("services", "reload_timeout", 120.0)
    cfg.map_type = r.get_str("services", "map_type", "hash")
    cfg.postmap = r.get_str("services", "postmap", "postmap")
    cfg.map_buckets = r.get_int("services", "map_buckets", 0)
    cfg.git = r.get_str("agent", "git", "git")
    cfg.ssh_keygen = r.get_str("agent", "ssh_keygen", "ssh-keygen")
    cfg.fetch_timeout = r.get_float("agent", "fetch_timeout", 300.0)
    cfg.interval = r.get_float("agent", "interval", 60.0)
    cfg.poll_interval = r.get_float("agent", "poll_interval", 5.0)
    cfg.wake_url = r.get_str("remote", "wake_url", "")
    cfg.max_fetch_mb = r.get_int("limits", "max_fetch_mb", cfg.max_fetch_mb)
    cfg.max_file_mb = r.get_int("limits", "max_file_mb", cfg.max_file_mb)
    cfg.purge = r.get_bool("lifecycle", "purge", True)
    cfg.usage_interval = r.get_float("lifecycle", "usage_interval", 900.0)
    cfg.usage_budget_s = r.get_float("lifecycle", "usage_budget_s", 2.0)
    cfg.max_staleness = r.get_float("freshness", "max_staleness", cfg.max_staleness)
    cfg.clock_skew = r.get_float("freshness", "clock_skew", cfg.clock_skew)
    _load_dkim(r, cfg)
    cfg.spam = r.get_bool("spam", "enabled", False)
    cfg.spam_controller = r.get_str("spam", "controller", cfg.spam_controller)
    cfg.spam_rspamc = r.get_str("spam", "rspamc", cfg.spam_rspamc)
    cfg.spam_reload = r.get_str("spam", "reload", cfg.spam_reload)
    log = r.get_str("postscreen", "log", "")
    cfg.postscreen_log = log if log in ("", "auto", "journal") else r.get_path("postscreen", "log", "")
    cfg.postscreen_journalctl = r.get_str("postscreen", "journalctl", cfg.postscreen_journalctl)
    cfg.doveadm = r.get_str("owners", "doveadm", cfg.doveadm)
    cfg.policy_listen = r.get_str("policy", "listen", cfg.policy_listen)
    cfg.policy_db = r.get_path("policy", "db", os.path.join(cfg.root, "policy", "counts.sqlite"))
    _load_fleet(r, cfg)
    check_config(cfg, path)
    return cfg


def _load_fleet(r: _Reader, cfg: Config) -> None:
    cfg.fleet_dir = r.get_path("fleet", "dir", os.path.join(cfg.root, "fleet"))
    cfg.fleet_relay_port = r.get_int("fleet", "relay_port", cfg.fleet_relay_port)
    cfg.fleet_doveadm_port = r.get_int("fleet", "doveadm_port", cfg.fleet_doveadm_port)
    cfg.fleet_tls_cert = r.get_path("fleet", "tls_cert", cfg.fleet_tls_cert)
    cfg.fleet_tls_key = r.get_path("fleet", "tls_key", cfg.fleet_tls_key)
    cfg.fleet_policy_port = r.get_int("fleet", "policy_port", cfg.fleet_policy_port)
    cfg.fleet_policy_timeout = r.get_float("fleet", "policy_timeout", cfg.fleet_policy_timeout)
    cfg.fleet_ca_bundle = r.get_path("fleet", "ca_bundle", cfg.fleet_ca_bundle)
    cfg.fleet_dovecot_config = r.get_path("fleet", "dovecot_config", cfg.fleet_dovecot_config)
    cfg.fleet_doveadm = r.get_str("fleet", "doveadm", cfg.fleet_doveadm)
    cfg.fleet_postqueue = r.get_str("fleet", "postqueue", cfg.fleet_postqueue)
    cfg.fleet_postmap = r.get_str("fleet", "postmap", cfg.postmap)
    default_url = cfg.report_url[: -len("/report")] + "/fleet" if cfg.report_url.endswith("/report") else ""
    cfg.fleet_url = r.get_str("fleet", "url", default_url)
    cfg.fleet_sync_budget_s = r.get_float("fleet", "sync_budget_s", cfg.fleet_sync_budget_s)
    cfg.fleet_sync_stall_s = r.get_float("fleet", "sync_stall_s", cfg.fleet_sync_stall_s)
    cfg.fleet_replicate_interval = r.get_float("fleet", "replicate_interval", cfg.fleet_replicate_interval)
    cfg.fleet_replicate_full_s = r.get_float("fleet", "replicate_full_s", cfg.fleet_replicate_full_s)


def _check_fleet(cfg: Config, path: str) -> None:
    for key in ("fleet_relay_port", "fleet_doveadm_port", "fleet_policy_port"):
        if not 1 <= getattr(cfg, key) <= 65535:
            raise ConfigError(f"config {path}: [fleet] {key[6:]} must be a port number (1-65535)")
    if cfg.fleet_url and not cfg.fleet_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"config {path}: [fleet] url must be http(s) (the server's /v1/nodes/fleet)")
    if not 0.1 <= cfg.fleet_policy_timeout <= 30:
        raise ConfigError(f"config {path}: [fleet] policy_timeout must be 0.1 to 30 seconds (Postfix waits for it)")
    if not cfg.fleet_sync_budget_s > 0:
        raise ConfigError(f"config {path}: [fleet] sync_budget_s must be > 0 (seconds of doveadm sync per tick)")
    if not cfg.fleet_sync_stall_s >= 1:
        raise ConfigError(f"config {path}: [fleet] sync_stall_s must be >= 1 (seconds a doveadm sync may stall)")
    if not 0.1 <= cfg.fleet_replicate_interval <= 3600:
        raise ConfigError(f"config {path}: [fleet] replicate_interval must be 0.1-3600 (seconds between passes)")
    if not cfg.fleet_replicate_full_s >= 10:
        raise ConfigError(f"config {path}: [fleet] replicate_full_s must be >= 10 (seconds between full syncs)")
    for key in ("fleet_doveadm", "fleet_postqueue", "fleet_postmap"):
        try:
            shlex.split(getattr(cfg, key))
        except ValueError as e:
            raise ConfigError(f"config {path}: [fleet] {key[6:]}: {e}") from None


def _load_dkim(r: _Reader, cfg: Config) -> None:
    cfg.dkim = r.get_bool("dkim", "enabled", False)
    cfg.dkim_key_dir = r.get_path("dkim", "key_dir", cfg.dkim_key_dir)
    cfg.dkim_key_owner = r.get_str("dkim", "key_owner", cfg.dkim_key_owner)
    cfg.dkim_publish_wait = r.get_float("dkim", "publish_wait", cfg.dkim_publish_wait)
    cfg.dkim_rotate_days = r.get_float("dkim", "rotate_days", cfg.dkim_rotate_days)
    cfg.dkim_reload = r.get_str("dkim", "reload", cfg.dkim_reload)
    cfg.dkim_openssl = r.get_str("dkim", "openssl", cfg.dkim_openssl)


def _check_dkim(cfg: Config, path: str) -> None:
    if not cfg.dkim:
        return
    if not cfg.node_name:
        raise ConfigError(f"config {path}: [dkim] needs the [node] name: the selectors are ms1-<name> and ms2-<name>")
    if cfg.dkim_publish_wait < 0 or cfg.dkim_rotate_days < 0:
        raise ConfigError(f"config {path}: [dkim] publish_wait and rotate_days must be >= 0")
    if not cfg.dkim_key_dir.startswith("/"):
        raise ConfigError(f"config {path}: [dkim] key_dir must be an absolute path")
    for key in ("dkim_reload", "dkim_openssl"):
        try:
            shlex.split(getattr(cfg, key))
        except ValueError as e:
            raise ConfigError(f"config {path}: [dkim] {key[5:]}: {e}") from None


def _check_spam(cfg: Config, path: str) -> None:
    if not cfg.spam:
        return
    host, _, port = cfg.spam_controller.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in host):
        raise ConfigError(f"config {path}: [spam] controller must be HOST:PORT, e.g. 127.0.0.1:11334")
    for key in ("rspamc", "reload"):
        try:
            if not shlex.split(getattr(cfg, "spam_" + key)) and key == "rspamc":
                raise ValueError("empty")
        except ValueError as e:
            raise ConfigError(f"config {path}: [spam] {key}: {e}") from None


def _check_postscreen(cfg: Config, path: str) -> None:
    try:
        if not shlex.split(cfg.postscreen_journalctl):
            raise ValueError("empty")
    except ValueError as e:
        raise ConfigError(f"config {path}: [postscreen] journalctl: {e}") from None


def check_config(cfg: Config, path: str) -> None:
    """Reject values that would only fail later, mid-tick."""
    _check_mail(cfg, path)
    _check_dkim(cfg, path)
    _check_fleet(cfg, path)
    _check_spam(cfg, path)
    _check_postscreen(cfg, path)
    if cfg.max_fetch_mb < 1 or cfg.max_file_mb < 1:
        raise ConfigError(f"config {path}: [limits] max_fetch_mb and max_file_mb must be >= 1")
    if cfg.map_type not in MAP_TYPES:
        raise ConfigError("config {}: [services] map_type must be one of {}".format(path, ", ".join(MAP_TYPES)))
    if not 0 <= cfg.map_buckets <= 256:
        raise ConfigError(f"config {path}: [services] map_buckets must be between 0 and 256")
    if cfg.map_buckets and cfg.map_type not in ("hash", "btree", "lmdb"):
        raise ConfigError(
            f"config {path}: [services] map_buckets needs a map_type that postmap -i updates in place "
            f"(hash, btree or lmdb), not {cfg.map_type}"
        )
    if cfg.keep_releases < 1:
        raise ConfigError(f"config {path}: [paths] keep_releases must be >= 1")
    if cfg.interval <= 0:
        raise ConfigError(f"config {path}: [agent] interval must be > 0")
    if not 0.5 <= cfg.poll_interval <= 3600:
        raise ConfigError(f"config {path}: [agent] poll_interval must be 0.5 to 3600 seconds")
    if cfg.wake_url and not cfg.wake_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"config {path}: [remote] wake_url must be http(s) (the server's /v1/nodes/wait)")
    if cfg.usage_interval < 0:
        raise ConfigError(f"config {path}: [lifecycle] usage_interval must be >= 0 (seconds; 0 = never measure)")
    if not cfg.usage_budget_s > 0:
        raise ConfigError(
            f"config {path}: [lifecycle] usage_budget_s must be > 0 (seconds of usage measurement per tick)"
        )
    if not cfg.max_staleness >= 0:
        raise ConfigError(f"config {path}: [freshness] max_staleness must be >= 0 (seconds; 0 = never stale)")
    if not 0 <= cfg.clock_skew <= 86400:
        raise ConfigError(f"config {path}: [freshness] clock_skew must be between 0 and 86400 seconds")
    host, _, port = cfg.policy_listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"config {path}: [policy] listen must be HOST:PORT, e.g. 127.0.0.1:10040")
    if cfg.report_url and not cfg.report_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"config {path}: [report] url must be http(s)")
    if cfg.node_name and not is_node_name(cfg.node_name):
        raise ConfigError(f"config {path}: [node] name must be {NODE_NAME_RULE}, as the server registered it")
    if cfg.needs_key:
        if not cfg.node_name:
            raise ConfigError(f"config {path}: [node] name must be set")
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
    try:
        if not shlex.split(cfg.doveadm):
            raise ValueError("empty")
    except ValueError as e:
        raise ConfigError(f"config {path}: [owners] doveadm: {e}") from None


_MAIL_ROOT_RE = re.compile(r"^/[\x21-\x7e]*$")


def _check_mail(cfg: Config, path: str) -> None:
    """mail_root, mail_uid and mail_gid pin what a passwd line may say: the node's own values,
    never the repo's (`mailstate node bundle` writes the state's settings.mail_root/uid/gid)."""
    hint = "(the state's settings; `mailstate node bundle` writes it)"
    if not cfg.mail_root:
        raise ConfigError(f"config {path}: missing [paths] mail_root, the Maildir root every home must be under {hint}")
    root = cfg.mail_root.rstrip("/")
    if (
        not _MAIL_ROOT_RE.fullmatch(cfg.mail_root)
        or not root
        or ":" in root
        or "/../" in root + "/"
        or "/./" in root + "/"
        or "//" in root
    ):
        raise ConfigError(
            f"config {path}: [paths] mail_root must be an absolute plain path other than / (no ':', spaces, '..')"
        )
    cfg.mail_root = root
    for key in ("mail_uid", "mail_gid"):
        if getattr(cfg, key) < 1:
            raise ConfigError(
                f"config {path}: [paths] {key} must be set to the owner of the Maildirs (a number >= 1) {hint}"
            )


def read_sync_key(path: str) -> str:
    """Read the sync key from its file; refuse group/world-readable files."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ConfigError(f"cannot open sync key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"sync key file {path} has mode {stat.S_IMODE(st.st_mode):o}; it must not be readable by group/others "
                "(chmod 600)"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    key = data.decode("utf-8", "replace").strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"sync key file {path} must hold one non-empty key")
    return key
