"""Upstream mode and nodes that follow a git host, against REAL git hosts (tests/helpers/githost.py):
OpenSSH's sshd on loopback with a `git-shell` user (ssh:// URLs, a key and a known_hosts made
for the test, passed as GIT_SSH_COMMAND), and nginx + fcgiwrap + `git http-backend` serving
the same bare repo read-only over http://.

* the hosts themselves: git over ssh works and nothing else does; a wrong key or an unknown
  host key fails fast and clearly; http is read-only unless authenticated;
* the library's upstream mode pushes every write (and its accepted-head statement) over ssh;
* two `mailstate serve` processes share one upstream on the sshd host (concurrent writes,
  admin commits pushed over ssh served or refused, the host going away: 503);
* real pi-pull ticks on a real Postfix/Dovecot node fetch from the host over ssh:// and over
  http:// and apply only the stated (accepted) head: a commit the server refused, pushed to
  the host by a trusted admin key, never goes live.

* staleness through a host: a host that keeps serving an old statement (its statement ref
  frozen by a hook while main moves on, or the servers stopped) makes the node's tick exit 5
  and report `stale` while it keeps serving; recovery gives ok (TRUST's `[freshness]
  max_staleness` in pi-pull);
* follow mode through the host: `--follow` polls the host's statement ref with ls-remote, or is
  woken by the server's /v1/nodes/wait (`[remote] wake_url`) while still fetching from the host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from mailstate.state.datadir import DataDir, open_store
from mailstate.state.errors import UpstreamUnavailable
from mailstate.state.signing import allowed_signers_line, generate_key
from mailstate.state.statement import REF as STATEMENT_REF
from tests.helpers.admin import BAD_LINE, add_mailbox_edit, admin_push, plain_password_line, trust_admin
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, FakeClock, git_out
from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.githost import GitHost
from tests.helpers.mailnode import MailNode, pi_pull_script, run_pi_pull
from tests.helpers.pipull import tick_in_process
from tests.helpers.server import LiveServer, assert_error

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
EXIT_OK, EXIT_STALE = 0, 5
MAX_STALENESS = 4  # seconds; the servers here re-sign every 0.5 s


def client_env(host: GitHost) -> dict[str, str]:
    """This process's environment plus the host's ssh command (what an admin's git needs)."""
    return {**os.environ, **host.ssh_env}


def run_git(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, env=env, check=check, timeout=60)


def stated_head(host: GitHost, repo: str = "state.git") -> str | None:
    """The commit the host's refs/mailstate/accepted names (Accepted-Head:), or None."""
    if host.rev(repo, STATEMENT_REF) is None:
        return None
    body = host.git(repo, "cat-file", "tag", STATEMENT_REF)
    return next((line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("Accepted-Head: ")), None)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met after {timeout}s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the hosts


def test_the_hosts_serve_git_and_nothing_else(githost: GitHost, tmp_path: Path) -> None:
    host = githost
    host.create_repo()
    work = tmp_path / "work"
    run_git("init", "-q", "-b", "main", str(work))
    run_git(
        "-C",
        str(work),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "one",
    )
    sha = git_out(work, "rev-parse", "HEAD").strip()

    # ssh: push and fetch as the git-shell user.
    run_git("-C", str(work), "push", "-q", host.ssh_url(), "main", env=client_env(host))
    assert host.rev("state.git", "main") == sha
    assert sha in run_git("ls-remote", host.ssh_url(), env=client_env(host)).stdout
    # git-shell runs git's pack commands only.
    ssh = [*host.ssh_command.split(), "-p", str(host.ssh_port), "mailstate-git@127.0.0.1"]
    shell = subprocess.run([*ssh, "cat /etc/passwd"], capture_output=True, text=True, timeout=30)
    assert shell.returncode != 0 and "unrecognized command" in shell.stderr
    # A key the host does not know, or a host key the client does not know: refused at once, no prompt.
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    wrong_key = {**os.environ, "GIT_SSH_COMMAND": host.ssh_command.replace(str(host.client_key), str(stranger))}
    r = run_git("ls-remote", host.ssh_url(), env=wrong_key, check=False)
    assert r.returncode != 0 and "Permission denied (publickey)" in r.stderr
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    unknown_host = {**os.environ, "GIT_SSH_COMMAND": host.ssh_command.replace(str(host.known_hosts), str(empty))}
    r = run_git("ls-remote", host.ssh_url(), env=unknown_host, check=False)
    assert r.returncode != 0 and "Host key verification failed" in r.stderr

    # http: the same repo, read-only for anyone; pushes need the basic-auth location.
    clone = tmp_path / "clone"
    run_git("clone", "-q", host.http_url(), str(clone))
    assert git_out(clone, "rev-parse", "HEAD").strip() == sha
    run_git(
        "-C",
        str(work),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "two",
    )
    r = run_git("-C", str(work), "push", host.http_url(), "main", check=False)
    assert r.returncode != 0 and "403" in r.stderr
    assert host.rev("state.git", "main") == sha
    run_git("-C", str(work), "push", "-q", host.http_push_url(), "main")
    assert host.rev("state.git", "main") == git_out(work, "rev-parse", "HEAD").strip()


# --------------------------------------------------------------------------- upstream mode, library


def test_store_writes_go_to_the_ssh_host_with_their_statement(
    ssh_githost: GitHost,
    data_dir: DataDir,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    host = ssh_githost
    host.create_repo()
    # Upstream's git reads ssh settings from git's own environment (GIT_SSH_COMMAND passes through).
    monkeypatch.setenv("GIT_SSH_COMMAND", host.ssh_command)
    store = open_store(data_dir.root, upstream=host.ssh_url(), clock=FakeClock(datetime(2026, 2, 1, tzinfo=UTC)))
    assert host.rev("state.git", "main") == store.head  # the empty host received the history
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    result = store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    head = git_out(data_dir.repo, "rev-parse", "main").strip()
    assert host.rev("state.git", "main") == head == result.result["commit"]
    assert stated_head(host) == head  # the statement went up in the same push
    tag = host.rev("state.git", STATEMENT_REF) or ""
    verify = subprocess.run(
        [
            "git",
            "-C",
            str(data_dir.repo),
            "-c",
            f"gpg.ssh.allowedSignersFile={data_dir.allowed_signers}",
            "verify-tag",
            tag,
        ],
        capture_output=True,
        text=True,
    )  # the tag object is in the local repo too: it was made there
    assert verify.returncode == 0, verify.stderr

    # The host's key changes (or a man in the middle answers): the write fails fast and clearly,
    # nothing moves locally or upstream, and no prompt waits for an answer.
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    saved = host.known_hosts.read_text()
    host.known_hosts.write_text(
        f"[127.0.0.1]:{host.ssh_port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n"
    )
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as err:
        store.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": PASSWORD})
    assert time.monotonic() - started < 20
    assert err.value.code == "upstream_unavailable"
    assert git_out(data_dir.repo, "rev-parse", "main").strip() == head
    assert host.rev("state.git", "main") == head
    host.known_hosts.write_text(saved)
    later = store.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": PASSWORD})
    assert later.result["commit"] == host.rev("state.git", "main")

    # The other seam: core.sshCommand in the data dir's state.git/config (git reads the local
    # repo's config for the push), with nothing in the environment.
    monkeypatch.delenv("GIT_SSH_COMMAND")
    git_out(data_dir.repo, "config", "core.sshCommand", host.ssh_command)
    again = store.execute("add-user", PROJECT_A, {"email": "again@example.com", "password": PASSWORD})
    assert again.result["commit"] == host.rev("state.git", "main") and stated_head(host) == again.result["commit"]


# --------------------------------------------------------------------------- two servers, one ssh host


@dataclass
class Pair:
    a: LiveServer
    b: LiveServer
    host: GitHost
    admin_key: Path
    tmp: Path


@pytest.fixture
def pair(ssh_githost: GitHost, tmp_path: Path) -> Iterator[Pair]:
    """Servers A and B on one upstream on the sshd host (ssh://), trusting each other and an admin key."""
    host = ssh_githost
    host.create_repo()
    servers = [LiveServer(tmp_path / name) for name in ("a", "b")]
    for s in servers:
        s.cli("init", "--data", str(s.data.root), "--bcrypt-cost", "4")
    admin_key = tmp_path / "admin_key"
    trusted = "".join(s.data.allowed_signers.read_text() for s in servers)
    trusted += allowed_signers_line(generate_key(admin_key, "admin@example.org"), "admin@example.org")
    for s in servers:
        s.data.allowed_signers.write_text(trusted)
        s.admin_token = s.create_token(name="admin")
        s.env["MAILSTATE_SYNC_INTERVAL"] = "0.3"
        s.env.update(host.ssh_env)
        s.extra_args = ["--upstream", host.ssh_url()]
    try:
        for s in servers:
            s.start()
        yield Pair(servers[0], servers[1], host, admin_key, tmp_path)
    finally:
        for s in servers:
            s.stop()


WRITES = 60


def test_two_servers_through_sshd_lose_nothing(pair: Pair) -> None:
    a, b, host = pair.a, pair.b, pair.host
    assert a.git("rev-parse", "main").strip() == b.git("rev-parse", "main").strip() == host.rev("state.git", "main")
    with a.client(a.admin_token) as c:
        assert c.post(f"{API}/add-domain", json={"domain": "shared.example", "project_id": 5}).status_code == 201
    wait_for(lambda: b.git("rev-parse", "main") == a.git("rev-parse", "main"), what="B adopts A's write")
    before = int(host.git("state.git", "rev-list", "--count", "main"))
    tokens = {"a": a.create_token(project=5, name="proj-a"), "b": b.create_token(project=5, name="proj-b")}

    def write(i: int) -> int:
        server, name = (a, "a") if i % 2 == 0 else (b, "b")
        with server.client(tokens[name]) as c:
            return c.post(f"{API}/add-user", json={"email": f"u{i}@shared.example", "password": PASSWORD}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(write, range(WRITES)))
    assert codes == [201] * WRITES
    assert int(host.git("state.git", "rev-list", "--count", "main")) == before + WRITES
    subjects = host.git("state.git", "log", "--format=%s", f"-{WRITES}", "main").splitlines()
    assert sorted(subjects) == sorted(f"add-user u{i}@shared.example" for i in range(WRITES))
    tip = host.rev("state.git", "main")
    for server in (a, b):
        wait_for(lambda s=server: s.git("rev-parse", "main").strip() == tip, what="both servers at the host's tip")  # type: ignore[misc]
        with server.client(server.admin_token) as c:
            users = {
                u["email"] for u in c.get(f"{API}/list-users", params={"domain": "shared.example"}).json()["users"]
            }
        assert users == {f"u{i}@shared.example" for i in range(WRITES)}
    # The statement on the host names the tip, signed by a fleet key.
    wait_for(lambda: stated_head(host) == tip, what="the host's statement names the tip")
    # The tag may have been made by B and not be in A's repo yet (A fetches statements on its own
    # schedule), so verify the host's exact tag object in a scratch repo with the fleet's trust.
    stated = host.rev("state.git", STATEMENT_REF) or ""
    tag_object = host.git("state.git", "cat-file", "tag", stated) + "\n"  # host.git strips the last newline
    scratch = pair.tmp / "verify.git"
    subprocess.run(["git", "init", "-q", "--bare", str(scratch)], check=True)
    tag = subprocess.run(
        ["git", "-C", str(scratch), "hash-object", "-t", "tag", "-w", "--stdin", "--literally"],
        input=tag_object,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert tag == stated
    verify = subprocess.run(
        ["git", "-C", str(scratch), "-c", f"gpg.ssh.allowedSignersFile={a.data.allowed_signers}", "verify-tag", tag],
        capture_output=True,
        text=True,
        env=a.env,
    )
    assert verify.returncode == 0, verify.stderr


def test_admin_commits_over_ssh_are_served_or_refused(pair: Pair) -> None:
    a, host = pair.a, pair.host
    env = client_env(host)
    with a.client(a.admin_token) as c:
        assert c.post(f"{API}/add-domain", json={"domain": "admin.example", "project_id": 9}).status_code == 201

    def listed() -> set[str]:
        with a.client(a.admin_token) as c:
            return {u["email"] for u in c.get(f"{API}/list-users", params={"domain": "admin.example"}).json()["users"]}

    # Signed by a trusted admin key, pushed to the host over ssh: adopted, served and stated.
    good = admin_push(host.ssh_url(), pair.tmp, pair.admin_key, add_mailbox_edit("fromadmin"), env=env)
    wait_for(lambda: "fromadmin@admin.example" in listed(), what="the admin's commit is served")
    assert a.git("rev-parse", "main").strip() == good
    wait_for(lambda: stated_head(host) == good, what="the statement names the admin's commit")

    # Unsigned: refused loudly; the statement stays on the last accepted commit.
    work = pair.tmp / "unsigned"
    run_git("clone", "-q", host.ssh_url(), str(work), env=env)
    add_mailbox_edit("sneaky")(work)
    run_git("-C", str(work), "add", "-A")
    run_git("-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", "commit", "-qm", "unsigned")
    run_git("-C", str(work), "push", "-q", "origin", "main", env=env)
    bad = git_out(work, "rev-parse", "HEAD").strip()

    def health() -> dict[str, object]:
        return httpx.get(f"{a.url}/v1/health", headers={"Authorization": f"Bearer {a.admin_token}"}, timeout=5).json()  # type: ignore[no-any-return]

    wait_for(lambda: health().get("status") == "degraded", what="the refused commit shows in health")
    refused = health()["refused_commit"]
    assert isinstance(refused, dict) and refused["commit"] == bad
    assert "sneaky@admin.example" not in listed()
    assert stated_head(host) == good

    # The next API write puts a valid state back over it on the host (a lease on exactly `bad`).
    with a.client(a.admin_token) as c:
        r = c.post(f"{API}/add-user", json={"email": "later@admin.example", "password": PASSWORD})
    assert r.status_code == 201, r.text
    assert host.rev("state.git", "main") == r.json()["commit"]
    assert host.rev("state.git", "main^") == good
    assert stated_head(host) == r.json()["commit"]
    assert health()["status"] == "ok"


def test_a_host_that_goes_away_answers_503(pair: Pair) -> None:
    a, host = pair.a, pair.host
    head = a.git("rev-parse", "main").strip()
    host.stop_front("sshd")
    with a.client(a.admin_token) as c:
        r = c.post(f"{API}/add-domain", json={"domain": "later.example"})
    assert_error(r, 503, "upstream_unavailable")
    assert a.git("rev-parse", "main").strip() == head  # no local divergence
    assert host.rev("state.git", "main") == head


# --------------------------------------------------------------------------- nodes that follow the host


@dataclass
class HostedFleet:
    server: LiveServer
    admin: httpx.Client
    project: httpx.Client
    node: MailNode
    host: GitHost
    cfg: Path
    tmp: Path

    def call(self, client: httpx.Client, op: str, body: dict[str, object], status: int = 200) -> dict[str, object]:
        r = client.post(f"{API}/{op}", json=body)
        assert r.status_code == status, r.text
        return r.json()  # type: ignore[no-any-return]

    def follow(self, transport: str) -> None:
        """Point the node at the host over `transport` ("ssh" or "http") instead of the server."""
        self.follow_url(self.host.ssh_url() if transport == "ssh" else self.host.http_url())

    def follow_url(self, url: str) -> None:
        """Rewrite the ini's [remote] url (the first `url = ` line)."""
        lines = [line for line in self.cfg.read_text().splitlines() if not line.startswith("send_credentials")]
        i = next(n for n, line in enumerate(lines) if line.startswith("url = "))
        lines[i] = f"url = {url}"
        if url.startswith("http"):
            # A node's sync key is for the server: never send it to a git host.
            lines.insert(i + 1, "send_credentials = no")
        self.cfg.write_text("\n".join(lines) + "\n")

    def tick(self) -> subprocess.CompletedProcess[str]:
        return run_pi_pull(self.cfg)

    def applied(self) -> str | None:
        path = self.node.root / "state.json"
        if not path.exists():  # no tick has finished yet
            return None
        return json.loads(path.read_text()).get("applied_commit")  # type: ignore[no-any-return]

    def head(self) -> str:
        return self.server.git("rev-parse", "main").strip()


@pytest.fixture
def hosted(
    githost: GitHost, mailnode: MailNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HostedFleet]:
    """A server in upstream mode on the sshd host, and a real node provisioned against it."""
    githost.create_repo()
    # The node's git reads the same ssh settings (pi-pull keeps GIT_SSH_COMMAND from its environment).
    monkeypatch.setenv("GIT_SSH_COMMAND", githost.ssh_command)
    server, admin, project = start_server_for(
        mailnode,
        tmp_path / "server",
        extra_args=["--upstream", githost.ssh_url()],
        env={**githost.ssh_env, "MAILSTATE_SYNC_INTERVAL": "0.3"},
    )
    try:
        cfg = provision_node(mailnode, server, admin, tmp_path / "etc")
        yield HostedFleet(server, admin, project, mailnode, githost, cfg, tmp_path)
    finally:
        admin.close()
        project.close()
        server.stop()


@pytest.mark.parametrize("transport", ["ssh", "http"])
def test_a_node_following_the_host_applies_only_accepted_commits(hosted: HostedFleet, transport: str) -> None:
    f, node, host = hosted, hosted.node, hosted.host
    f.follow(transport)
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    f.call(f.project, "add-user", {"email": "info@example.com", "password": PASSWORD}, status=201)
    accepted = f.head()
    assert host.rev("state.git", "main") == accepted and stated_head(host) == accepted

    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == accepted
    assert node.can_login("info@example.com", PASSWORD)
    # It reported to the server (the report URL is the server's, the state came from the host).
    rows = f.admin.get(f"{API}/list-nodes").json()["nodes"]
    row = next(x for x in rows if x["name"] == "mpi01")
    assert row["status"] == "ok" and row["applied_commit"] == accepted

    # A commit signed by a TRUSTED admin key but with a hand-edited rendered passwd line
    # (`nopassword=y`: any password logs in) is pushed to the host over ssh. The server
    # refuses it; the host's main holds it, but its statement does not name it.
    key = trust_admin(f.server.data.allowed_signers, f.tmp)
    node_signers = Path(f.cfg.parent / "allowed_signers")
    node_signers.write_text(f.server.data.allowed_signers.read_text())  # the node trusts that key too
    bad = admin_push(host.ssh_url(), f.tmp, key, plain_password_line, env=client_env(host))
    assert host.rev("state.git", "main") == bad
    health = f"{f.server.url}/v1/health"
    wait_for(lambda: httpx.get(health, timeout=5).json()["status"] == "degraded", what="the server refuses the commit")
    assert stated_head(host) == accepted

    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == accepted  # nothing newer was stated
    address = BAD_LINE.split(":", 1)[0]
    assert not node.can_login(address, "anything at all")
    passwd = node.passwd_file("example.com")
    assert "info@example.com:" in passwd.read_text() and "nopassword" not in passwd.read_text()

    # The next API write replaces the refused commit on the host; the node follows it.
    f.call(f.project, "add-user", {"email": "sales@example.com", "password": PASSWORD}, status=201)
    fixed = f.head()
    assert host.rev("state.git", "main") == fixed and stated_head(host) == fixed
    assert host.rev("state.git", "main^") == accepted
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == fixed
    assert node.can_login("sales@example.com", PASSWORD)
    assert not node.can_login(address, "anything at all")


# --------------------------------------------------------------------------- staleness through the host


@pytest.fixture
def fresh_hosted(
    githost: GitHost, mailnode: MailNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HostedFleet]:
    """`hosted`, with the statement re-signed every 0.5 s and the node's max_staleness at 4 s."""
    githost.create_repo()
    monkeypatch.setenv("GIT_SSH_COMMAND", githost.ssh_command)
    env = {**githost.ssh_env, "MAILSTATE_SYNC_INTERVAL": "0.3", "MAILSTATE_STATEMENT_INTERVAL": "0.5"}
    server, admin, project = start_server_for(
        mailnode, tmp_path / "server", extra_args=["--upstream", githost.ssh_url()], env=env
    )
    try:
        cfg = provision_node(mailnode, server, admin, tmp_path / "etc")
        cfg.write_text(cfg.read_text() + f"[freshness]\nmax_staleness = {MAX_STALENESS}\n")
        yield HostedFleet(server, admin, project, mailnode, githost, cfg, tmp_path)
    finally:
        admin.close()
        project.close()
        server.stop()


def statement_issued_at(host: GitHost) -> int:
    """Issued-At of the statement the host serves."""
    body = host.git("state.git", "cat-file", "tag", STATEMENT_REF)
    return next(int(line.split(": ", 1)[1]) for line in body.splitlines() if line.startswith("Issued-At: "))


def statement_age(host: GitHost) -> float:
    return time.time() - statement_issued_at(host)


def test_a_host_serving_an_old_statement_makes_the_node_stale_until_it_recovers(
    fresh_hosted: HostedFleet, pipull: ModuleType
) -> None:
    """The node's ticks that must find the statement old run in this process with a clock
    MAX_STALENESS + 1 s ahead (tick_in_process): no test sleeps while a statement ages."""
    f, node, host = fresh_hosted, fresh_hosted.node, fresh_hosted.host
    f.follow("ssh")
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    f.call(f.project, "add-user", {"email": "info@example.com", "password": PASSWORD}, status=201)
    first = f.head()
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == first
    # The server keeps the host's statement fresh while nothing changes: it re-signs it.
    signed = statement_issued_at(host)
    wait_for(lambda: statement_issued_at(host) > signed, what="the server re-signs the host's statement")
    assert statement_age(host) < MAX_STALENESS
    assert f.tick().returncode == EXIT_OK

    # 1. The host freezes refs/mailstate/accepted (a hook; a lagging mirror or an attacker would
    #    do the same): writes still land on main, but the statement there grows old.
    host.freeze_refs("state.git", STATEMENT_REF)
    f.call(f.project, "add-user", {"email": "new@example.com", "password": PASSWORD}, status=201)
    second = f.head()
    assert host.rev("state.git", "main") == second and stated_head(host) == first
    frozen = statement_issued_at(host)
    r = tick_in_process(pipull, f.cfg, later_by=MAX_STALENESS + 1)
    assert statement_issued_at(host) == frozen  # the server's re-signing did not reach the host
    assert r.returncode == EXIT_STALE, (r.returncode, r.stderr)
    assert "stale" in r.stderr and "max_staleness" in r.stderr
    assert f.applied() == first  # keeps serving the last good release ...
    assert node.can_login("info@example.com", PASSWORD)
    assert not node.can_login("new@example.com", PASSWORD)  # ... and nothing the host did not state
    row = next(x for x in f.admin.get(f"{API}/list-nodes").json()["nodes"] if x["name"] == "mpi01")
    assert row["status"] == "stale", row

    # Recovery: the host takes statements again, the server's next refresh lands, the node applies.
    host.thaw("state.git")
    wait_for(
        lambda: stated_head(host) == second and statement_age(host) < MAX_STALENESS,
        what="the statement is refreshed on the host",
    )
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == second
    assert node.can_login("new@example.com", PASSWORD)
    row = next(x for x in f.admin.get(f"{API}/list-nodes").json()["nodes"] if x["name"] == "mpi01")
    assert row["status"] == "ok", row

    # 2. The servers stop: the host (now over http) keeps serving the last statement, which ages.
    f.follow_url(host.http_url())
    f.server.stop()
    last_signed = statement_issued_at(host)
    r = tick_in_process(pipull, f.cfg, later_by=MAX_STALENESS + 1)
    assert r.returncode == EXIT_STALE, (r.returncode, r.stderr)
    assert "stale" in r.stderr
    assert f.applied() == second and node.can_login("new@example.com", PASSWORD)
    # A server comes back (on another port): it re-signs, pushes, and the node is fresh again.
    f.server.start()
    wait_for(lambda: statement_issued_at(host) > last_signed, what="a restarted server refreshes the host's statement")
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert f.applied() == second


# --------------------------------------------------------------------------- follow mode through the host

FOLLOW_BOUND = 15.0  # seconds: generous on a loaded machine; bench/bench_follow.py has the figures


@pytest.mark.parametrize("wake", ["poll", "wake_url"])
def test_follow_mode_through_the_host(hosted: HostedFleet, wake: str) -> None:
    """`pi_pull.py --follow` fetching from the sshd host: it polls the statement ref with
    ls-remote, or, with `[remote] wake_url` = the server's /v1/nodes/wait, is woken by the
    server and still fetches from the host; either way a change goes live within the bound."""
    f, node = hosted, hosted.node
    f.follow("ssh")
    text = f.cfg.read_text()
    if wake == "wake_url":
        text = text.replace(
            f"url = {f.host.ssh_url()}\n", f"url = {f.host.ssh_url()}\nwake_url = {f.server.url}/v1/nodes/wait\n", 1
        )
    f.cfg.write_text(text + "[agent]\ninterval = 60\npoll_interval = 1\n")
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    log = f.tmp / "follow.log"
    proc = subprocess.Popen(
        [sys.executable, str(pi_pull_script()), "--config", str(f.cfg), "--follow", "-v"],
        stdout=subprocess.DEVNULL, stderr=log.open("a"), text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: f.applied() == f.head(),
            timeout=FOLLOW_BOUND,
            what=f"the first tick; log: {log.read_text()[-2000:]}",
        )
        expected = "long poll on" if wake == "wake_url" else "polling the statement ref"
        assert expected in log.read_text(), log.read_text()[-2000:]
        for i in range(2):
            f.call(f.project, "add-user", {"email": f"u{i}@example.com", "password": PASSWORD}, status=201)
            t0 = time.monotonic()
            wait_for(
                lambda i=i: node.can_login(f"u{i}@example.com", PASSWORD),
                timeout=FOLLOW_BOUND,
                what=f"u{i} live; log: {log.read_text()[-2000:]}",
            )  # type: ignore[misc]
            assert time.monotonic() - t0 < FOLLOW_BOUND
            # state.json is saved at the end of the tick (after the report), a moment after the
            # release went live and the login above worked.
            wait_for(
                lambda: f.applied() == f.host.rev("state.git", "main"),
                timeout=FOLLOW_BOUND,
                what="the node at the host's tip",
            )
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
