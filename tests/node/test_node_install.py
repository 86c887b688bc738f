"""`pi_pull.py install` / `uninstall` against temp config dirs, with the real postconf, doveconf,
postfix, doveadm and systemd-analyze.

The host starts as Debian leaves it: Dovecot's packaged /etc/dovecot (copied), and Postfix
either installed with "No configuration" (no main.cf, no master.cf) or as "Internet Site".
Every test runs the built single file (the zipapp a bundle ships) as a subprocess, except the
systemd one, which drives the Installer in-process through the Runner seam: there is no
running systemd in a test container, and a test must never restart the machine's services.
"""

from __future__ import annotations

import grp
import hashlib
import importlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailstate.compiler.node_bundle import BundleOptions, render_node_bundle
from tests.helpers.mailnode import (
    MailNode,
    StateRepo,
    free_ports,
    make_public_tmpdir,
    make_signing_key,
    pi_pull_script,
    require_binaries,
    wait_port,
    write_allowed_signers,
)

pytestmark = pytest.mark.e2e

SYNC_KEY = "sk-node-install-8c1f0e5b2d7a4e96b3a1f0c2d4e6a8b0"
SIGNERS = 'mailstate namespaces="git" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHcQ0gX0m8c4n3dK5u6a0b2c3d4e5f6a7b8c9d0e1f2a3b4 mailstate\n'
MAIL_UID = MAIL_GID = 5000
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing from the machine's git/ssh setup may leak into pi-pull or the test repos."""
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("node install tests need root (chown of the mail root)")
        pytest.skip("node install tests need root (chown of the mail root)")


@dataclass
class Host:
    """A node's config dirs under one temp dir, and the install options that point at them."""

    w: Path

    @property
    def postfix(self) -> Path:
        return self.w / "etc" / "postfix"

    @property
    def dovecot(self) -> Path:
        return self.w / "etc" / "dovecot"

    @property
    def etc(self) -> Path:
        return self.w / "etc" / "pi-pull"

    @property
    def rspamd(self) -> Path:
        return self.w / "etc" / "rspamd"

    @property
    def queue(self) -> Path:
        """Postfix's queue directory as the bundle names it (rspamd's milter socket goes under it)."""
        return self.w / "spool" / "postfix"

    @property
    def systemd(self) -> Path:
        return self.w / "etc" / "systemd" / "system"

    @property
    def lib(self) -> Path:
        return self.w / "usr" / "local" / "lib" / "pi-pull"

    @property
    def mail_root(self) -> Path:
        return self.w / "var" / "vmail"

    @property
    def root(self) -> Path:
        return self.w / "var" / "lib" / "pi-pull"

    def dir_args(self) -> list[str]:
        return [
            "--etc-dir",
            str(self.etc),
            "--lib-dir",
            str(self.lib),
            "--systemd-dir",
            str(self.systemd),
            "--postfix-dir",
            str(self.postfix),
            "--dovecot-dir",
            str(self.dovecot),
            "--rspamd-dir",
            str(self.rspamd),
        ]

    def bundle(self, name: str = "bundle", **kwargs: Any) -> Path:
        """Write a bundle (as `mailstate node bundle` does) whose services are this host's."""
        args: dict[str, Any] = {
            "node_name": "pi-01",
            "server_url": "https://mail.example.net",
            "allowed_signers": SIGNERS,
            "root": str(self.root),
            "mail_root": str(self.mail_root),
            "postfix_queue_dir": str(self.queue),
            "mail_uid": MAIL_UID,
            "mail_gid": MAIL_GID,
            "postmap": f"postmap -c {self.postfix}",
            "postfix_reload": f"postfix -c {self.postfix} reload",
            "dovecot_reload": f"doveadm -c {self.dovecot}/dovecot.conf reload",
        }
        args.update(kwargs)
        out = self.w / name
        for rel, content in render_node_bundle(
            args.pop("node_name"), args.pop("server_url"), args.pop("allowed_signers"), BundleOptions(**args)
        ).items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(content.encode() if isinstance(content, str) else content)
        return out

    def pi_pull(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(pi_pull_script()), *args], input=stdin, capture_output=True, text=True, timeout=300
        )

    def install(self, bundle: Path, *args: str, key: str | None = SYNC_KEY) -> subprocess.CompletedProcess[str]:
        key_args = ["--sync-key-stdin"] if key is not None else []
        return self.pi_pull(
            "install", "--bundle", str(bundle), *key_args, *self.dir_args(), "--no-start", *args, stdin=key
        )

    def uninstall(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.pi_pull("uninstall", "--etc-dir", str(self.etc), "--no-start", *args)

    def tree(self, *, skip: Sequence[Path] = ()) -> dict[str, tuple[str, int, int, int]]:
        """Every path under etc/, usr/, var/ (but ``skip``): content hash, mode and owner."""
        out: dict[str, tuple[str, int, int, int]] = {}
        for top in ("etc", "usr", "var"):
            if self.w / top in skip:
                continue
            for dirpath, dirnames, filenames in os.walk(self.w / top):
                dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
                for name in ["", *filenames]:
                    p = Path(dirpath, name) if name else Path(dirpath)
                    st = p.lstat()
                    data = (
                        p.read_bytes()
                        if p.is_file() and not p.is_symlink()
                        else os.fsencode(str(p.readlink()))
                        if p.is_symlink()
                        else b""
                    )
                    out[str(p.relative_to(self.w))] = (
                        hashlib.sha256(data).hexdigest(),
                        st.st_mode,
                        st.st_uid,
                        st.st_gid,
                    )
        return out


def _make_host(postfix: str) -> Iterator[Host]:
    require_binaries("postconf", "doveconf", "postfix", "doveadm", "postmap")
    _need_root()
    if not Path("/etc/dovecot/conf.d/10-auth.conf").is_file():
        pytest.fail("Dovecot's packaged /etc/dovecot is missing (apt-get install dovecot-imapd dovecot-lmtpd)")
    host = Host(make_public_tmpdir("node-install-"))
    shutil.copytree("/etc/dovecot", host.dovecot, symlinks=True)
    if not Path("/etc/rspamd/rspamd.conf").is_file():
        pytest.fail("rspamd's packaged /etc/rspamd is missing (apt-get install rspamd)")
    shutil.copytree("/etc/rspamd", host.rspamd, symlinks=True)
    assert b"pi_pull.py install" not in (host.dovecot / "conf.d" / "10-auth.conf").read_bytes(), (
        "the machine's dovecot is edited"
    )
    host.postfix.mkdir(parents=True)
    if postfix == "internet-site":
        shutil.copy("/usr/share/postfix/main.cf.debian", host.postfix / "main.cf")
        with open(host.postfix / "main.cf", "a") as fh:  # a value the bundle overrides, to be restored
            fh.write("myhostname = node.example.net\nvirtual_transport = virtual\n")
        shutil.copy("/usr/share/postfix/master.cf.dist", host.postfix / "master.cf")
    try:
        yield host
    finally:
        shutil.rmtree(host.w, ignore_errors=True)


@pytest.fixture
def host() -> Iterator[Host]:
    """A host whose Postfix was installed with "No configuration" (no main.cf, no master.cf)."""
    yield from _make_host("none")


@pytest.fixture
def site_host() -> Iterator[Host]:
    """A host whose Postfix was installed as "Internet Site" (Debian's main.cf and master.cf)."""
    yield from _make_host("internet-site")


def _postconf(host: Host, *names: str) -> dict[str, str]:
    r = subprocess.run(["postconf", "-c", str(host.postfix), "-n", *names], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dict(line.split(" = ", 1) for line in r.stdout.splitlines() if " = " in line)


def _doveconf(host: Host) -> str:
    r = subprocess.run(["doveconf", "-c", str(host.dovecot / "dovecot.conf"), "-n"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _no_key(*results: subprocess.CompletedProcess[str]) -> None:
    for r in results:
        assert SYNC_KEY not in r.stdout + r.stderr


# --------------------------------------------------------------------------- install, idempotence, uninstall


def test_dry_run_changes_nothing(host: Host) -> None:
    bundle = host.bundle()
    before = host.tree()
    r = host.install(bundle, "--dry-run")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert host.tree() == before
    out = r.stdout
    for action in (
        f"would install {host.etc}/pi-pull.ini (0644)",
        f"would install {host.etc}/sync_key (0600)",
        f"would install {host.lib}/pi_pull.py (0755)",
        f"would install {host.systemd}/pi-pull.timer",
        f"would set 27 mailstate lines in {host.postfix}/main.cf",
        f"would install {host.rspamd}/local.d/worker-proxy.inc (0644)",
        f"would write {host.postfix}/master.cf",
        "would comment out `!include auth-system.conf.ext`",
        f"would create mail root {host.mail_root}",
        f"would create {host.etc}/dkim/KeyTable (0644, empty",
        f"would create {host.etc}/dkim/SigningTable (0644, empty",
        "(0700) and empty hash tables tls_policy, ccerts",
    ):
        assert action in out, out
    assert "No configuration" in out and "dry run:" in out
    _no_key(r)
    r = host.install(bundle, "--dry-run", key=None)  # a dry run needs no key: it says the real run does
    assert r.returncode == EXIT_OK and "the real run needs --sync-key-stdin" in r.stdout, r.stdout + r.stderr
    assert host.tree() == before


def test_install_no_configuration_postfix_then_again_then_uninstall(host: Host) -> None:
    bundle = host.bundle()
    original = host.tree()
    r = host.install(bundle, "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "installed node pi-01" in r.stdout and "checked: postconf -n and doveconf -n" in r.stdout

    # Postfix: a minimal main.cf with the mailstate lines, master.cf from Postfix's own dist
    conf = _postconf(host)
    for name in ("virtual_mailbox_maps", "virtual_mailbox_domains", "virtual_alias_maps", "smtpd_sender_login_maps"):
        table = name.removeprefix("smtpd_")
        assert conf[name] == ", ".join(f"hash:{host.root}/current/postfix/{table}.{k:02x}" for k in range(16))
    # the bucketed layout's 64 tables exist, empty, before the first tick (current -> placeholder)
    assert os.readlink(host.root / "current") == "placeholder"
    for name in ("virtual_mailbox_maps", "virtual_mailbox_domains", "virtual_alias_maps", "sender_login_maps"):
        for k in (0, 7, 15):
            table = f"hash:{host.root}/current/postfix/{name}.{k:02x}"
            q = subprocess.run(["postmap", "-c", str(host.postfix), "-s", table], capture_output=True, text=True)
            assert q.returncode == 0 and q.stdout == "", q.stderr
    assert sorted(os.listdir(host.root / "placeholder" / "postfix")) == sorted(
        f"{n}.{k:02x}.db"
        for n in (
            "virtual_mailbox_maps",
            "virtual_mailbox_domains",
            "virtual_alias_maps",
            "sender_login_maps",
            "fleet_transport",
            "fleet_defer",
        )
        for k in range(16)
    )
    assert os.listdir(host.root / "current" / "dovecot" / "passwd.d") == []
    assert conf["virtual_transport"] == "lmtp:inet:127.0.0.1:24"
    # port 25 goes through rspamd (tempfail while it is down); the submission services have their own milter
    assert conf["smtpd_milters"] == "unix:rspamd/milter.sock" and conf["milter_default_action"] == "tempfail"
    assert "checked: rspamadm configtest accepts" in r.stdout
    sock = f"{host.queue}/rspamd/milter.sock mode=0660 owner=_rspamd group=postfix"
    assert f'bind_socket = "{sock}";' in (host.rspamd / "local.d" / "worker-proxy.inc").read_text()
    # the socket's directory: rspamd's, group postfix, setgid (the socket rspamd makes gets group postfix)
    st = (host.queue / "rspamd").stat()
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam("_rspamd").pw_uid, grp.getgrnam("postfix").gr_gid)
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert conf["compatibility_level"] == "3.6"
    # master.cf: Postfix's own dist plus the bundle's submission entries (587, 465)
    master = (host.postfix / "master.cf").read_bytes()
    assert master.startswith(
        Path("/usr/share/postfix/master.cf.dist").read_bytes().rstrip(b"\n").rsplit(b"\n#submission", 1)[0][:200]
    )
    for svc in ("submission/inet", "submissions/inet"):
        m = subprocess.run(["postconf", "-c", str(host.postfix), "-M", svc], capture_output=True, text=True)
        assert m.stdout.split()[7:8] == ["smtpd"] and "smtpd_sasl_auth_enable=yes" in m.stdout, m.stdout
        assert "smtpd_milters=inet:127.0.0.1:8891" in m.stdout, m.stdout  # never port 25's spam milter
    # port 25's own cleanup, which hands rspamd the GTUBE marker its local.d/regexp.conf scores (docs/inbound.md)
    m = subprocess.run(
        ["postconf", "-c", str(host.postfix), "-M", "smtpd/pass", "cleanup-inbound/unix"],
        capture_output=True,
        text=True,
    )
    assert "cleanup_service_name=cleanup-inbound" in m.stdout and "body_checks=regexp:" in m.stdout, m.stdout
    assert "MAILSTATE_GTUBE {" in (host.rspamd / "local.d" / "regexp.conf").read_text()
    # the TLS files live under the etc dir, which this install moved (install made a self-signed pair there)
    assert conf["smtpd_sasl_type"] == "dovecot" and conf["smtpd_tls_cert_file"] == f"{host.etc}/tls/fullchain.pem"
    # Dovecot: the snippet is in, the system users are not a passdb any more
    dv = _doveconf(host)
    assert f"args = scheme=BLF-CRYPT username_format=%u {host.root}/current/dovecot/passwd.d/%1d/%2d/%d\n" in dv
    assert "driver = pam" not in dv and "driver = passwd-file" in dv
    # learning (docs/inbound.md): the IMAPSieve scripts precompiled under the etc dir, the one
    # program they may pipe to under the lib dir, both named by the relocated Dovecot snippet
    for name in ("junk", "learn-spam", "learn-ham"):
        assert (host.etc / f"{name}.svbin").is_file(), name
    assert stat.S_IMODE((host.lib / "sieve-pipe" / "rspamd-learn").stat().st_mode) == 0o755
    assert f"sieve_pipe_bin_dir = {host.lib}/sieve-pipe\n" in dv
    assert f"imapsieve_mailbox1_before = file:{host.etc}/learn-spam.sieve\n" in dv
    assert f"imapsieve_mailbox2_before = file:{host.etc}/learn-ham.sieve\n" in dv
    # files, modes, the key, the mail root
    for path, mode in (
        (host.etc / "pi-pull.ini", 0o644),
        (host.etc / "allowed_signers", 0o644),
        (host.lib / "pi_pull.py", 0o755),
        (host.systemd / "pi-pull.service", 0o644),
        (host.etc / "sync_key", 0o600),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert (host.etc / "sync_key").read_text() == SYNC_KEY + "\n"
    assert SYNC_KEY not in (host.etc / "install.json").read_text()
    assert (
        f"ExecStart=/usr/bin/python3 {host.lib}/pi_pull.py --config {host.etc}/pi-pull.ini --once"
        in (host.systemd / "pi-pull.service").read_text()
    )
    ini = (host.etc / "pi-pull.ini").read_text()
    assert f"sync_key_file = {host.etc}/sync_key" in ini and f"allowed_signers = {host.etc}/allowed_signers" in ini
    st = host.mail_root.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (MAIL_UID, MAIL_GID, 0o750)

    # a second run changes nothing
    installed = host.tree()
    again = host.install(bundle, "--no-tick")
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "already installed: nothing changed" in again.stdout
    assert host.tree() == installed

    # uninstall: everything back byte for byte; the mail root stays; rspamd's socket goes with its directory
    with socket.socket(socket.AF_UNIX) as milter:
        milter.bind(str(host.queue / "rspamd" / "milter.sock"))
    u = host.uninstall()
    assert u.returncode == EXIT_OK, u.stdout + u.stderr
    assert f"remove rspamd's milter socket {host.queue}/rspamd/milter.sock" in u.stdout
    assert f"kept the mail root {host.mail_root}" in u.stdout
    assert host.tree(skip=[host.w / "var"]) == {k: v for k, v in original.items() if not k.startswith("var")}
    assert host.mail_root.is_dir()
    assert not (host.w / "spool").exists()  # the milter socket's directory (and its parents install made)
    assert "not installed" in host.uninstall().stdout
    _no_key(r, again, u)


def test_internet_site_main_cf_restored_byte_for_byte(site_host: Host) -> None:
    host = site_host
    main_before = (host.postfix / "main.cf").read_bytes()
    auth_before = (host.dovecot / "conf.d" / "10-auth.conf").read_bytes()
    original = host.tree()
    key_file = host.w / "key.txt"
    key_file.write_text(SYNC_KEY + "\n")
    r = host.pi_pull(
        "install",
        "--bundle",
        str(host.bundle()),
        "--sync-key-file",
        str(key_file),
        *host.dir_args(),
        "--no-start",
        "--no-tick",
    )
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    conf = _postconf(host)
    assert conf["virtual_transport"] == "lmtp:inet:127.0.0.1:24"  # replaced in place
    assert conf["myhostname"] == "node.example.net" and conf["smtpd_banner"].endswith("(Debian/GNU)")  # the rest kept
    assert "master.cf" in r.stdout and f"{host.postfix}/master.cf (exists)" in r.stdout

    u = host.uninstall()
    assert u.returncode == EXIT_OK, u.stdout + u.stderr
    assert (host.postfix / "main.cf").read_bytes() == main_before
    assert (host.dovecot / "conf.d" / "10-auth.conf").read_bytes() == auth_before
    assert host.tree(skip=[host.w / "var"]) == {k: v for k, v in original.items() if not k.startswith("var")}
    _no_key(r, u)


def test_uninstall_keeps_the_operators_later_edits(site_host: Host) -> None:
    host = site_host
    r = host.install(host.bundle(), "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    with open(host.postfix / "main.cf", "a") as fh:
        fh.write("message_size_limit = 52428800\n")
    auth = host.dovecot / "conf.d" / "10-auth.conf"
    auth.write_bytes(auth.read_bytes() + b"auth_verbose = yes\n")
    u = host.uninstall()
    assert u.returncode == EXIT_OK, u.stdout + u.stderr
    assert "changed since install" in u.stdout
    conf = _postconf(host)
    assert conf["message_size_limit"] == "52428800"  # the operator's line stays
    assert conf["virtual_transport"] == "virtual"  # the original value is back
    assert "virtual_mailbox_maps" not in conf  # install's own lines are gone
    text = auth.read_text()
    assert (
        "auth_verbose = yes" in text
        and "\n!include auth-system.conf.ext\n" in text
        and "pi_pull.py install" not in text
    )


def test_units_pass_systemd_analyze_verify(host: Host) -> None:
    require_binaries("systemd-analyze")
    r = host.install(host.bundle(), "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    v = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            "./pi-pull.service",
            "./pi-pull.timer",
            "./pi-pull-follow.service",
            "./pi-pull-policy.service",
        ],
        capture_output=True,
        text=True,
        cwd=host.systemd,
    )
    complaints = [line for line in (v.stdout + v.stderr).splitlines() if "pi-pull." in line]
    assert v.returncode == 0 and not complaints, v.stdout + v.stderr


def test_damaged_bundle_missing_key_and_help(host: Host) -> None:
    bundle = host.bundle()
    before = host.tree()
    r = host.install(bundle, key=None)
    assert r.returncode == EXIT_USAGE and "--sync-key-stdin" in r.stderr, r.stderr
    assert host.tree() == before  # refused before anything changed
    (bundle / "pi-pull.ini").write_text((bundle / "pi-pull.ini").read_text() + "# edited\n")
    before = host.tree()
    r = host.install(bundle)
    assert r.returncode == EXIT_USAGE and "does not match bundle.json" in r.stderr, r.stderr
    assert host.tree() == before
    r = host.install(host.bundle("bad-key"), key="two words")
    assert r.returncode == EXIT_USAGE and "one non-empty word" in r.stderr
    for cmd in ("install", "uninstall"):
        h = host.pi_pull(cmd, "--help")
        assert h.returncode == 0 and "exit codes:" in h.stdout and "--dry-run" in h.stdout
    h = host.pi_pull("--help")
    assert h.returncode == 0 and "pi_pull.py install --bundle DIR" in h.stdout


def test_a_fresh_install_gives_opendkim_tables_it_starts_with(host: Host) -> None:
    """OpenDKIM refuses a config whose KeyTable or SigningTable is missing (`opendkim -n` exits 78,
    and so does its start), and install (re)starts it before pi-pull's first tick writes them. So
    install makes them, empty (nothing is signed before a key is published), never over pi-pull's.
    The real opendkim on the installed config: `opendkim -n` accepts it, and OpenDKIM starts and
    listens. Only its socket and pid file come from the command line (which overrides the config:
    the machine's port 8891 and /run are not the test's); the rest is the installed config,
    UserID opendkim included."""
    require_binaries("opendkim")
    r = host.install(host.bundle(), "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    conf = host.postfix.parent / "opendkim.conf"
    key_dir = host.etc / "dkim"
    assert f"checked: opendkim -n accepts {conf}" in r.stdout, r.stdout
    text = conf.read_text()  # follows --etc-dir, as pi-pull.ini's [dkim] key_dir does
    assert f"file:{key_dir}/KeyTable" in text and f"refile:{key_dir}/SigningTable" in text
    assert ":/etc/pi-pull/" not in text and f"key_dir = {key_dir}\n" in (host.etc / "pi-pull.ini").read_text()
    for name in ("KeyTable", "SigningTable"):
        assert (key_dir / name).read_bytes() == b"" and stat.S_IMODE((key_dir / name).stat().st_mode) == 0o644
    st = key_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750 and (st.st_uid, st.st_gid) == (0, grp.getgrnam("opendkim").gr_gid)
    n = subprocess.run(["opendkim", "-n", "-x", str(conf)], capture_output=True, text=True, timeout=30)
    assert n.returncode == 0, n.stderr

    (port,) = free_ports(1)
    log = host.w / "opendkim.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["opendkim", "-f", "-x", str(conf), "-p", f"inet:{port}@127.0.0.1", "-P", str(host.w / "opendkim.pid")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_port(port, timeout=20)
        except OSError:
            raise AssertionError(f"opendkim did not start (rc={proc.poll()}): {log.read_text()}") from None
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # pi-pull's tables are its own from the first tick on: a later install leaves them alone.
    (key_dir / "KeyTable").write_text("x.example x.example:ms1-pi-01:/nowhere\n")
    again = host.install(host.bundle(), "--no-tick")
    assert again.returncode == EXIT_OK and "already installed: nothing changed" in again.stdout, again.stdout
    assert (key_dir / "KeyTable").read_text() == "x.example x.example:ms1-pi-01:/nowhere\n"


# --------------------------------------------------------------------------- the first tick


def _local_state(host: Host) -> tuple[StateRepo, Path]:
    key = make_signing_key(host.w / "keys")
    repo = StateRepo(host.w / "state", key, mail_root=str(host.mail_root))
    repo.set_mailbox("info@example.com", "pw-123456")
    repo.commit()
    signers = write_allowed_signers(host.w / "allowed_signers", [key])
    return repo, signers


def test_first_tick_runs_and_applies(host: Host) -> None:
    repo, signers = _local_state(host)
    bundle = host.bundle(
        server_url="",
        remote_url=str(repo.bare),
        report_url="",
        allowed_signers=signers.read_text(),
        postfix_reload="true",
        dovecot_reload="true",
    )
    r = host.install(bundle, key=None)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "no sync key needed" in r.stdout and "first tick:" in r.stdout
    assert f"applied {repo.tip()[:12]}" in r.stderr
    assert os.readlink(host.root / "current") == f"releases/{repo.tip()}"
    again = host.install(bundle, key=None)
    assert again.returncode == EXIT_OK and "already installed: nothing changed" in again.stdout
    assert f"up to date at {repo.tip()[:12]}" in again.stderr


def test_first_tick_with_postfix_and_dovecot_not_running_says_what_to_do(host: Host) -> None:
    """Postfix installed with "No configuration" and never started, Dovecot not running: the
    tick fails, and its error names the problem and the fix (it used to be empty)."""
    repo, signers = _local_state(host)
    (host.dovecot / "dovecot.conf").write_text(
        (host.dovecot / "dovecot.conf").read_text() + f"\nbase_dir = {host.w}/dovecot-run\n"
    )
    bundle = host.bundle(server_url="", remote_url=str(repo.bare), report_url="", allowed_signers=signers.read_text())
    r = host.install(bundle, "--no-tick", key=None)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    # this Postfix's own queue (never the machine's /var/spool/postfix, whose master may run)
    (host.w / "queue").mkdir()
    subprocess.run(["postconf", "-c", str(host.postfix), "-e", f"queue_directory = {host.w}/queue"], check=True)
    r = host.install(bundle, key=None)
    assert r.returncode == EXIT_ERROR, r.stdout + r.stderr
    assert "postfix reload failed (rc=1): postfix is not running: start it with" in r.stderr, r.stderr
    assert "dovecot reload failed (rc=75): dovecot is not running: start it with" in r.stderr, r.stderr
    assert "installed, but the first tick failed (exit 1)" in r.stderr


def test_reload_of_an_unconfigured_postfix_is_explained(tmp_path: Path) -> None:
    """The empty error text itself: `postfix reload` prints nothing when stderr is not a terminal."""
    require_binaries("postfix", "postconf")
    repo_dir = make_public_tmpdir("node-install-tick-")
    try:
        key = make_signing_key(repo_dir / "keys")
        repo = StateRepo(repo_dir / "state", key)
        repo.set_mailbox("info@example.com", "pw-123456")
        repo.commit()
        empty = repo_dir / "postfix-no-configuration"
        empty.mkdir()
        raw = subprocess.run(["postfix", "-c", str(empty), "reload"], capture_output=True)
        assert raw.returncode != 0 and raw.stdout + raw.stderr == b""  # what the tick used to report
        ini = repo_dir / "pi-pull.ini"
        ini.write_text(
            f"[remote]\nurl = {repo.bare}\n[node]\nallowed_signers = "
            f"{write_allowed_signers(repo_dir / 'allowed_signers', [key])}\n[paths]\nroot = {repo_dir}/root\nsync = no\n"
            "mail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
            f"[services]\nmap_type = texthash\npostfix_reload = postfix -c {empty} reload\ndovecot_reload = true\n"
        )
        r = subprocess.run(
            [sys.executable, str(pi_pull_script()), "--config", str(ini), "--once"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == EXIT_ERROR, r.stderr
        assert f"postfix is not configured: {empty}/main.cf does not exist" in r.stderr, r.stderr
        assert "pi_pull.py install --bundle DIR" in r.stderr
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


# --------------------------------------------------------------------------- systemd, through the Runner seam


class SystemdRunner:
    """Answers `systemctl` like a machine whose services are stopped and whose timer is disabled;
    every other command runs for real."""

    def __init__(self, runner: Any) -> None:
        self.real = runner
        self.env = runner.env
        self.calls: list[list[str]] = []
        self.argvs: list[list[str]] = []  # every command, to check that no argv carries the key
        self.active: set[str] = set()
        self.enabled: set[str] = set()

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        self.argvs.append(list(argv))
        if argv[0] != "systemctl":
            return self.real.run(argv, input=input, env=env, timeout=timeout, cwd=cwd)
        args = list(argv[1:])
        self.calls.append(args)
        unit = args[-1]
        rc = 0
        if args[0] == "is-active":
            rc = 0 if unit in self.active else 3
        elif args[0] == "is-enabled":
            rc = 0 if unit in self.enabled else 1
        elif args[0] in ("start", "restart"):
            self.active.add(unit)
        elif args[0] == "enable":
            self.enabled.add(unit)
        return subprocess.CompletedProcess(list(argv), rc, b"", b"")

    def shell(self, command: str, *, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        result: subprocess.CompletedProcess[bytes] = self.real.shell(command, timeout=timeout)
        return result


def test_with_systemd_units_are_loaded_services_started_and_timer_enabled(host: Host, pipull: Any) -> None:
    inst = importlib.import_module("pipull.install")
    runner = SystemdRunner(pipull.runner.Runner())
    bundle = inst.Bundle.load(str(host.bundle()))
    overrides = {
        "etc_dir": str(host.etc),
        "lib_dir": str(host.lib),
        "systemd_dir": str(host.systemd),
        "postfix_dir": str(host.postfix),
        "dovecot_dir": str(host.dovecot),
        "rspamd_dir": str(host.rspamd),
    }
    lines: list[str] = []

    def once() -> int:
        opts = inst.Options(dirs=inst.resolve_dirs(bundle, overrides), systemd=True, tick=False)
        installer = inst.Installer(bundle, opts, runner=runner, sync_key=SYNC_KEY, out=lines.append)
        installer.run()
        installer.enable_timer()
        return int(installer.steps.changes)

    assert once() > 0
    changes = [c for c in runner.calls if c[0] not in ("is-active", "is-enabled")]
    # opendkim: the bundle's opendkim.conf went in beside the postfix dir (the DKIM signer);
    # rspamd: port 25's milter, with the bundle's local.d under --rspamd-dir.
    assert changes == [
        ["daemon-reload"], ["enable", "--now", "pi-pull-policy.service"],
        ["start", "postfix"], ["start", "dovecot"], ["start", "opendkim"], ["start", "rspamd"],
        ["enable", "--now", "pi-pull-follow.service"], ["enable", "--now", "pi-pull.timer"],
    ]  # fmt: skip
    assert (host.postfix.parent / "opendkim.conf").read_bytes() == (
        host.bundle() / "opendkim" / "opendkim.conf"
    ).read_bytes().replace(b"/etc/pi-pull/", f"{host.etc}/".encode())  # the tables under --etc-dir
    runner.calls.clear()
    lines.clear()
    assert once() == 0  # everything is in place: no systemctl call changes anything
    assert all(c[0] in ("is-active", "is-enabled") for c in runner.calls), runner.calls
    assert "already installed: pi-pull.timer enabled" in lines and "already installed: postfix running" in lines
    assert "already installed: pi-pull-follow.service enabled" in lines
    assert "already installed: pi-pull-policy.service enabled" in lines
    assert SYNC_KEY not in "\n".join(lines)

    un = importlib.import_module("pipull.uninstall")
    runner.calls.clear()
    un.Uninstaller(inst.Options(dirs={"etc_dir": str(host.etc)}, systemd=True), runner=runner, out=lines.append).run()
    changes = [c for c in runner.calls if c[0] not in ("is-active", "is-enabled")]
    assert changes == [
        ["disable", "--now", "pi-pull-follow.service"], ["disable", "--now", "pi-pull.timer"],
        ["disable", "--now", "pi-pull-policy.service"], ["daemon-reload"], ["restart", "postfix"], ["restart", "dovecot"], ["restart", "opendkim"],
        ["restart", "rspamd"],
    ]  # fmt: skip
    assert not list((host.rspamd / "local.d").iterdir())  # rspamd's own local.d again (it was empty)
    assert not (
        host.postfix.parent / "opendkim.conf"
    ).exists()  # there was none before install: the dkim config is gone
    assert runner.argvs and not any(SYNC_KEY in " ".join(argv) for argv in runner.argvs)  # never in a child's argv
    assert SYNC_KEY not in "\n".join(lines)


def test_dovecot_auth_edit_is_exactly_reversible(pipull: Any) -> None:
    hc = importlib.import_module("pipull.hostconf")
    text = b"# comment\n  !include auth-system.conf.ext\r\n!include_try auth-system.conf.ext\n#!include auth-sql.conf.ext\n"
    edited = hc.disable_auth_system(text)
    assert not hc.auth_system_enabled(edited) and hc.auth_system_enabled(text)
    assert hc.disable_auth_system(edited) == edited  # idempotent
    assert hc.restore_auth_system(edited) == text
    conf = b"protocols = imap\n"
    added = hc.include_snippet(conf, "conf.d/90-mailstate.conf")
    assert added.startswith(conf) and b"!include conf.d/90-mailstate.conf" in added
    assert hc.include_snippet(added, "conf.d/90-mailstate.conf") == added and hc.remove_include(added) == conf
    assert hc.include_snippet(b"!include conf.d/*.conf\n", "conf.d/90-mailstate.conf") == b"!include conf.d/*.conf\n"


def test_failed_reload_of_a_running_postfix_shows_postfix_s_own_message(mailnode: MailNode) -> None:
    """Configured and running, yet the reload fails: the message is postfix's own, read from a
    terminal (without one, postfix prints nothing)."""
    repo_dir = make_public_tmpdir("node-install-running-")
    try:
        key = make_signing_key(repo_dir / "keys")
        repo = StateRepo(repo_dir / "state", key, mail_root=str(mailnode.mail_root), uid=mailnode.uid, gid=mailnode.gid)
        repo.set_mailbox("info@example.com", "pw-123456")
        repo.commit()
        bad = f"postfix -c {mailnode.postfix_dir} relaod"  # a typo: postfix refuses it, on a terminal only
        raw = subprocess.run(bad, shell=True, capture_output=True)
        assert raw.returncode != 0 and raw.stdout + raw.stderr == b""
        ini = mailnode.write_pi_pull_config(
            repo_dir / "pi-pull.ini",
            str(repo.bare),
            write_allowed_signers(repo_dir / "allowed_signers", [key]),
            postfix_reload=bad,
        )
        r = subprocess.run(
            [sys.executable, str(pi_pull_script()), "--config", str(ini), "--once"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == EXIT_ERROR, r.stderr
        assert "postfix reload failed (rc=1): postfix" in r.stderr and "relaod" in r.stderr, r.stderr
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def _with_master_entries(bundle: Path, *lines: str) -> Path:
    """Add master.cf entries to a bundle, as a bundle that has them lists them in bundle.json."""
    (bundle / "postfix" / "master.cf.mailstate").write_text(
        "# master.cf entries\n" + "".join(f"{line}\n" for line in lines)
    )
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["postfix"]["master_cf"] = "postfix/master.cf.mailstate"
    manifest["sha256"]["postfix/master.cf.mailstate"] = hashlib.sha256(
        (bundle / "postfix" / "master.cf.mailstate").read_bytes()
    ).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle


def test_master_cf_entries_set_and_undone(site_host: Host) -> None:
    host = site_host
    original = host.tree()
    entry = "submission/inet = submission inet n - y - - smtpd -o syslog_name=postfix/submission"
    bundle = _with_master_entries(host.bundle(), entry)
    r = host.install(bundle, "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    m = subprocess.run(["postconf", "-c", str(host.postfix), "-M", "submission/inet"], capture_output=True, text=True)
    assert m.returncode == 0 and m.stdout.split()[:8] == ["submission", "inet", "n", "-", "y", "-", "-", "smtpd"], (
        m.stdout + m.stderr
    )
    again = host.install(bundle, "--no-tick")
    assert "already installed: nothing changed" in again.stdout, again.stdout
    u = host.uninstall()
    assert u.returncode == EXIT_OK, u.stdout + u.stderr
    assert host.tree(skip=[host.w / "var"]) == {k: v for k, v in original.items() if not k.startswith("var")}

    # edited since install: the operator's edit stays, install's entry goes
    r = host.install(bundle, "--no-tick")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    with open(host.postfix / "master.cf", "a") as fh:
        fh.write("# the operator was here\n")
    u = host.uninstall()
    assert u.returncode == EXIT_OK and "changed since install" in u.stdout, u.stdout + u.stderr
    text = (host.postfix / "master.cf").read_text()
    assert "# the operator was here" in text
    m = subprocess.run(["postconf", "-c", str(host.postfix), "-M", "submission/inet"], capture_output=True, text=True)
    assert m.stdout.strip() == "", m.stdout


def test_a_failed_step_is_recorded_and_uninstall_undoes_it(site_host: Host) -> None:
    host = site_host
    conf = host.dovecot / "dovecot.conf"
    conf.write_text(conf.read_text() + "no_such_dovecot_setting = 1\n")  # the host's own mistake
    original = host.tree()
    r = host.install(host.bundle(), "--no-tick")
    assert r.returncode == EXIT_ERROR, r.stdout + r.stderr
    assert "dovecot rejects its configuration after install" in r.stderr and "no_such_dovecot_setting" in r.stderr
    u = host.uninstall()
    assert u.returncode == EXIT_OK, u.stdout + u.stderr
    assert host.tree(skip=[host.w / "var"]) == {k: v for k, v in original.items() if not k.startswith("var")}


def test_install_refuses_a_dovecot_without_pigeonhole(host: Host, pipull: Any) -> None:
    """The bundle's LMTP loads the sieve plugin (filters, vacation replies): without Pigeonhole
    Dovecot would deliver nothing, so install stops first and names the package."""
    from pipull.install import Bundle, Installer, InstallError, Options

    dirs = {"etc_dir": str(host.etc), "lib_dir": str(host.lib), "systemd_dir": str(host.systemd),
            "postfix_dir": str(host.postfix), "dovecot_dir": str(host.dovecot), "rspamd_dir": str(host.rspamd)}  # fmt: skip
    bundle = Bundle.load(str(host.bundle()))
    Installer(bundle, Options(dirs=dirs)).check_services_installed()  # sievec is there
    with pytest.raises(InstallError, match="apt-get install dovecot-sieve"):
        Installer(bundle, Options(dirs=dirs, sievec="/nonexistent/sievec")).check_services_installed()
    # port 25's milter: without rspamd every message would tempfail
    with pytest.raises(InstallError, match="apt-get install rspamd"):
        Installer(bundle, Options(dirs=dirs, rspamadm="/nonexistent/rspamadm")).check_services_installed()


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("postscreen_dnsbl_sites = zen.spamhaus.org*999", "is not domain[=filter][*weight]"),
        ("postscreen_dnsbl_sites = $myhostname.example", "is not domain[=filter][*weight]"),
        ("postscreen_dnsbl_sites = " + ", ".join(f"l{i}.example" for i in range(21)), "at most 20"),
        ("postscreen_dnsbl_threshold = 0", "from 1 to 1000"),
    ],
)
def test_install_refuses_a_bundle_with_hostile_dnsbl_lines(host: Host, line: str, why: str) -> None:
    """A hand-edited bundle (bundle.json's digests made to match) with a DNSBL line the server would
    never write: install refuses it before it changes anything (pipull/postscreen.py)."""
    bundle = host.bundle()
    main = bundle / "postfix" / "main.cf.mailstate"
    key = line.partition(" = ")[0]
    lines = [line if text.startswith(key + " = ") else text for text in main.read_text().splitlines()]
    assert line in lines
    main.write_text("\n".join(lines) + "\n")
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["sha256"]["postfix/main.cf.mailstate"] = hashlib.sha256(main.read_bytes()).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    before = host.tree()
    r = host.install(bundle, "--no-tick")
    assert r.returncode == EXIT_ERROR, r.stdout + r.stderr
    assert "postfix/main.cf.mailstate is refused" in r.stderr and why in r.stderr, r.stderr
    assert host.tree() == before
