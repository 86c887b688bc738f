"""Real git hosts for tests: OpenSSH's sshd with a ``git-shell`` user, and nginx + fcgiwrap +
``git http-backend``, both on loopback, both serving the same bare repos.

Import what you need::

    from tests.helpers.githost import GitHost, githost, ssh_githost, running_githost

* ``githost`` (fixture) starts both front ends over one repos folder; ``ssh_githost`` only sshd.
  ``host.create_repo("state.git")`` makes an empty bare repo (branch ``main``) owned by the git
  user; ``host.ssh_url(name)`` / ``host.http_url(name)`` are the URLs clients use, and
  ``host.ssh_env`` (``GIT_SSH_COMMAND``) is what a client (``mailstate serve --upstream``, a
  pi-pull tick, an admin's ``git push``) needs in its environment to reach the sshd host.
* **sshd**: ``/usr/sbin/sshd -D -e -f <own sshd_config>`` on a free loopback port, its own
  ed25519 host key, ``UsePAM no`` (no PAM session, no lastlog, no motd), ``StrictModes no``, a
  per-instance ``AuthorizedKeysFile`` in the work dir with one ``restrict`` key made for the
  test, only pubkey auth, only the git user (``AllowUsers``). The git user (``mailstate-git``,
  created with ``useradd --system`` if absent) has ``git-shell`` as login shell, so a key that
  reaches it can run git's pack commands and nothing else; its password field is ``*`` (no
  password, but not *locked*: with ``UsePAM no`` sshd refuses every login of a locked account,
  keys included). The client side is strict: ``ssh -F /dev/null -o BatchMode=yes -o
  IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=<the host key only>``.
  OpenSSH reads ``~/.ssh`` from the passwd home, not ``$HOME``, so without that command a client
  running as root would use /root/.ssh; with it nothing outside the work dir is read.
* **nginx + fcgiwrap**: ``nginx -p <prefix> -c <own nginx.conf> -e <log>`` (``daemon off``, the
  master as root, the worker as the git user) on a free loopback port; ``fcgiwrap -s
  unix:<sock>`` as the git user runs ``git http-backend`` (``GIT_PROJECT_ROOT`` = the repos
  folder, ``GIT_HTTP_EXPORT_ALL``). ``/git/<repo>`` is read-only for anyone
  (``http.receivepack=false`` passed to http-backend as command-line config); ``/push/<repo>``
  takes smart pushes with HTTP basic auth (``host.http_push_url`` carries the credentials).
* The repos live under the git user's home (``/var/lib/mailstate-git/<instance>/``), owned by
  that user, so pushes over ssh and http write files it owns. Tests look at them with
  ``host.git(repo, ...)``, which runs git *as the git user*: git run as root in a repo owned by
  someone else refuses ("dubious ownership"), and objects root wrote there would be unwritable
  for the git user's next push.
* When a binary is missing (sshd, git-shell, nginx, fcgiwrap, git-http-backend) the fixtures
  fail under ``CI=true`` and skip otherwise; they need root (the same as tests/helpers/mailnode.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.mailnode import free_ports, make_public_tmpdir, wait_port

GIT_USER = "mailstate-git"
GIT_HOME = Path("/var/lib/mailstate-git")
SSHD = Path("/usr/sbin/sshd")
NGINX = Path("/usr/sbin/nginx")
FCGIWRAP = Path("/usr/sbin/fcgiwrap")
APT_HINT = "apt-get install openssh-server nginx fcgiwrap"
PUSH_USER = "pusher"


# --------------------------------------------------------------------------- environment


def _unavailable(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def git_exec_path() -> Path:
    return Path(subprocess.run(["git", "--exec-path"], check=True, capture_output=True, text=True).stdout.strip())


def git_shell() -> Path | None:
    found = shutil.which("git-shell")
    if found:
        return Path(found)
    candidate = git_exec_path() / "git-shell"
    return candidate if candidate.exists() else None


def require_githost(*, http: bool) -> None:
    """Fail (CI=true) or skip when sshd/git-shell (and nginx/fcgiwrap/git-http-backend) are missing."""
    missing = [str(p) for p in (SSHD, *((NGINX, FCGIWRAP) if http else ())) if not p.exists()]
    if git_shell() is None:
        missing.append("git-shell")
    if http and not (git_exec_path() / "git-http-backend").exists():
        missing.append("git-http-backend")
    if missing:
        _unavailable(f"missing programs: {', '.join(missing)} ({APT_HINT})")
    if os.geteuid() != 0:
        _unavailable("the git hosts need root (sshd and nginx run as root from temp configs, as a dedicated git user)")


def ensure_git_user() -> pwd.struct_passwd:
    """The `mailstate-git` system user (login shell git-shell, home GIT_HOME), created if absent."""
    shell = git_shell()
    assert shell is not None
    try:
        pw = pwd.getpwnam(GIT_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--create-home",
                "--home-dir",
                str(GIT_HOME),
                "--shell",
                str(shell),
                GIT_USER,
            ],
            capture_output=True,
        )  # another test process may win the race: look it up again either way
        pw = pwd.getpwnam(GIT_USER)
    if pw.pw_shell != str(shell):
        subprocess.run(["usermod", "--shell", str(shell), GIT_USER], check=True, capture_output=True)
    # Locked ("!...") accounts cannot log in at all under UsePAM no, not even with a key.
    if _shadow_field(GIT_USER).startswith("!"):
        subprocess.run(["usermod", "--password", "*", GIT_USER], check=True, capture_output=True)
    home = Path(pw.pw_dir)
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    home.chmod(0o755)
    return pwd.getpwnam(GIT_USER)


def _shadow_field(user: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == user and len(parts) > 1:
                return parts[1]
    return ""


# --------------------------------------------------------------------------- the host


@dataclass
class GitHost:
    """Bare repos under the git user's home, served by sshd (git-shell) and/or nginx + http-backend."""

    workdir: Path  # configs, keys, logs (0755, root)
    repos: Path  # GIT_HOME/<instance>, owned by the git user
    uid: int
    gid: int
    ssh_port: int = 0
    http_port: int = 0
    push_password: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ---- URLs and client settings

    def ssh_url(self, name: str = "state.git") -> str:
        return f"ssh://{GIT_USER}@127.0.0.1:{self.ssh_port}{self.repos / name}"

    def http_url(self, name: str = "state.git") -> str:
        """Read-only smart HTTP (anonymous)."""
        return f"http://127.0.0.1:{self.http_port}/git/{name}"

    def http_push_url(self, name: str = "state.git") -> str:
        """Smart HTTP that takes pushes; basic-auth credentials in the URL."""
        return f"http://{PUSH_USER}:{self.push_password}@127.0.0.1:{self.http_port}/push/{name}"

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def ssh_command(self) -> str:
        """The ssh command a client uses (GIT_SSH_COMMAND / core.sshCommand): this key, this host key, no prompts."""
        opts = [
            "ssh", "-F", "/dev/null", "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
        ]  # fmt: skip
        return shlex.join(opts)

    @property
    def ssh_env(self) -> dict[str, str]:
        return {"GIT_SSH_COMMAND": self.ssh_command}

    # ---- repos

    def _as_git_user(
        self, argv: list[str], *, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(GIT_HOME), "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
        proc = subprocess.run(
            argv,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env=env,
            capture_output=True,
            text=True,
            input=input,
            cwd="/",
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} (as {GIT_USER}) failed: {proc.stderr}")
        return proc

    def create_repo(self, name: str = "state.git") -> Path:
        """An empty bare repo (default branch main) owned by the git user."""
        path = self.repos / name
        self._as_git_user(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(path)])
        return path

    def git(self, repo: str | Path, *args: str, check: bool = True) -> str:
        """git's stdout in a hosted repo, run as the git user."""
        path = repo if isinstance(repo, Path) else self.repos / repo
        return self._as_git_user(["git", "-C", str(path), *args], check=check).stdout.strip()

    def rev(self, repo: str | Path, ref: str) -> str | None:
        out = self.git(repo, "rev-parse", "--verify", "--quiet", ref, check=False)
        return out or None

    def freeze_refs(self, repo: str | Path, *refs: str) -> None:
        """Make the host refuse every update of `refs` (an update hook), as a host whose
        mirror lags, or that an attacker holds, would keep serving their old values."""
        path = repo if isinstance(repo, Path) else self.repos / repo
        # An `update` hook judges each ref on its own: an --atomic push that carries a frozen
        # ref fails as a whole ("atomic push failure" for the others), a push without one passes.
        hook = path / "hooks" / "update"
        cases = "|".join(shlex.quote(r) for r in refs)
        hook.write_text(
            f'#!/bin/sh\n# tests/helpers/githost.py: frozen refs\ncase "$1" in {cases}) echo "frozen: $1" >&2; exit 1;; esac\nexit 0\n'
        )
        hook.chmod(0o755)
        os.chown(hook, self.uid, self.gid)

    def thaw(self, repo: str | Path) -> None:
        path = repo if isinstance(repo, Path) else self.repos / repo
        (path / "hooks" / "update").unlink(missing_ok=True)

    # ---- sshd

    def start_ssh(self) -> None:
        w = self.workdir
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "githost-host", "-f", str(w / "host_key")], check=True
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "githost-client", "-f", str(self.client_key)],
            check=True,
        )
        # `restrict`: no pty, no forwarding, no agent, no X11; git-shell (the login shell) runs the command.
        (w / "authorized_keys").write_text("restrict " + (w / "client_key.pub").read_text())
        (w / "authorized_keys").chmod(0o644)
        host_pub = (w / "host_key.pub").read_text().split()
        (self.ssh_port,) = free_ports(1)
        self.known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {host_pub[0]} {host_pub[1]}\n")
        (w / "sshd_config").write_text(
            f"""# tests/helpers/githost.py: one git-shell user on loopback, keys only
Port {self.ssh_port}
ListenAddress 127.0.0.1
AddressFamily inet
HostKey {w / "host_key"}
PidFile {w / "sshd.pid"}
AuthorizedKeysFile {w / "authorized_keys"}
AllowUsers {GIT_USER}
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitTTY no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 100:30:200
MaxSessions 50
LoginGraceTime 30
LogLevel VERBOSE
"""
        )
        # sshd's privilege separation chroot; Debian's packaging normally creates it at boot.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run([str(SSHD), "-t", "-f", str(w / "sshd_config")], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t: {check.stderr}")
        log = (w / "sshd.log").open("ab")
        self.procs["sshd"] = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(w / "sshd_config")], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        wait_port(self.ssh_port)

    # ---- nginx + fcgiwrap + git http-backend

    def start_http(self) -> None:
        w = self.workdir
        # The socket's folder belongs to the git user: fcgiwrap (running as that user) creates it.
        (w / "fcgi").mkdir(mode=0o755)
        os.chown(w / "fcgi", self.uid, self.gid)
        sock = w / "fcgi" / "fcgiwrap.sock"
        self.push_password = uuid.uuid4().hex
        (w / "htpasswd").write_text(f"{PUSH_USER}:{{PLAIN}}{self.push_password}\n")
        (w / "htpasswd").chmod(0o644)
        log = (w / "fcgiwrap.log").open("ab")
        # fcgiwrap runs git http-backend as the git user (it owns the repos); nginx's worker
        # (also the git user) talks to its socket.
        self.procs["fcgiwrap"] = subprocess.Popen(
            [str(FCGIWRAP), "-c", "4", "-s", f"unix:{sock}"],
            user=self.uid, group=self.gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(GIT_HOME)}, cwd="/",
            # Its own process group: `-c 4` forks workers that outlive a SIGTERM to the parent.
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.procs["fcgiwrap"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fcgiwrap did not start: {(w / 'fcgiwrap.log').read_text(errors='replace')}")
            time.sleep(0.02)
        (self.http_port,) = free_ports(1)
        backend = git_exec_path() / "git-http-backend"
        common = f"""
            include /etc/nginx/fastcgi_params;
            fastcgi_pass unix:{sock};
            fastcgi_param SCRIPT_FILENAME {backend};
            fastcgi_param GIT_PROJECT_ROOT {self.repos};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_CONFIG_NOSYSTEM 1;
            fastcgi_param PATH_INFO $1;
            fastcgi_param GIT_CONFIG_COUNT 1;
            fastcgi_param GIT_CONFIG_KEY_0 http.receivepack;"""
        (w / "nginx").mkdir()
        (w / "nginx.conf").write_text(
            f"""# tests/helpers/githost.py: git http-backend behind nginx, on loopback
daemon off;
master_process on;
worker_processes 1;
user {GIT_USER} {GIT_USER};
pid {w / "nginx.pid"};
error_log {w / "nginx-error.log"} info;
events {{ worker_connections 128; }}
http {{
    access_log {w / "nginx-access.log"};
    client_body_temp_path {w / "nginx" / "body"};
    fastcgi_temp_path {w / "nginx" / "fastcgi"};
    proxy_temp_path {w / "nginx" / "proxy"};
    uwsgi_temp_path {w / "nginx" / "uwsgi"};
    scgi_temp_path {w / "nginx" / "scgi"};
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{self.http_port};
        server_name githost.test;
        location ~ ^/git(/.*)$ {{{common}
            fastcgi_param GIT_CONFIG_VALUE_0 false;
        }}
        location ~ ^/push(/.*)$ {{
            auth_basic "git push";
            auth_basic_user_file {w / "htpasswd"};{common}
            fastcgi_param GIT_CONFIG_VALUE_0 true;
            fastcgi_param REMOTE_USER $remote_user;
        }}
    }}
}}
"""
        )
        args = [str(NGINX), "-p", f"{w}/nginx/", "-c", str(w / "nginx.conf"), "-e", str(w / "nginx-error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t: {check.stderr}")
        log = (w / "nginx.out").open("ab")
        self.procs["nginx"] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_port(self.http_port)

    # ---- lifecycle

    def stop_front(self, name: str) -> None:
        """Stop one front end ("sshd", "nginx", "fcgiwrap"): the host goes unreachable over it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if name == "fcgiwrap":
            # The whole group (the parent and its forked workers), even if the parent is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown; sshd: the listener only
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if name == "fcgiwrap" else proc.kill()
            proc.wait()

    def stop(self) -> None:
        for name in ("nginx", "fcgiwrap", "sshd"):
            self.stop_front(name)

    def logs(self) -> str:
        parts = []
        for name in ("sshd.log", "nginx-error.log", "fcgiwrap.log"):
            p = self.workdir / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@contextlib.contextmanager
def running_githost(*, ssh: bool = True, http: bool = True) -> Iterator[GitHost]:
    """Start the git host's front ends over a fresh repos folder; stop and clean up afterwards."""
    require_githost(http=http)
    pw = ensure_git_user()
    workdir = make_public_tmpdir("githost-")
    repos = Path(pw.pw_dir) / workdir.name
    repos.mkdir(mode=0o755)
    os.chown(repos, pw.pw_uid, pw.pw_gid)
    host = GitHost(workdir=workdir, repos=repos, uid=pw.pw_uid, gid=pw.pw_gid)
    try:
        if ssh:
            host.start_ssh()
        if http:
            host.start_http()
        yield host
    finally:
        host.stop()
        shutil.rmtree(repos, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def githost() -> Iterator[GitHost]:
    """sshd (git-shell) and nginx + git http-backend over the same repos (see module docstring)."""
    with running_githost(ssh=True, http=True) as host:
        yield host


@pytest.fixture
def ssh_githost() -> Iterator[GitHost]:
    """Only the sshd front end (git-shell user)."""
    with running_githost(ssh=True, http=False) as host:
        yield host
