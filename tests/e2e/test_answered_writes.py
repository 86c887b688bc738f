"""Every answered write stays: a real `mailstate serve`, a real `mailstate call` on the same data
dir, restarts in between, and commits that one process answered and another would refuse.

The reproduction of the lost writes: two projects share an alias chain (project 42's aliases
lead into project 43's), project 43 lengthens its part, `mailstate call` and the server write
on the same data dir, the server restarts. Nothing answered may go, main never moves back past
an answered commit, and the statement names only what a server validated.

Real git, real SSH signatures, real HTTP, the real CLI in subprocesses; no mocks.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pygit2
import pytest
import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client

from mailstate.state.errors import StatementInvalid
from mailstate.state.signing import SshKeygenSigner, allowed_signers_line, generate_key
from mailstate.state.snapshot import Actor
from mailstate.state.statement import read_statement, verify_statement, write_statement
from mailstate.state.store import commit_message
from tests.helpers.server import LiveServer, mailstate_cmd

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"


class Setup:
    """A started server on a fresh data dir, an admin client and clients for projects 42 and 43."""

    def __init__(self, root: Path) -> None:
        self.server = LiveServer(root)
        self.server.start()
        self.admin = self.server.client(self.server.admin_token)
        self.tokens = {p: self.server.create_token(project=p, name=f"p{p}") for p in (42, 43)}
        self.p = {p: self.server.client(t) for p, t in self.tokens.items()}

    def reconnect(self) -> None:
        for c in (self.admin, *self.p.values()):
            c.close()
        self.admin = self.server.client(self.server.admin_token)
        self.p = {p: self.server.client(t) for p, t in self.tokens.items()}

    def close(self) -> None:
        for c in (self.admin, *self.p.values()):
            c.close()
        self.server.stop()

    def post(self, client: httpx.Client, op: str, body: dict[str, object]) -> httpx.Response:
        return client.post(f"{API}/{op}", json=body)

    def ok(self, client: httpx.Client, op: str, body: dict[str, object]) -> str:
        r = self.post(client, op, body)
        assert r.status_code in (200, 201), f"{op} {body}: {r.status_code} {r.text}"
        commit = r.json()["commit"]
        assert commit, f"{op} {body} changed nothing"
        return str(commit)

    def call(self, project: int, op: str, *fields: str) -> subprocess.CompletedProcess[str]:
        data = str(self.server.data.root)
        return self.server.cli("call", "--data", data, "--project", str(project), op, *fields, check=False)

    def main(self) -> str:
        return self.server.git("rev-parse", "main").strip()

    def statement_head(self) -> str:
        return self.server.git("rev-parse", "refs/mailstate/accepted^{commit}").strip()

    def on_main(self, commit: str) -> bool:
        proc = subprocess.run(
            ["git", "-C", str(self.server.data.repo), "merge-base", "--is-ancestor", commit, "main"],
            env=self.server.env,
        )
        return proc.returncode == 0

    def users(self, project: int) -> set[str]:
        r = self.p[project].get(f"{API}/list-users")
        assert r.status_code == 200, r.text
        return {u["email"] for u in r.json()["users"]}

    def health(self) -> dict[str, object]:
        r = self.admin.get("/v1/health")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def check_main(self, tmp: Path) -> subprocess.CompletedProcess[str]:
        """`mailstate check` on a fresh checkout of main: what a pull request's CI runs."""
        work = tmp / f"check-{len(list(tmp.glob('check-*')))}"
        subprocess.run(["git", "clone", "-q", str(self.server.data.repo), str(work)], check=True, env=self.server.env)
        return self.server.cli("check", str(work), check=False)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path / "server")
    try:
        yield s
    finally:
        s.close()


def test_the_reported_sequence_loses_no_answered_write(setup: Setup, tmp_path: Path) -> None:
    """The issue's six steps, as reported: every write answered 2xx (or exit 0) is on main after
    the restart, main validates, and the statement names main."""
    s = setup
    for domain, project in (("a.example", 42), ("b.example", 43)):
        s.ok(s.admin, "link-domain", {"domain": domain, "project_id": project})
        s.ok(s.p[project], "enable-email", {"domain": domain})
    answered: list[str] = []
    # 1. Project 43: a mailbox and an alias to it.
    answered.append(s.ok(s.p[43], "add-user", {"email": "info@b.example", "password": PASSWORD}))
    answered.append(s.ok(s.p[43], "add-alias", {"address": "sales@b.example", "destinations": ["info@b.example"]}))
    # 2. Project 42: x1 -> x2 -> ... -> x7 -> sales@b.example (built from the end).
    answered.append(s.ok(s.p[42], "add-alias", {"address": "x7@a.example", "destinations": ["sales@b.example"]}))
    for i in range(6, 0, -1):
        body = {"address": f"x{i}@a.example", "destinations": [f"x{i + 1}@a.example"]}
        answered.append(s.ok(s.p[42], "add-alias", body))
    # 3. Project 43 makes its own part one step longer.
    answered.append(s.ok(s.p[43], "add-alias", {"address": "hop@b.example", "destinations": ["info@b.example"]}))
    answered.append(s.ok(s.p[43], "update-alias", {"address": "sales@b.example", "destinations": ["hop@b.example"]}))
    # 4. Another process on the same data dir writes for project 42.
    proc = s.call(42, "add-user", "email=victim@a.example", f"password={PASSWORD}")
    assert proc.returncode == 0, proc.stderr
    victim = s.main()
    answered.append(victim)
    # 5. Project 42 over HTTP.
    answered.append(s.ok(s.p[42], "add-user", {"email": "after@a.example", "password": PASSWORD}))
    # 6. Restart, and any write.
    s.server.stop()
    s.server.start()
    s.reconnect()
    answered.append(s.ok(s.p[42], "add-user", {"email": "later@a.example", "password": PASSWORD}))

    lost = [c[:12] for c in answered if not s.on_main(c)]
    assert lost == [], f"answered commits no longer on main: {lost}"
    assert {"victim@a.example", "after@a.example", "later@a.example"} <= s.users(42)
    assert s.statement_head() == s.main()
    assert s.health()["status"] == "ok"
    check = s.check_main(tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


# --- no process states a commit it has not validated ------------------------------------------------

BAD_LINE = "x@example.com:{PLAIN}pw:5000:5000::/var/vmail/example.com/x::nopassword=y\n"


def _git(repo: Path, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def push_signed(
    server: LiveServer, key: Path, edit: Callable[[Path], None], *, who: str = "admin", message: str = ""
) -> str:
    """Clone the data dir's repo, `edit` the work tree, commit signed with `key` (git commit -S),
    push to main; the new main."""
    work = server.root / f"work-{len(list(server.root.glob('work-*')))}"
    env = server.env
    subprocess.run(["git", "clone", "-q", str(server.data.repo), str(work)], check=True, env=env)
    edit(work)
    _git(work, "add", "-A", env=env)
    ident = ["-c", f"user.name={who}", "-c", f"user.email={who}@example.org", "-c", "gpg.format=ssh"]
    _git(work, *ident, "-c", f"user.signingkey={key}", "commit", "-q", "-S", "-m", message or f"{who} change", env=env)
    _git(work, "push", "-q", "origin", "HEAD:main", env=env)
    return _git(work, "rev-parse", "HEAD", env=env).strip()


def plain_password_line(work: Path) -> None:
    """A hand edit no compiler makes: a rendered passwd line with a plain password and no login check."""
    passwd = next(work.glob("rendered/domains/*/example.com/passwd"))
    passwd.write_text(passwd.read_text() + BAD_LINE)


@pytest.fixture
def offline(tmp_path: Path) -> LiveServer:
    """A data dir made with the CLI (no server running yet): example.com for project 42 with a
    mailbox, and an admin key the data dir trusts for commits (admin@example.org)."""
    server = LiveServer(tmp_path / "server")
    data = str(server.data.root)
    server.cli("init", "--data", data, "--bcrypt-cost", "4")
    server.admin_token = server.create_token(name="admin")
    server.cli("call", "--data", data, "link-domain", "domain=example.com", "project_id=42")
    server.cli("call", "--data", data, "--project", "42", "enable-email", "domain=example.com")
    server.cli("call", "--data", data, "--project", "42", "add-user", "email=info@example.com", f"password={PASSWORD}")
    key = server.root / "admin_key"
    generate_key(key, "admin@example.org")
    with server.data.allowed_signers.open("a") as fh:
        fh.write(allowed_signers_line(Path(f"{key}.pub").read_text(), "admin@example.org"))
    return server


def _stated(server: LiveServer) -> str | None:
    """The head the statement at refs/mailstate/accepted names, if a server key signed it."""
    found = read_statement(pygit2.Repository(str(server.data.repo)))
    if found is None:
        return None
    try:
        return verify_statement(found[1], server.data.allowed_signers).head
    except StatementInvalid:
        return None


async def _stdio_read(server: LiveServer, token: str) -> dict[str, Any]:
    cmd = mailstate_cmd()
    params = StdioServerParameters(
        command=cmd[0], args=[*cmd[1:], "mcp", "--data", str(server.data.root), "--token", token], env=server.env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool("email_account_list_users", {})
        return json.loads(result.content[0].text)  # type: ignore[union-attr, no-any-return]


def _open_with(server: LiveServer, process: str) -> None:
    """Open the data dir the way `process` does, with one request."""
    if process == "call":
        proc = server.cli("call", "--data", str(server.data.root), "--project", "42", "list-users", check=False)
        assert proc.returncode == 0, proc.stderr
    elif process == "mcp":
        token = server.create_token(project=42, name="stdio")
        assert "users" in anyio.run(_stdio_read, server, token)
    else:
        server.start()
        try:
            with server.client(server.admin_token) as admin:
                health = admin.get("/v1/health").json()
                assert (
                    health["status"] == "degraded"
                    and health["refused_commit"]["commit"] == server.git("rev-parse", "main").strip()
                ), health
                # A write elsewhere would build on the unchecked commit and keep its problem: refused.
                # (One that re-renders example.com would make the whole commit valid, and land.)
                r = admin.post(f"{API}/link-domain", json={"domain": "other.example", "project_id": 42})
                assert r.status_code == 503 and r.json()["error"]["code"] == "state_needs_repair", r.text
        finally:
            server.stop()


@pytest.mark.parametrize("statement", ["deleted", "not_a_servers"])
@pytest.mark.parametrize("process", ["serve", "call", "mcp"])
def test_no_process_states_a_commit_it_did_not_validate(offline: LiveServer, process: str, statement: str) -> None:
    """main holds a commit the server would refuse (trusted admin key, hand-edited rendered file)
    and there is no server's statement to start from: the commit is checked in full, refused,
    and never stated, whichever process opens the data dir."""
    server = offline
    bad = push_signed(server, server.root / "admin_key", plain_password_line)
    if statement == "deleted":
        server.git("update-ref", "-d", "refs/mailstate/accepted")
    else:  # the admin "states" the bad commit: an admin key signs commits, never statements
        write_statement(server.data.repo, SshKeygenSigner(server.root / "admin_key"), bad)
    _open_with(server, process)
    assert _stated(server) != bad
    assert server.git("rev-parse", "main").strip() == bad  # nothing was written over it either


# --- main, the statement and the validation disagree: the answered writes stay ----------------------


def set_aliases(aliases: dict[str, list[str]]) -> Callable[[Path], None]:
    """An edit: example.com's aliases become `aliases`, rendered/ recompiled (as `mailstate compile`)."""

    def edit(work: Path) -> None:
        path = next(work.glob("domains/*/example.com.yaml"))
        doc = yaml.safe_load(path.read_text())
        if aliases:
            doc["aliases"] = aliases
        else:
            doc.pop("aliases", None)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = subprocess.run([*mailstate_cmd(), "compile", str(work)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    return edit


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_answered_commits_the_server_refuses_are_kept_reported_and_never_rewound(offline: LiveServer) -> None:
    """Two commits a server answered (signed by the server key, as an older mailstate that
    checked less would have written them) land on main, and this server refuses the first: a
    loop of aliases. It keeps serving the last commit it accepted, reports both in /v1/health,
    refuses writes rather than replace them, and does the same after a restart; an admin's
    repair on top of them brings writes back, with both still in main's history."""
    server = offline
    server.start()
    try:
        good = server.git("rev-parse", "main").strip()
        admin = server.client(server.admin_token)
        server_key = server.data.key
        # As a store writes them: signed by the server key, with the audit trailers.
        older = Actor.project(42, "token:older-mailstate")
        answer = commit_message("add-alias", "b@example.com", 42, older, "older-1")
        loop = push_signed(
            server, server_key, set_aliases({"a": ["b@example.com"], "b": ["a@example.com"]}), message=answer
        )
        more = {"a": ["b@example.com"], "b": ["a@example.com"], "c": ["info@example.com"]}
        answer = commit_message("add-alias", "c@example.com", 42, older, "older-2")
        on_top = push_signed(server, server_key, set_aliases(more), message=answer)

        def refused() -> dict[str, Any] | None:
            found: dict[str, Any] | None = admin.get("/v1/health").json().get("refused_commit")
            return found if found and found["commit"] == on_top else None

        wait_for(refused, "health to report the refused commit")
        health = admin.get("/v1/health").json()
        assert health["status"] == "degraded" and set(health["refused_commit"]["answered"]) == {loop, on_top}
        assert any("loop" in p for p in health["refused_commit"]["problems"]), health
        assert health["head"] == good and _stated(server) == good

        for attempt in ("http", "cli", "restart"):
            if attempt == "http":
                r = admin.post(f"{API}/add-user", json={"email": "w@example.com", "password": PASSWORD})
                assert r.status_code == 503 and r.json()["error"]["code"] == "state_needs_repair", r.text
            elif attempt == "cli":
                proc = server.cli("call", "--data", str(server.data.root), "--project", "42", "add-user",
                                  "email=c@example.com", f"password={PASSWORD}", check=False)  # fmt: skip
                assert proc.returncode != 0 and "state_needs_repair" in proc.stdout + proc.stderr
            else:
                server.stop()
                server.start()
                admin.close()
                admin = server.client(server.admin_token)
                assert admin.get("/v1/health").json()["refused_commit"]["commit"] == on_top
                r = admin.post(f"{API}/add-user", json={"email": "w@example.com", "password": PASSWORD})
                assert r.status_code == 503, r.text
            assert server.git("rev-parse", "main").strip() == on_top, attempt
            assert _stated(server) == good, attempt

        # The repair: an admin's commit on top of both, without the loop.
        fix = push_signed(server, server.root / "admin_key", set_aliases({"c": ["info@example.com"]}))
        wait_for(lambda: admin.get("/v1/health").json()["status"] == "ok", "the repair to be accepted")
        r = admin.post(f"{API}/add-user", json={"email": "w@example.com", "password": PASSWORD})
        assert r.status_code == 201, r.text
        assert server.git("rev-parse", "main^").strip() == fix
        for commit in (loop, on_top, fix):
            assert server.git("merge-base", "--is-ancestor", commit, "main") == ""
        wait_for(lambda: _stated(server) == r.json()["commit"], "the statement to name the new write")
        admin.close()
    finally:
        server.stop()
