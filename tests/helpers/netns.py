"""Several real mail nodes on one machine, each in its own network namespace (docs/fleet.md).

Postfix will not listen on a loopback alias, and with loopback addresses every node-to-node
connection would come from 127.0.0.1; so each node gets a network namespace (``ip netns add``)
with its own 127.0.0.1, joined to a bridge in the root namespace by a veth pair, at its own
10.x address. The test creates them and removes them again (``fleet_network``).

Every node stores mail under the same path (the state's one `mail_root`), but in its own
directory: each node also gets a mount namespace, held by a small process started in its network
namespace, in which its own `<workdir>/vmail` is bind-mounted on that path; every command of
the node (daemons, pi-pull, doveadm) runs in both namespaces (`nsenter`).

A ``FleetNode`` runs its own Postfix and Dovecot inside its namespace, on the standard ports
(25, 587, 465, 993, the relay and doveadm ports), configured from its own bundle
(``render_node_bundle``: main.cf.mailstate, master.cf.mailstate, 90-mailstate.conf, pi-pull.ini),
with its own self-signed certificate for its address, and runs pi-pull ticks inside the
namespace too. The test process talks to the nodes over the bridge; so does ``mailstate serve``,
which listens on the bridge's address.
"""

from __future__ import annotations

import configparser
import contextlib
import imaplib
import os
import secrets
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailstate.compiler.node_bundle import POLICY_SERVICE, BundleOptions, render_node_bundle
from tests.helpers.mailnode import (
    FLEET_TABLES,
    MAIL_BINARIES,
    PLACEHOLDER_MAPS,
    age_file,
    ensure_vmail,
    make_public_tmpdir,
    pi_pull_script,
    require_binaries,
)

# Postfix's services besides those the bundle adds (as tests/mailnode.py's).
_SERVICES = [
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


def require_netns() -> None:
    """Fail (CI=true) or skip without root, `ip` and the mail programs."""
    require_binaries(*MAIL_BINARIES, "ip", "openssl")
    if os.geteuid() != 0:
        msg = "network namespaces and real mail nodes need root"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")


@dataclass
class Network:
    """A bridge in the root namespace and one namespace per node, on a /24 of 10.0.0.0/8."""

    tag: str
    prefix: str  # e.g. "10.213.7": the bridge is .1, node i is .(10 + i)
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"msbr{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    def add(self, i: int) -> tuple[str, str]:
        """Namespace `i`: (its name, its address)."""
        ns, veth, addr = f"ms{self.tag}n{i}", f"msv{self.tag}{i}", f"{self.prefix}.{10 + i}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway)
        return ns, addr

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextlib.contextmanager
def fleet_network() -> Iterator[Network]:
    """A fresh bridge (and later its namespaces), removed afterwards whatever happens."""
    require_netns()
    tag = secrets.token_hex(2)
    net = Network(tag, f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:], 16) % 250 + 1}")
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        yield net
    finally:
        net.close()


def make_node_certificate(cert: Path, key: Path, name: str, address: str) -> None:
    """A self-signed certificate for the node's address (what `pi_pull.py install` makes)."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=IP:{address}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)


@dataclass
class FleetNode:
    """One node: its namespace, address, bundle, Postfix and Dovecot."""

    name: str
    ns: str
    address: str
    workdir: Path
    uid: int
    gid: int
    state_mail_root: str  # the state's mail_root: this node's vmail is mounted there, in its namespace
    started: bool = False
    holder: subprocess.Popen[bytes] | None = None
    policy: subprocess.Popen[bytes] | None = None  # the bundle's pi-pull-policy.service

    @property
    def root(self) -> Path:
        return self.workdir / "node"

    @property
    def mail_root(self) -> Path:
        return self.workdir / "vmail"

    @property
    def etc(self) -> Path:
        return self.workdir / "etc"

    @property
    def postfix_dir(self) -> Path:
        return self.workdir / "postfix" / "etc"

    @property
    def queue(self) -> Path:
        return self.workdir / "postfix" / "queue"

    @property
    def dovecot_conf(self) -> Path:
        return self.workdir / "dovecot" / "dovecot.conf"

    @property
    def tls_cert(self) -> Path:
        return self.etc / "tls" / "fullchain.pem"

    @property
    def tls_key(self) -> Path:
        return self.etc / "tls" / "privkey.pem"

    @property
    def ini(self) -> Path:
        return self.etc / "pi-pull.ini"

    # ---- setup

    def configure(self, server_url: str, allowed_signers: str, sync_key: str) -> None:
        """Write everything from the node's own bundle (the bundle's defaults, DKIM aside)."""
        bundle = render_node_bundle(
            self.name,
            server_url,
            allowed_signers,
            BundleOptions(
                root=str(self.root),
                mail_root=self.state_mail_root,
                mail_uid=self.uid,
                mail_gid=self.gid,
                tls_cert=str(self.tls_cert),
                tls_key=str(self.tls_key),
                postfix_queue_dir=str(self.queue),
                dkim_milter="",  # the DKIM signer is tested elsewhere; a fleet does not depend on it
                spam_milter="",  # so is rspamd (tests/e2e/test_inbound*.py); each namespace would need its own
                address=self.address,
            ),
        )
        w = self.workdir
        for d in (self.queue, w / "postfix" / "data", self.postfix_dir, w / "dovecot" / "run", w / "dovecot" / "state"):
            d.mkdir(parents=True, exist_ok=True)
        import pwd

        pf = pwd.getpwnam("postfix")
        os.chown(w / "postfix" / "data", pf.pw_uid, pf.pw_gid)
        (self.queue / "private").mkdir(mode=0o700)
        os.chown(self.queue / "private", pf.pw_uid, pf.pw_gid)
        self.mail_root.mkdir(parents=True)
        os.chown(self.mail_root, self.uid, self.gid)
        self.root.mkdir(parents=True)
        make_node_certificate(self.tls_cert, self.tls_key, self.name, self.address)
        self._postfix(str(bundle["postfix/main.cf.mailstate"]), str(bundle["postfix/master.cf.mailstate"]))
        self._dovecot(str(bundle["dovecot/conf.d/90-mailstate.conf"]))
        self._pi_pull(str(bundle["pi-pull.ini"]), allowed_signers, sync_key)
        self._placeholder()

    def _postfix(self, main_snippet: str, master_snippet: str) -> None:
        w = self.workdir
        main = f"""# fleet test node {self.name}
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {w}/postfix/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.name}.fleet.test
mydomain = fleet.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
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
smtpd_peername_lookup = no
smtp_host_lookup = native
"""
        # Port 25 is the bundle's postscreen; the test process and the other nodes (the bridge's /24)
        # skip its tests (tests/e2e/test_postscreen_e2e.py runs them), as a first contact would
        # otherwise wait out its greeting test (6 s) and ask the internet's blocklists.
        (w / "postscreen_access.cidr").write_text(f"{self.address.rsplit('.', 1)[0]}.0/24 permit\n")
        screen = f"postscreen_access_list = permit_mynetworks, cidr:{w}/postscreen_access.cidr\n"
        (self.postfix_dir / "main.cf").write_text(main + main_snippet + screen)
        master = ["  ".join(s) for s in _SERVICES]
        master += [
            line.partition(" = ")[2] for line in master_snippet.splitlines() if line and not line.startswith("#")
        ]
        (self.postfix_dir / "master.cf").write_text("\n".join(master) + "\n")
        for name in ("main.cf", "master.cf"):
            age_file(self.postfix_dir / name)

    def _dovecot(self, snippet: str) -> None:
        w = self.workdir
        conf = f"""# fleet test node {self.name}
base_dir = {w}/dovecot/run
state_dir = {w}/dovecot/state
instance_name = fleet-{self.ns}
log_path = {w}/dovecot.log
protocols = imap lmtp
listen = *
auth_mechanisms = plain login
auth_verbose = yes
first_valid_uid = {min(self.uid, 500)}
first_valid_gid = {min(self.gid, 500)}
default_internal_user = dovecot
default_login_user = dovenull
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}

"""
        self.dovecot_conf.write_text(conf + snippet)

    def _pi_pull(self, bundle_ini: str, allowed_signers: str, sync_key: str) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "allowed_signers").write_text(allowed_signers)
        key = self.etc / "sync_key"
        key.write_text(sync_key + "\n")
        key.chmod(0o600)
        cp = configparser.ConfigParser(interpolation=None)
        cp.read_string(bundle_ini)
        cp.set("node", "sync_key_file", str(key))
        cp.set("node", "allowed_signers", str(self.etc / "allowed_signers"))
        cp.set("paths", "sync", "no")
        cp.set("services", "postfix_reload", f"postfix -c {self.postfix_dir} reload")
        cp.set("services", "dovecot_reload", f"doveadm -c {self.dovecot_conf} reload")
        cp.set("services", "postmap", f"postmap -c {self.postfix_dir}")
        cp.set("fleet", "dovecot_config", str(self.dovecot_conf))
        cp.set("fleet", "postqueue", f"postqueue -c {self.postfix_dir}")
        cp.set("fleet", "ca_bundle", str(self.etc / "no-system-cas"))  # trust the fleet's certificates only
        cp.set("freshness", "max_staleness", "0")
        cp.set("lifecycle", "usage_interval", "1")  # a usage pass every tick: the tests read the figures
        with self.ini.open("w") as fh:
            cp.write(fh)

    def _placeholder(self) -> None:
        """What `pi_pull.py install` makes before the first tick: empty tables and the fleet dir."""
        cp = configparser.ConfigParser(interpolation=None)
        cp.read(self.ini)
        n = cp.getint("services", "map_buckets")
        empty = self.root / "placeholder"
        (empty / "postfix").mkdir(parents=True)
        (empty / "dovecot" / "passwd.d").mkdir(parents=True)
        for name in PLACEHOLDER_MAPS:
            for k in range(n):
                self._postmap("-i", f"hash:{empty / 'postfix' / f'{name}.{k:02x}'}", data=b"")
        (self.root / "current").symlink_to("placeholder")
        fleet = self.root / "fleet"
        fleet.mkdir(mode=0o700)
        for name in FLEET_TABLES:
            (fleet / name).write_bytes(b"")
            self._postmap(f"hash:{fleet / name}")

    def _postmap(self, *args: str, data: bytes | None = None) -> None:
        subprocess.run(["postmap", "-c", str(self.postfix_dir), *args], input=data, check=True, capture_output=True)

    # ---- running

    def enter(self) -> None:
        """Start the process that holds the node's mount namespace (its vmail on the state's mail root)."""
        script = f"mount --bind {self.mail_root} {self.state_mail_root} && echo ready && exec sleep infinity"
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(
                f"the namespace of {self.name} did not come up: {self.holder.stderr.read() if self.holder.stderr else ''}"
            )

    def leave(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()

    def _prefix(self) -> list[str]:
        assert self.holder is not None, "enter() first"
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--"]

    def run(
        self, argv: Sequence[str], *, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the node's namespaces."""
        r = subprocess.run(
            [*self._prefix(), *argv], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.ns} failed: {r.stderr}{r.stdout}")
        return r

    def _daemon(self, *argv: str) -> None:
        with open(self.workdir / "start.log", "ab") as fh:
            r = subprocess.run([*self._prefix(), *argv], stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed in {self.ns}: {(self.workdir / 'start.log').read_text()[-2000:]}"
            )

    def start(self) -> None:
        self._daemon("dovecot", "-c", str(self.dovecot_conf))
        self._daemon("postfix", "-c", str(self.postfix_dir), "start")
        self._start_policy()
        self.started = True
        self.wait_ports(25, 993, 587)

    def _start_policy(self) -> None:
        """The outbound policy service the bundle's submission services ask (`pi_pull.py policy`
        on the ini's [policy] listen, loopback inside the namespace), as pi-pull-policy.service runs it."""
        log = open(self.workdir / "policy.log", "ab")  # the process keeps it open
        self.policy = subprocess.Popen(
            [*self._prefix(), sys.executable, str(pi_pull_script()), "policy", "--config", str(self.ini)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        host, port = POLICY_SERVICE.removeprefix("inet:").rsplit(":", 1)
        probe = (
            "import socket,sys,time\nfor _ in range(200):\n"
            f" try: socket.create_connection(('{host}',{port}),1); sys.exit(0)\n"
            " except OSError: time.sleep(0.05)\nsys.exit(1)"
        )
        self.run([sys.executable, "-c", probe], timeout=30, check=True)

    def _stop_policy(self) -> None:
        if self.policy is not None and self.policy.poll() is None:
            self.policy.terminate()
            try:
                self.policy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.policy.kill()
                self.policy.wait()
        self.policy = None

    def start_policy(self) -> None:
        """Start the policy service alone again (Postfix and Dovecot keep running)."""
        self._start_policy()

    def stop_policy(self) -> None:
        """Stop the policy service alone: the node is up, its policy service is not."""
        self._stop_policy()

    def policy_log(self) -> str:
        p = self.workdir / "policy.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_ports(self, *ports: int, timeout: float = 20) -> None:
        import socket

        for port in ports:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with socket.create_connection((self.address, port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop Postfix and Dovecot (the node's services are down; its namespace stays)."""
        subprocess.run([*self._prefix(), "postfix", "-c", str(self.postfix_dir), "abort"], capture_output=True)
        pidfile = self.workdir / "dovecot" / "run" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pidfile.exists():
            time.sleep(0.05)
        self._stop_policy()
        self.started = False

    def tick(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One pi-pull tick of the bundle's single-file agent, inside the namespace."""
        return self.run(
            [sys.executable, str(pi_pull_script()), "--config", str(self.ini), "--once", *args], timeout=600
        )

    def follow(self) -> subprocess.Popen[bytes]:
        """pi-pull in follow mode, as the bundle's pi-pull-follow.service runs it."""
        log = open(self.workdir / "follow.log", "ab")  # the process keeps it open
        return subprocess.Popen(
            [*self._prefix(), sys.executable, str(pi_pull_script()), "--config", str(self.ini), "--follow"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(["doveadm", "-c", str(self.dovecot_conf), *args])

    def postqueue(self) -> str:
        return self.run(["postqueue", "-c", str(self.postfix_dir), "-p"]).stdout

    def flush(self) -> None:
        self.run(["postqueue", "-c", str(self.postfix_dir), "-f"])

    def postfix_log(self) -> str:
        p = self.workdir / "postfix.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def dovecot_log(self) -> str:
        p = self.workdir / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # ---- clients, from the test's (root) namespace over the bridge

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls_cert))
        ctx.check_hostname = False
        return ctx

    def imap(self, user: str, password: str) -> imaplib.IMAP4_SSL:
        m = imaplib.IMAP4_SSL(self.address, 993, ssl_context=self.tls_context(), timeout=20)
        try:
            m.login(user, password)
        except Exception:
            with contextlib.suppress(Exception):
                m.logout()
            raise
        return m

    def send(self, to: str, subject: str, body: str = "hello from the fleet test\r\n") -> None:
        """An SMTP delivery to port 25, as another mail server on the internet makes it."""
        msg = f"From: sender@outside.test\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@outside.test>\r\n\r\n{body}"
        with contextlib.closing(smtplib.SMTP(self.address, 25, timeout=20)) as s:
            s.ehlo("outside.test")
            s.sendmail("sender@outside.test", [to], msg)
            s.quit()

    def submit(self, user: str, password: str, to: str, subject: str) -> None:
        """A submission on 587 (STARTTLS, SASL) as a mail client makes it."""
        msg = f"From: {user}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nsubmitted\r\n"
        with contextlib.closing(smtplib.SMTP(self.address, 587, timeout=20)) as s:
            s.ehlo("client.test")
            s.starttls(context=self.tls_context())
            s.ehlo("client.test")
            s.login(user, password)
            s.sendmail(user, [to], msg)
            s.quit()

    def maildir_messages(self, domain: str) -> list[Path]:
        """Every message file in this node's Maildirs of `domain` (cur/ and new/ of every folder)."""
        base = self.mail_root / domain
        return sorted(p for p in base.glob("*/Maildir/**/*") if p.is_file() and p.parent.name in ("cur", "new"))


def subjects(node: FleetNode, user: str, password: str) -> list[str]:
    """The Subject of every message in the INBOX, in order, read over IMAP on `node`."""
    m = node.imap(user, password)
    try:
        m.select("INBOX")
        typ, data = m.search(None, "ALL")
        ids = data[0].split() if typ == "OK" and data and data[0] else []
        out = []
        for i in ids:
            typ, fetched = m.fetch(i, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            item = fetched[0]
            assert isinstance(item, tuple)
            out.append(bytes(item[1]).decode().split(":", 1)[1].strip())
        return out
    finally:
        with contextlib.suppress(Exception):
            m.logout()


def wait_for(what: str, check, timeout: float = 30.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll `check()` until it returns something truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def new_workdir(name: str) -> Path:
    return make_public_tmpdir(f"fleet-{name}-")


def cleanup(nodes: Sequence[FleetNode]) -> None:
    for node in nodes:
        if node.started:
            node.stop()
        node.leave()
        shutil.rmtree(node.workdir, ignore_errors=True)


def vmail() -> tuple[int, int]:
    return ensure_vmail()
