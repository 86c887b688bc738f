"""Real mail-node helpers for tests: Postfix + Dovecot on loopback, pi-pull, signed state repos.

Import what you need::

    from tests.helpers.mailnode import MailNode, mailnode, run_pi_pull, StateRepo, make_signing_key

* ``mailnode`` (fixture) starts REAL Dovecot (IMAP + LMTP) and REAL Postfix (SMTP) on free
  loopback ports, configured from the ``templates/node`` snippets and pointed at a pi-pull
  release root (``node.root``), in the map layout a new user's bundle has (``bundle_layout()``:
  what ``mailstate node bundle`` writes without a layout option, 16 hash tables a map); pass
  ``map_type``/``map_buckets`` to ``running_mailnode`` only for a test of another layout. Dovecot runs as root from ``dovecot -c <conf>`` with its own
  base_dir/state_dir; Postfix from ``postfix -c <dir>`` with its own queue/data directories.
  Mail is stored as the ``vmail`` system user (created with ``useradd --system`` if absent).
  Loopback clients are *not* in mynetworks, so they are treated like the outside world
  (unknown domains: 554 relay denied; unknown users: 550).
* Sending: each node has a self-signed certificate (``node.tls_cert``, openssl), the
  bundle's master.cf submission entries on loopback ports (``submission_port``: 587 with
  STARTTLS required; ``smtps_port``: 465 implicit TLS), Dovecot's auth socket for Postfix's SASL,
  IMAP over TLS (``imaps_port``; ``imap()``/``can_login()`` use it, ``imap_plain()`` is the
  port-143 equivalent without TLS), and an SMTP sink (``node.sink``, tests/helpers/smtpsink.py) that
  stands in for the internet: Postfix relays every non-local message to it (relayhost).
  ``node.submit(...)`` logs in over STARTTLS (or implicit TLS) and sends. Set ``dkim_milter``
  (e.g. ``inet:127.0.0.1:PORT``) before ``start()`` to put a milter on the submission services.
* When postfix/dovecot/postmap/doveadm are missing the fixture fails under ``CI=true`` and
  skips otherwise.
* ``node.write_pi_pull_config(...)`` writes a pi-pull ini whose reload/postmap commands
  drive this node's Postfix and Dovecot; ``run_pi_pull(config)`` runs one tick of the
  single-file agent (``pi_pull_script()``: the zipapp a bundle ships, built once per test
  process from pi-pull/pipull). The conftest fixtures ``pi_pull`` (that file) and ``pipull``
  (the package itself, pi-pull/ on sys.path for that test only) serve unit-level tests.
* ``StateRepo`` builds a state repo (bare ``state.git`` + work tree) with the contract's
  ``rendered/`` layout and SSH-signed commits, for tests that do not need ``mailstate serve``.

The temp dirs are created under /tmp with mode 0755 (not pytest's 0700 tmp_path) because
Dovecot's unprivileged processes (dovecot, dovenull, vmail) must traverse them.
"""

from __future__ import annotations

import ast
import atexit
import configparser
import contextlib
import functools
import grp
import imaplib
import itertools
import os
import pwd
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailstate.compiler.node_bundle import (
    LEARN_PROGRAM,
    NODE_TEMPLATES,
    SPAM_MILTER_DIR_MODE,
    BundleOptions,
    build_pi_pull,
    dovecot_snippet,
    learn_sieves,
    postfix_master_snippet,
    postfix_snippet,
    render_node_bundle,
    rspamd_learn_program,
    spam_milter_socket,
)
from mailstate.compiler.postscreen import DEFAULT_DNSBL_SITES
from tests.helpers.smtpsink import Received, SmtpSink

REPO_ROOT = Path(__file__).resolve().parents[2]


def _install_constant(name: str) -> tuple[str, ...]:
    """A constant of pi-pull/pipull/install.py (the agent is not importable here), read from its source."""
    source = (REPO_ROOT / "pi-pull" / "pipull" / "install.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise LookupError(name)


# What `pi_pull.py install` makes before the first tick: the empty tables main.cf and master.cf name.
PLACEHOLDER_MAPS = _install_constant("PLACEHOLDER_MAPS")
FLEET_TABLES = _install_constant("FLEET_TABLES")
IMAPSIEVE_FLAGS = _install_constant("IMAPSIEVE_FLAGS")  # sievec's arguments for the learn scripts
AGENT_DIR = REPO_ROOT / "pi-pull"
PIPULL_MODULES = (
    "errors", "log", "config", "runner", "fsutil", "mirror", "statement", "verify", "aliasmap", "sendermap", "release", "report", "statefile",
    "usage", "lifecycle", "agent", "cli", "buckets", "bulkwrite", "chain", "trust", "dkim", "sieve", "apppass", "ownerfiles",
    "sending", "policyfleet", "policy", "fleetfiles", "fleet", "replication", "spam", "spampolicy", "postscreen",
)  # fmt: skip
MAIL_BINARIES = ("postfix", "postmap", "dovecot", "doveadm", "sievec")  # sievec: Pigeonhole


# --------------------------------------------------------------------------- environment


def require_binaries(*names: str) -> None:
    """Fail (CI=true) or skip when a required program is missing."""
    missing = [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]
    if not missing:
        return
    msg = f"missing programs: {', '.join(missing)} (apt-get install postfix dovecot-imapd dovecot-lmtpd dovecot-sieve)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_vmail() -> tuple[int, int]:
    """uid/gid of the `vmail` system user, creating it if needed (tests run as root)."""
    try:
        pw = pwd.getpwnam("vmail")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        pass
    if os.geteuid() == 0:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "vmail"],
            capture_output=True,
        )
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam("vmail")
            return pw.pw_uid, pw.pw_gid
    pw = pwd.getpwnam("mail")  # fallback: Debian's `mail` user; first_valid_uid is set to match
    return pw.pw_uid, pw.pw_gid


def age_file(path: Path, seconds: float = 60) -> None:
    """Backdate a file's mtime. Postfix programs re-read a main.cf modified within the last
    second until it "cools down" (~2 s per postmap/postfix run on a freshly written file)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def make_public_tmpdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@functools.cache
def pi_pull_script() -> Path:
    """The single-file agent exactly as a bundle ships it (zipapp), built once per test process."""
    out = Path(tempfile.mkdtemp(prefix="pi-pull-build-")) / "pi_pull.py"
    out.write_bytes(build_pi_pull(AGENT_DIR))
    out.chmod(0o755)
    atexit.register(shutil.rmtree, str(out.parent), True)
    # Its code cache (compiler/node_bundle.py) in this process's own directory (0700, root's when
    # run as root), not the machine's /var/cache/pi-pull: an uninstall test removes the cache, and
    # must not take modules away from another run's agents on this machine.
    if "PI_PULL_CODE_CACHE" not in os.environ:
        os.environ["PI_PULL_CODE_CACHE"] = str(out.parent / "code-cache")
    return out


def run_pi_pull(
    config: Path | str, *args: str, python: str = sys.executable, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one pi-pull tick (``--once``) of the built single file as a subprocess; returns the completed process."""
    return subprocess.run(
        [python, str(pi_pull_script()), "--config", str(config), "--once", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Layout:
    map_type: str
    map_buckets: int


@functools.cache
def bundle_layout() -> Layout:
    """The map layout of the bundle ``mailstate node bundle`` writes when given no layout option:
    its own argument defaults, through ``render_node_bundle`` as the command calls it, read back
    from the bundle's pi-pull.ini. The real-mail tests run what a new user's node runs."""
    from mailstate.api.cli import build_parser

    args = build_parser().parse_args(["node", "bundle", "--name", "n", "--server-url", "https://x.test", "--out", "-"])
    signer = "mailstate ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHcQ0gX0m8c4n3dK5u6a0b2c3d4e5f6a7b8c9d0e1f2a3b4"
    ini = render_node_bundle(
        "n", args.server_url, signer, BundleOptions(map_type=args.map_type, map_buckets=args.map_buckets)
    )
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(str(ini["pi-pull.ini"]))
    return Layout(cp.get("services", "map_type"), cp.getint("services", "map_buckets"))


# --------------------------------------------------------------------------- the node


@dataclass
class MailNode:
    """A running Postfix + Dovecot pair on loopback, serving ``root/current``."""

    workdir: Path
    root: Path
    mail_root: Path
    smtp_port: int
    imap_port: int
    lmtp_port: int
    uid: int
    gid: int
    # The map layout (pipull/buckets.py): main.cf, Dovecot and the ini follow it. The bundle's by default.
    map_type: str = field(default_factory=lambda: bundle_layout().map_type)
    map_buckets: int = field(default_factory=lambda: bundle_layout().map_buckets)
    submission_port: int = 0
    smtps_port: int = 0
    imaps_port: int = 0
    sieve_port: int = 0  # where Dovecot's Sieve hands in replies and redirects (the bundle's 10026)
    relay_port: int = 0  # the fleet's relay listener (master.cf.mailstate), on loopback
    dkim_milter: str = ""
    # rspamd's milter for port 25 (tests/helpers/rspamd.py; "" for none, the node then takes mail unfiltered).
    spam_milter: str = ""
    # postscreen's DNS blocklists on port 25 (the bundle's by default).
    dnsbl_sites: tuple[str, ...] = DEFAULT_DNSBL_SITES
    # A resolv.conf for Postfix (postscreen's DNSBL lookups): bind-mounted over /etc/resolv.conf in
    # a mount namespace of Postfix's own (None: the machine's).
    resolv_conf: Path | None = None
    # rspamd's controller (with spam_milter): what the bundle's rspamd-learn asks to learn a message
    # moved into or out of Junk (IMAPSieve); "" for no learning.
    spam_controller: str = ""
    sink: SmtpSink | None = None
    # pi-pull's outbound policy service (`pi_pull.py policy`), which the bundle's submission
    # services ask: started with the node, on this port (0: none, and no policy in master.cf).
    policy_port: int = 0
    policy: subprocess.Popen[bytes] | None = None
    postfix_dir: Path = field(init=False)
    dovecot_conf: Path = field(init=False)
    tls_cert: Path = field(init=False)
    tls_key: Path = field(init=False)
    started: bool = False

    def __post_init__(self) -> None:
        self.postfix_dir = self.workdir / "postfix" / "etc"
        self.dovecot_conf = self.workdir / "dovecot" / "dovecot.conf"
        self.tls_cert = self.workdir / "tls" / "fullchain.pem"
        self.tls_key = self.workdir / "tls" / "privkey.pem"

    def passwd_file(self, domain: str) -> Path:
        """The live passwd-file of ``domain``, where this node's Dovecot config looks for it."""
        base = self.root / "current" / "dovecot" / "passwd.d"
        return base / domain[:1] / domain[:2] / domain if self.map_buckets else base / domain

    # ---- commands pi-pull runs

    @property
    def postfix_reload(self) -> str:
        return f"postfix -c {self.postfix_dir} reload"

    @property
    def dovecot_reload(self) -> str:
        return f"doveadm -c {self.dovecot_conf} reload"

    @property
    def postmap(self) -> str:
        return f"postmap -c {self.postfix_dir}"

    def write_pi_pull_config(
        self,
        path: Path,
        remote_url: str,
        allowed_signers: Path,
        *,
        name: str = "node-test",
        sync_key_file: Path | None = None,
        report_url: str = "",
        postfix_reload: str | None = None,
        dovecot_reload: str | None = None,
        keep_releases: int = 5,
        extra: str = "",
    ) -> Path:
        """Write a pi-pull ini for this node (reloads and postmap drive this node's services)."""
        lines = [
            "[remote]",
            f"url = {remote_url}",
            "branch = main",
            "[node]",
            f"name = {name}",
            f"allowed_signers = {allowed_signers}",
        ]
        if sync_key_file:
            lines.append(f"sync_key_file = {sync_key_file}")
        lines += [
            "[policy]",
            f"listen = 127.0.0.1:{self.policy_port or 10040}",
            "[paths]",
            f"root = {self.root}",
            f"mail_root = {self.mail_root}",
            f"mail_uid = {self.uid}",
            f"mail_gid = {self.gid}",
            f"keep_releases = {keep_releases}",
            "passwd_group = dovecot",
            "sync = no",
            "[report]",
            f"url = {report_url}",
            "timeout = 5",
            "[services]",
            f"postfix_reload = {self.postfix_reload if postfix_reload is None else postfix_reload}",
            f"dovecot_reload = {self.dovecot_reload if dovecot_reload is None else dovecot_reload}",
            f"map_type = {self.map_type}",
            f"map_buckets = {self.map_buckets}",
            f"postmap = {self.postmap}",
            "[owners]",
            f"doveadm = doveadm -c {self.dovecot_conf}",
        ]
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    # ---- lifecycle

    def _make_milter_dir(self) -> None:
        """The directory of rspamd's milter socket in the queue, as `pi_pull.py install` makes it."""
        path = self.spam_milter and spam_milter_socket(self.spam_milter, str(self.workdir / "postfix" / "queue"))
        if path:
            where = Path(path).parent
            where.mkdir(parents=True)
            os.chown(where, pwd.getpwnam("_rspamd").pw_uid, grp.getgrnam("postfix").gr_gid)
            os.chmod(where, SPAM_MILTER_DIR_MODE)

    def configure(self) -> None:
        w = self.workdir
        (w / "postfix" / "queue").mkdir(parents=True)
        (w / "postfix" / "data").mkdir(parents=True)
        self.postfix_dir.mkdir(parents=True)
        pf = pwd.getpwnam("postfix")
        os.chown(w / "postfix" / "data", pf.pw_uid, pf.pw_gid)
        self.mail_root.mkdir(parents=True)
        os.chown(self.mail_root, self.uid, self.gid)
        self.root.mkdir(parents=True, exist_ok=True)
        (w / "dovecot" / "run").mkdir(parents=True)
        (w / "dovecot" / "state").mkdir(parents=True)
        # Dovecot creates the SASL socket in Postfix's queue before Postfix first starts.
        (w / "postfix" / "queue" / "private").mkdir(mode=0o700)
        os.chown(w / "postfix" / "queue" / "private", pf.pw_uid, pf.pw_gid)
        self._make_milter_dir()
        make_self_signed_cert(self.tls_cert, self.tls_key)
        relay = f"[127.0.0.1]:{self.sink.port}" if self.sink else ""

        main_cf = f"""# test node: generated by tests/helpers/mailnode.py
compatibility_level = 3.6
queue_directory = {w}/postfix/queue
data_directory = {w}/postfix/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mailnode.test
mydomain = mailnode.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
relayhost = {relay}
inet_interfaces = loopback-only
inet_protocols = ipv4
# loopback clients are treated like the outside world
mynetworks = 192.0.2.1/32
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
maillog_file = {w}/postfix.log
maillog_file_prefixes = {w}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = 0
# clients come from 127.x.y.1 (one address a connection, see imap()): no DNS for their names
smtpd_peername_lookup = no
smtp_host_lookup = native
# a test client may speak for an outside address (XCLIENT ADDR=198.51.100.7): what rspamd sees
smtpd_authorized_xclient_hosts = 127.0.0.0/8

"""
        main_cf += postfix_snippet(
            str(self.root),
            map_type=self.map_type,
            lmtp_port=self.lmtp_port,
            tls_cert=str(self.tls_cert),
            tls_key=str(self.tls_key),
            map_buckets=self.map_buckets,
            spam_milter=self.spam_milter,
            dnsbl_sites=self.dnsbl_sites,
        )
        # Port 25 is the bundle's postscreen. The test client's 127.0.0.1 skips its tests (a first
        # contact would wait out the greeting test, 6 s, and ask the blocklists); every other
        # loopback address meets them as the bundle sets them (tests/e2e/test_postscreen_e2e.py).
        (w / "postscreen_access.cidr").write_text("127.0.0.1/32 permit\n")
        main_cf += f"postscreen_access_list = permit_mynetworks, cidr:{w}/postscreen_access.cidr\n"
        (self.postfix_dir / "main.cf").write_text(main_cf)
        services = [
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
        ]
        master = ["  ".join(s) for s in services]
        # The bundle's entries (`service/type = <master.cf line>`): port 25's postscreen and the
        # submission services, on loopback ports.
        snippet = postfix_master_snippet(
            smtp_listen=f"127.0.0.1:{self.smtp_port}",
            submission_listen=f"127.0.0.1:{self.submission_port}",
            smtps_listen=f"127.0.0.1:{self.smtps_port}",
            dkim_milter=self.dkim_milter,
            sieve_listen=f"127.0.0.1:{self.sieve_port}",
            policy_service=f"inet:127.0.0.1:{self.policy_port}" if self.policy_port else "",
            relay_listen=f"127.0.0.1:{self.relay_port}",
            root=str(self.root),
            map_type=self.map_type,
            tls_cert=str(self.tls_cert),
            tls_key=str(self.tls_key),
            rewrite_gtube=bool(self.spam_milter),
        )
        master += [
            line.partition(" = ")[2] for line in snippet.splitlines() if line.strip() and not line.startswith("#")
        ]
        (self.postfix_dir / "master.cf").write_text("\n".join(master) + "\n")
        for name in ("main.cf", "master.cf"):
            age_file(self.postfix_dir / name)

        dovecot = f"""# test node: generated by tests/helpers/mailnode.py
base_dir = {w}/dovecot/run
state_dir = {w}/dovecot/state
instance_name = mailnode-{self.imap_port}
log_path = {w}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
first_valid_uid = {min(self.uid, 500)}
first_valid_gid = {min(self.gid, 500)}
default_internal_user = dovecot
default_login_user = dovenull
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
}}

"""
        junk = ""
        if self.spam_milter:
            # the bundle's junk.sieve (Dovecot's sieve_before), precompiled as pi_pull.py install does
            junk = str(w / "junk.sieve")
            shutil.copy(NODE_TEMPLATES / "mailstate-junk.sieve", junk)
            subprocess.run(["sievec", junk], check=True, capture_output=True)
        learn_dir, pipe_dir = self._learn_files() if self.spam_milter and self.spam_controller else ("", "")
        dovecot += dovecot_snippet(
            str(self.root),
            junk_sieve=junk,
            learn_dir=learn_dir,
            sieve_pipe_dir=pipe_dir,
            lmtp_port=self.lmtp_port,
            tls_cert=str(self.tls_cert),
            tls_key=str(self.tls_key),
            imaps_port=self.imaps_port,
            postfix_queue_dir=str(w / "postfix" / "queue"),
            map_buckets=self.map_buckets,
            sieve_submission=f"127.0.0.1:{self.sieve_port}",
        )
        self.dovecot_conf.write_text(dovecot)
        if self.map_buckets:
            self._placeholder_tables()
        self._fleet_tables()

    def _learn_files(self) -> tuple[str, str]:
        """The bundle's IMAPSieve scripts (precompiled as pi_pull.py install does) and its
        rspamd-learn program, asking this node's rspamd controller: (learn dir, Sieve pipe dir)."""
        learn_dir, pipe_dir = self.workdir / "learn", self.workdir / "learn" / "sieve-pipe"
        pipe_dir.mkdir(parents=True, exist_ok=True)
        for name, text in learn_sieves().items():
            (learn_dir / name).write_text(text)
            subprocess.run(["sievec", *IMAPSIEVE_FLAGS, str(learn_dir / name)], check=True, capture_output=True)
        program = pipe_dir / LEARN_PROGRAM
        program.write_text(rspamd_learn_program(self.spam_controller))
        program.chmod(0o755)
        return str(learn_dir), str(pipe_dir)

    def _fleet_tables(self) -> None:
        """The empty tables the fleet transport and relay listener name (``pi_pull.py install`` makes
        them too), until pi-pull writes them from the signed state."""
        fleet = self.root / "fleet"
        fleet.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in FLEET_TABLES:
            (fleet / name).write_bytes(b"")
            subprocess.run(
                ["postmap", "-c", str(self.postfix_dir), f"{self.map_type}:{fleet / name}"],
                check=True,
                capture_output=True,
            )

    def _daemon(self, *argv: str) -> None:
        """Start a daemon. Its output goes to a file: a daemon would hold a pipe open forever."""
        out = self.workdir / "start.log"
        with open(out, "ab") as fh:
            r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed: {out.read_text(errors='replace')}\n{self.dovecot_log()}{self.postfix_log()}"
            )

    def _placeholder_tables(self) -> None:
        """Empty tables under ``current`` until the first tick: an smtpd that cannot open 64 tables
        dies at startup ("too many errors"), and the master then throttles smtpd for a minute (the
        single-table layout only logs its three missing maps). ``current`` is not a release name,
        so pi-pull builds its first release from nothing and swaps over it."""
        empty = self.root / "placeholder"
        (empty / "postfix").mkdir(parents=True)
        (empty / "dovecot" / "passwd.d").mkdir(parents=True)
        for name in PLACEHOLDER_MAPS:
            for k in range(self.map_buckets):
                subprocess.run(
                    [
                        "postmap",
                        "-c",
                        str(self.postfix_dir),
                        "-i",
                        f"{self.map_type}:{empty / 'postfix' / f'{name}.{k:02x}'}",
                    ],
                    input=b"",
                    check=True,
                    capture_output=True,
                )
        (self.root / "current").symlink_to("placeholder")

    def start_policy(self) -> None:
        """The bundle's policy service for this node: its own minimal ini (the counts and the
        limits live under ``root``, where the ticks' ini points too)."""
        if not self.policy_port:
            return
        ini = self.workdir / "policy.ini"
        ini.write_text(
            f"[remote]\nurl = {self.workdir / 'none.git'}\n[node]\nallowed_signers = /dev/null\n"
            f"[paths]\nroot = {self.root}\nmail_root = {self.mail_root}\nmail_uid = {self.uid}\nmail_gid = {self.gid}\n"
            f"[policy]\nlisten = 127.0.0.1:{self.policy_port}\n"
        )
        with open(self.workdir / "policy.log", "ab") as log:
            self.policy = subprocess.Popen(
                [sys.executable, str(pi_pull_script()), "policy", "--config", str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_port(self.policy_port)

    def stop_policy(self) -> None:
        if self.policy is not None and self.policy.poll() is None:
            self.policy.terminate()
            try:
                self.policy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.policy.kill()
                self.policy.wait()
        self.policy = None

    def start(self) -> None:
        self.configure()
        self.start_policy()
        self._daemon("dovecot", "-c", str(self.dovecot_conf))
        self.started = True
        postfix = ["postfix", "-c", str(self.postfix_dir), "start"]
        if self.resolv_conf is not None:
            # Postfix's master (and every daemon it starts) stays in this private mount namespace.
            bind = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
            postfix = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                bind,
                str(self.resolv_conf),
                *postfix,
            ]
        self._daemon(*postfix)
        for port in (
            self.imap_port,
            self.imaps_port,
            self.lmtp_port,
            self.smtp_port,
            self.submission_port,
            self.smtps_port,
            self.sieve_port,
        ):
            wait_port(port)

    def stop(self) -> None:
        self.stop_policy()
        subprocess.run(["postfix", "-c", str(self.postfix_dir), "abort"], capture_output=True)
        pidfile = self.workdir / "dovecot" / "run" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        deadline = time.monotonic() + 10
        pf_pid = self.workdir / "postfix" / "queue" / "pid" / "master.pid"
        while time.monotonic() < deadline and (pidfile.exists() or _pid_alive(pf_pid)):
            time.sleep(0.05)

    # ---- clients

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["doveadm", "-c", str(self.dovecot_conf), *args], capture_output=True, text=True)

    def smtp(self) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=15)
        s.ehlo("client.test")
        return s

    def tls_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this node's self-signed certificate."""
        ctx = ssl.create_default_context(cafile=str(self.tls_cert))
        ctx.check_hostname = False
        return ctx

    def submission(self, *, implicit_tls: bool = False, starttls: bool = True) -> smtplib.SMTP:
        """An SMTP session with the submission service (587; 465 with ``implicit_tls``), EHLO done,
        STARTTLS done unless ``starttls=False``; from a fresh loopback source address."""
        source = (next_source_address(), 0)
        s: smtplib.SMTP
        if implicit_tls:
            s = smtplib.SMTP_SSL(
                "127.0.0.1", self.smtps_port, timeout=15, source_address=source, context=self.tls_context()
            )
        else:
            s = smtplib.SMTP("127.0.0.1", self.submission_port, timeout=15, source_address=source)
        s.ehlo("client.test")
        if starttls and not implicit_tls:
            s.starttls(context=self.tls_context())
            s.ehlo("client.test")
        return s

    def submit(
        self,
        user: str,
        password: str,
        mail_from: str,
        to: Sequence[str],
        subject: str,
        *,
        implicit_tls: bool = False,
        body: str = "sent by the test\r\n",
        headers: str = "",
    ) -> dict[str, tuple[int, bytes]]:
        """Log in as ``user`` and send one message (From: and envelope ``mail_from``); returns
        sendmail's refused recipients (raises smtplib.SMTPException on a refusal of the whole message)."""
        msg = (
            f"From: {mail_from}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@client.test>\r\n"
            f"{headers}\r\n{body}"
        )
        with contextlib.closing(self.submission(implicit_tls=implicit_tls)) as s:
            s.login(user, password)
            refused = s.sendmail(mail_from, list(to), msg.encode("utf-8"))
            s.quit()
            return refused

    def wait_sink(self, subject: str, timeout: float = 20.0) -> Received:
        """The message with ``subject`` as the sink (the internet) received it."""
        assert self.sink is not None
        return self.sink.wait_subject(subject, timeout, on_timeout=lambda: self.postfix_log()[-3000:])

    def rcpt_code(self, address: str) -> tuple[int, str]:
        """SMTP answer to RCPT TO:<address> (MAIL FROM a foreign sender)."""
        with contextlib.closing(self.smtp()) as s:
            s.mail("sender@client.test")
            code, msg = s.rcpt(address)
            s.rset()
            s.quit()
            return code, msg.decode(errors="replace")

    def send(self, to: str, subject: str, body: str = "hello from the test\n") -> None:
        msg = f"From: sender@client.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}"
        with contextlib.closing(self.smtp()) as s:
            s.sendmail("sender@client.test", [to], msg)
            s.quit()

    def imap(self, user: str, password: str) -> imaplib.IMAP4:
        """Logged-in IMAP connection (raises imaplib.IMAP4.error on a failed login).

        Each connection comes from a different loopback source address: Dovecot delays
        further logins from an address that failed one (2 s, doubling up to 15 s), and the
        tests fail logins on purpose."""
        m = _IMAP4SSLFromSource("127.0.0.1", self.imaps_port, timeout=15, ssl_context=self.tls_context())
        try:
            m.login(user, password)
        except Exception:
            with contextlib.suppress(Exception):
                m.logout()
            raise
        return m

    def imap_plain(self) -> imaplib.IMAP4:
        """A connection to the IMAP port without TLS (143's equivalent), not logged in."""
        return _IMAP4FromSource("127.0.0.1", self.imap_port, timeout=15)

    def can_login(self, user: str, password: str) -> bool:
        try:
            m = self.imap(user, password)
        except imaplib.IMAP4.error:
            return False
        m.logout()
        return True

    def wait_for_message(
        self, user: str, password: str, subject: str, timeout: float = 20.0, folder: str = "INBOX"
    ) -> bytes:
        """Poll ``folder`` until a message with ``subject`` arrives; returns the raw message."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.imap(user, password)
            try:
                m.select(folder)
                typ, data = m.search(None, "SUBJECT", f'"{subject}"')
                ids = data[0].split() if typ == "OK" and data and data[0] else []
                if ids:
                    typ, fetched = m.fetch(ids[-1], "(RFC822)")
                    item = fetched[0]
                    assert isinstance(item, tuple)
                    return bytes(item[1])
            finally:
                with contextlib.suppress(Exception):
                    m.logout()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no message {subject!r} for {user} after {timeout}s\n{self.postfix_log()[-3000:]}"
                )
            time.sleep(0.1)

    def postfix_log(self) -> str:
        p = self.workdir / "postfix.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def dovecot_log(self) -> str:
        p = self.workdir / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""


_source_counter = itertools.count(1)


def next_source_address() -> str:
    """A fresh 127.x.y.1 address for the next client connection (Dovecot's auth penalty is per address)."""
    n = next(_source_counter) % 65000 + 2
    return f"127.{n // 250 % 250 + 1}.{n % 250 + 1}.1"


class _IMAP4FromSource(imaplib.IMAP4):
    """imaplib.IMAP4 that connects from a fresh 127.x.y.z address every time."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(next_source_address(), 0))


class _IMAP4SSLFromSource(imaplib.IMAP4_SSL):
    """imaplib.IMAP4_SSL (implicit TLS, 993's equivalent) from a fresh 127.x.y.z address every time."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(next_source_address(), 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def make_self_signed_cert(cert: Path, key: Path, name: str = "mailnode.test") -> None:
    """A throwaway self-signed certificate (EC P-256, one day) with ``openssl req -x509``; key mode 0600."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)


def _pid_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@contextlib.contextmanager
def running_mailnode(
    map_type: str | None = None,
    *,
    dkim_milter: str = "",
    map_buckets: int | None = None,
    spam_milter: str = "",
    dnsbl_sites: tuple[str, ...] = DEFAULT_DNSBL_SITES,
    resolv_conf: Path | None = None,
    spam_controller: str = "",
) -> Iterator[MailNode]:
    """Start Postfix + Dovecot (and the SMTP sink) for a fresh release root; stop and clean up
    afterwards. ``map_type``/``map_buckets``: the bundle's (``bundle_layout()``) unless given.
    ``dkim_milter``: a milter for the submission services (none by default); ``spam_milter``:
    rspamd's, for port 25 (none by default; tests/helpers/rspamd.py), and ``spam_controller`` its
    controller, which a move into or out of Junk teaches (IMAPSieve; none by default).
    ``dnsbl_sites``: postscreen's lists (the bundle's by default); ``resolv_conf``: the resolver
    Postfix uses (the machine's by default)."""
    layout = bundle_layout()
    require_binaries(*MAIL_BINARIES, "openssl")
    if os.geteuid() != 0:
        msg = "the real mail node needs root (Postfix/Dovecot run as root from temp configs)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    grp.getgrnam("dovecot")
    uid, gid = ensure_vmail()
    workdir = make_public_tmpdir("mailnode-")
    ports = free_ports(9)
    smtp_port, imap_port, lmtp_port, submission_port, smtps_port, imaps_port, sieve_port, policy_port, relay_port = (
        ports
    )
    sink = SmtpSink()
    node = MailNode(
        workdir=workdir,
        root=workdir / "node",
        mail_root=workdir / "vmail",
        smtp_port=smtp_port,
        imap_port=imap_port,
        lmtp_port=lmtp_port,
        uid=uid,
        gid=gid,
        map_type=layout.map_type if map_type is None else map_type,
        map_buckets=layout.map_buckets if map_buckets is None else map_buckets,
        submission_port=submission_port,
        smtps_port=smtps_port,
        imaps_port=imaps_port,
        sieve_port=sieve_port,
        relay_port=relay_port,
        dkim_milter=dkim_milter,
        spam_milter=spam_milter,
        dnsbl_sites=dnsbl_sites,
        resolv_conf=resolv_conf,
        spam_controller=spam_controller,
        sink=sink,
        policy_port=policy_port,
    )
    try:
        node.start()
        yield node
    finally:
        node.stop()
        sink.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def mailnode() -> Iterator[MailNode]:
    """A fresh real Postfix + Dovecot node (see module docstring)."""
    with running_mailnode() as node:
        yield node


# --------------------------------------------------------------------------- signed state repos


def git(cwd: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {r.stderr}")
    return r.stdout.strip()


@dataclass
class SigningKey:
    private: Path
    public_line: str  # "ssh-ed25519 AAAA... comment"

    def allowed_signers_line(self, principal: str = "mailstate") -> str:
        return f'{principal} namespaces="git" {self.public_line}'


def make_signing_key(directory: Path, name: str = "signing") -> SigningKey:
    """A throwaway ed25519 key (``ssh-keygen -t ed25519 -N ''``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return SigningKey(private=key, public_line=(directory / f"{name}.pub").read_text().strip())


def write_allowed_signers(path: Path, keys: Sequence[SigningKey]) -> Path:
    path.write_text("".join(k.allowed_signers_line() + "\n" for k in keys))
    return path


def bcrypt_hash(password: str, cost: int = 4) -> str:
    import bcrypt

    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


@dataclass
class Mailbox:
    password_hash: str
    quota_mb: int = 1024
    active: bool = True
    id: str = ""


_mailbox_ids = itertools.count(1)


def publish_statement(
    work: Path,
    bare: Path,
    sha: str,
    key: SigningKey,
    *,
    issued_at: int | None = None,
    ref: str = "refs/mailstate/accepted",
) -> str:
    """Sign an accepted-head statement for ``sha`` with ``key`` (``git tag -s``, gpg.format=ssh, so
    the tag object is exactly the statement's format 1, state/statement.py) and force it to ``ref`` in ``bare``; the tag id."""
    t = int(time.time()) if issued_at is None else issued_at
    message = f"mailstate accepted head {sha[:12]}\n\nAccepted-Head: {sha}\nIssued-At: {t}\n"
    env = {
        **os.environ,
        "GIT_COMMITTER_DATE": f"{t} +0000",
        "GIT_COMMITTER_NAME": "mailstate",
        "GIT_COMMITTER_EMAIL": "mailstate@localhost",
    }
    base = [
        "git",
        "-C",
        str(work),
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key.private}",
        "-c",
        "user.name=mailstate",
        "-c",
        "user.email=mailstate@localhost",
    ]
    r = subprocess.run(
        [*base, "tag", "-s", "-f", "-m", message, "mailstate-accepted", sha], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        raise RuntimeError(f"git tag -s failed: {r.stderr}")
    tag = git(work, "rev-parse", "refs/tags/mailstate-accepted")
    git(work, "push", "--quiet", "--force", str(bare), f"{tag}:{ref}")
    return tag


class StateRepo:
    """A state repo (bare ``state.git`` + work tree) written by hand in the contract's layout.

    Mutate ``domains`` (or use the helpers), then ``commit()``: it rewrites ``rendered/`` and the
    YAML, makes one commit (SSH-signed with ``key`` unless ``sign=False``), pushes it to
    ``bare``'s ``main`` and publishes an accepted-head statement for it (signed by
    ``statement_key``, default ``key``; ``statement=False`` publishes none), as a server would.
    ``format=2`` gives mailboxes ids, homes ``<root>/<domain>/<local>~<id>`` and the
    ``mailboxes`` fragment (state format 2).
    """

    def __init__(
        self,
        path: Path,
        key: SigningKey,
        *,
        mail_root: str = "/var/vmail",
        uid: int = 5000,
        gid: int = 5000,
        format: int = 1,
        statement_key: SigningKey | None = None,
    ) -> None:
        self.path = path
        self.bare = path / "state.git"
        self.work = path / "work"
        self.key = key
        self.statement_key = statement_key or key
        self.mail_root = mail_root.rstrip("/")
        self.uid = uid
        self.gid = gid
        self.format = format
        self.domains: dict[str, dict[str, Mailbox]] = {}
        self.enabled: dict[str, bool] = {}
        # More rendered files, written as they are (e.g. a domain's sieve_scripts or app_passwords).
        self.extra_files: dict[str, bytes] = {}
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "--quiet", "--bare", "--initial-branch=main", str(self.bare))
        git(path, "init", "--quiet", "--initial-branch=main", str(self.work))
        git(self.work, "config", "user.name", "mailstate-test")
        git(self.work, "config", "user.email", "test@example.invalid")

    # ---- state edits

    def set_mailbox(
        self, email: str, password: str | None = None, *, quota_mb: int = 1024, password_hash: str | None = None
    ) -> None:
        local, domain = email.split("@")
        boxes = self.domains.setdefault(domain, {})
        self.enabled.setdefault(domain, True)
        if password_hash is None:
            password_hash = (
                bcrypt_hash(password or "secret-password")
                if password or local not in boxes
                else boxes[local].password_hash
            )
        old_id = boxes[local].id if local in boxes else ""
        boxes[local] = Mailbox(
            password_hash=password_hash, quota_mb=quota_mb, id=old_id or f"20261201-{next(_mailbox_ids):06x}"
        )

    def remove_mailbox(self, email: str) -> None:
        local, domain = email.split("@")
        del self.domains[domain][local]

    def set_email_enabled(self, domain: str, enabled: bool) -> None:
        self.domains.setdefault(domain, {})
        self.enabled[domain] = enabled

    # ---- files

    def mailbox_dir(self, local: str, box: Mailbox) -> str:
        return f"{local}~{box.id}" if self.format >= 2 else local

    def rendered_files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        if self.format >= 2:
            files["rendered/settings"] = f"format {self.format}\npurge_after_days 7\n"
        for domain in sorted(self.domains):
            if not self.enabled.get(domain, True):
                continue
            base = f"rendered/domains/{domain[:2]}/{domain}"
            boxes = sorted((local, b) for local, b in self.domains[domain].items() if b.active)
            files[f"{base}/passwd"] = "".join(
                f"{local}@{domain}:{b.password_hash}:{self.uid}:{self.gid}::{self.mail_root}/{domain}/{self.mailbox_dir(local, b)}"
                f"::userdb_quota_rule=*:storage={b.quota_mb}M\n"
                for local, b in boxes
            )
            files[f"{base}/virtual_mailbox_maps"] = "".join(
                f"{local}@{domain} {domain}/{self.mailbox_dir(local, b)}/\n" for local, b in boxes
            )
            files[f"{base}/virtual_mailbox_domains"] = f"{domain} OK\n"
            if self.format >= 2:
                files[f"{base}/mailboxes"] = "".join(
                    f"{local} {b.id} {'active' if b.active else 'inactive'}\n"
                    for local, b in sorted(self.domains[domain].items())
                )
        return files

    def write_tree(self) -> None:
        for sub in ("rendered", "domains"):
            shutil.rmtree(self.work / sub, ignore_errors=True)
        (self.work / "mailstate.yaml").write_text(
            f"format: {self.format}\nsettings:\n  mail_root: {self.mail_root}\n  uid: {self.uid}\n  gid: {self.gid}\n"
        )
        (self.work / "nodes.yaml").write_text("nodes: {}\n")
        for domain in sorted(self.domains):
            p = self.work / "domains" / domain[:2] / f"{domain}.yaml"
            p.parent.mkdir(parents=True, exist_ok=True)
            boxes = "".join(
                f"  {local}:\n"
                + (f"    id: {b.id}\n" if self.format >= 2 else "")
                + f"    password: '{b.password_hash}'\n    quota_mb: {b.quota_mb}\n    active: {str(b.active).lower()}\n"
                for local, b in sorted(self.domains[domain].items())
            )
            enabled = str(self.enabled.get(domain, True)).lower()
            p.write_text(f"domain: {domain}\nemail_enabled: {enabled}\nmailboxes:\n{boxes or '  {}'}\n")
        for rel, content in self.rendered_files().items():
            p = self.work / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        for rel, data in self.extra_files.items():
            p = self.work / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    def commit(
        self,
        message: str = "update",
        *,
        sign: bool = True,
        key: SigningKey | None = None,
        write: bool = True,
        push: bool = True,
        statement: bool = True,
    ) -> str:
        """Commit the work tree (signed by ``key``/``self.key`` unless ``sign=False``), push to ``main``
        and publish a statement for it (unless ``statement=False``)."""
        if write:
            self.write_tree()
        git(self.work, "add", "-A")
        args = ["commit", "--quiet", "--allow-empty", "-m", message]
        if sign:
            signer = key or self.key
            args = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={signer.private}", "commit", "-S", *args[1:]]
        git(self.work, *args)
        sha = git(self.work, "rev-parse", "HEAD")
        if push:
            self.push(sha, statement=statement)
        return sha

    def push(
        self, sha: str, *, force: bool = True, statement: bool = True, statement_key: SigningKey | None = None
    ) -> None:
        """Point ``main`` at ``sha`` and (unless ``statement=False``) state it accepted."""
        git(self.work, "push", "--quiet", *(["--force"] if force else []), str(self.bare), f"{sha}:refs/heads/main")
        if statement:
            self.publish_statement(sha, key=statement_key)

    def publish_statement(self, sha: str, *, key: SigningKey | None = None, issued_at: int | None = None) -> str:
        """Force ``refs/mailstate/accepted`` to a statement of ``sha``; the tag id."""
        return publish_statement(self.work, self.bare, sha, key or self.statement_key, issued_at=issued_at)

    def tip(self) -> str:
        return git(self.bare, "rev-parse", "main")
