"""A data dir given as a relative path (`--data ./data`, the README's own command and the
default) works like an absolute one: every write any process makes on it is kept.

The bug this guards against: git runs with `-C <repo>` and resolves a relative
`gpg.ssh.allowedSignersFile` (or a relative upstream path) from inside the repo, so every
commit made by another process was refused as unsigned and then replaced by the next write.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from mailstate.state.datadir import DataDir, absolute, init_data_dir, local_git_url, open_store
from mailstate.state.gitrepo import GitRepo
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, FakeClock, git_out, make_key
from tests.helpers.server import LiveServer, mailstate_cmd

# --- the library: paths are resolved once, when the data dir is opened ---------------------


def test_a_data_dir_is_absolute_from_the_moment_it_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dd = DataDir(Path("./data"))
    assert dd.root == tmp_path / "data"
    for path in (dd.repo, dd.key, dd.allowed_signers, dd.db, dd.cache):
        assert path.is_absolute() and path.is_relative_to(tmp_path / "data")
    monkeypatch.chdir("/")
    assert dd.repo == tmp_path / "data" / "state.git"  # a later chdir changes nothing
    assert DataDir(tmp_path / "a" / ".." / "data").root == tmp_path / "data"


def test_a_relative_git_repo_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert GitRepo.init_bare(Path("rel.git")).path == tmp_path / "rel.git"


@pytest.mark.parametrize(
    ("url", "absolute_path"),
    [
        ("up.git", True),
        ("./up.git", True),
        ("../shared/up.git", True),
        ("dir/with:colon.git", True),  # a slash before the colon: git reads a path
        ("/srv/up.git", True),
        ("https://git.example.net/state.git", False),
        ("ssh://git@git.example.net/state.git", False),
        ("file:///srv/up.git", False),
        ("git@github.com:org/state.git", False),  # scp-like
        ("host:state.git", False),
    ],
)
def test_local_upstream_paths_are_made_absolute(
    url: str, absolute_path: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_git_url(url) == (str(absolute(url)) if absolute_path else url)


@pytest.mark.e2e
def test_two_stores_on_a_relative_data_dir_keep_each_others_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    init_data_dir(Path("data"), None, clock=FakeClock(), keygen=make_key)
    x = open_store(Path("data"))
    x.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    y = open_store(Path("./data"))
    out = y.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    assert x.execute("list-domains", ADMIN).result["domains"][0]["domain"] == "example.com"
    assert x.head == out.result["commit"] and x.health()["status"] == "ok"
    x.execute("add-node", ADMIN, {"name": "n1"})
    assert git_out(tmp_path / "data/state.git", "rev-parse", "main~1").strip() == out.result["commit"]
    assert x.health()["status"] == "ok"


@pytest.mark.e2e
def test_a_relative_upstream_path_is_the_one_next_to_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", "up.git"], check=True)
    init_data_dir(Path("data"), None, clock=FakeClock(), keygen=make_key)
    store = open_store(Path("data"), upstream="up.git")
    assert store.health()["upstream"]["error"] is None
    out = store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    assert git_out(tmp_path / "up.git", "rev-parse", "main").strip() == out.result["commit"]


# --- the README's first session, with `--data ./data`, and three other writers -------------


def _commits(srv: LiveServer) -> list[str]:
    return srv.git("rev-list", "main").split()


def _is_ancestor(srv: LiveServer, old: str, new: str) -> bool:
    return (
        subprocess.run(
            ["git", "-C", str(srv.data.repo), "merge-base", "--is-ancestor", old, new], env=srv.env
        ).returncode
        == 0
    )


def _mcp_add_user(srv: LiveServer, token: str, email: str) -> dict[str, Any]:
    cmd = mailstate_cmd()
    params = StdioServerParameters(
        command=cmd[0], args=[*cmd[1:], "mcp", "--data", "./data", "--token", token], env=srv.env, cwd=str(srv.cwd)
    )

    async def main() -> dict[str, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("email_account_add_user", {"email": email, "password": PASSWORD})
            assert not result.is_error, result
            data: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
            return data

    return anyio.run(main)


def _admin_push(srv: LiveServer, work: Path, key: Path) -> str:
    """An admin's commit, signed by `git commit -S` with an SSH key, pushed into ./data/state.git."""
    env = srv.env

    def run(*args: str, cwd: Path = work) -> str:
        return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout

    run("git", "clone", "-q", "./data/state.git", str(work), cwd=srv.root)
    path = work / "domains/my/mycompany.nl.yaml"
    head, sep, tail = path.read_text().partition("\n  info:\n")
    assert sep and "quota_mb: 1024" in tail
    path.write_text(head + sep + tail.replace("quota_mb: 1024", "quota_mb: 4096", 1))
    run(*mailstate_cmd(), "compile", ".")
    run("git", "add", "-A")
    run(
        "git",
        "-c",
        "user.name=Admin",
        "-c",
        "user.email=admin@example.invalid",
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key}",
        "commit",
        "-q",
        "-S",
        "-m",
        "raise info's quota",
    )
    run("git", "push", "-q", "../data/state.git", "HEAD:main")
    return run("git", "rev-parse", "HEAD").strip()


@pytest.mark.e2e
def test_the_readme_session_with_a_relative_data_dir_keeps_every_write(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path)
    srv.data_arg, srv.cwd = "./data", tmp_path  # exactly `mailstate serve --data ./data`
    srv.start()
    try:
        admin = srv.admin_token
        assert admin
        project = srv.create_token(project=42, name="dashboard")
        with srv.client(admin) as a, srv.client(project) as p:

            def health_ok() -> None:
                body = a.get("/v1/health").json()
                assert body["status"] == "ok", body

            def users() -> dict[str, int]:
                resp = p.get("/v1/email-account/list-users", params={"domain": "mycompany.nl"})
                assert resp.status_code == 200, resp.text
                return {u["email"]: u["quota_mb"] for u in resp.json()["users"]}

            # The README's first session.
            assert a.post(
                "/v1/email-account/link-domain", json={"domain": "mycompany.nl", "project_id": 42}
            ).status_code in (200, 201)
            assert p.post("/v1/email-account/enable-email", json={"domain": "mycompany.nl"}).status_code in (200, 201)
            first = p.post(
                "/v1/email-account/add-user", json={"email": "info@mycompany.nl", "password": "s3cret-enough"}
            )
            assert first.status_code == 201, first.text
            assert users() == {"info@mycompany.nl": 1024}
            log = srv.cli("log", "data/state.git")
            assert "add-user" in log.stdout
            verified = subprocess.run(
                [
                    "git",
                    "-C",
                    "data/state.git",
                    "-c",
                    f"gpg.ssh.allowedSignersFile={tmp_path}/data/allowed_signers",
                    "verify-commit",
                    "main",
                ],
                cwd=tmp_path,
                env=srv.env,
                capture_output=True,
            )
            assert verified.returncode == 0, verified.stderr

            # `mailstate call --data ./data`, a second process on the same dir.
            call = srv.cli(
                "call",
                "--data",
                "./data",
                "--project",
                "42",
                "add-user",
                "email=cli@mycompany.nl",
                f"password={PASSWORD}",
            )
            cli_commit = json.loads(call.stdout)["commit"]
            assert "cli@mycompany.nl" in users()
            health_ok()

            # Stdio MCP, `mailstate mcp --data ./data`, through the official client.
            mcp_commit = _mcp_add_user(srv, project, "mcp@mycompany.nl")["commit"]
            assert "mcp@mycompany.nl" in users()
            health_ok()

            # An admin's commit, signed with a key the data dir trusts, pushed by hand.
            key = tmp_path / "admin_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin", "-f", str(key)], check=True)
            pub = Path(f"{key}.pub").read_text().split()
            with (tmp_path / "data/allowed_signers").open("a") as fh:
                fh.write(f'admin namespaces="git" {pub[0]} {pub[1]}\n')
            admin_commit = _admin_push(srv, tmp_path / "work", key)
            assert users()["info@mycompany.nl"] == 4096
            health_ok()

            # The server's next write builds on all of them.
            last = p.post("/v1/email-account/add-user", json={"email": "last@mycompany.nl", "password": PASSWORD})
            assert last.status_code == 201, last.text
            head = last.json()["commit"]
            health_ok()
    finally:
        srv.stop()
    for commit in (first.json()["commit"], cli_commit, mcp_commit, admin_commit):
        assert _is_ancestor(srv, commit, head), commit
    assert _commits(srv)[:4] == [head, admin_commit, mcp_commit, cli_commit]
    assert srv.git("for-each-ref", "refs/mailstate/rejected/") == ""
    assert "REFUSED" not in srv.log_text()
    assert users_at_head(srv) == {"info@mycompany.nl", "cli@mycompany.nl", "mcp@mycompany.nl", "last@mycompany.nl"}


def users_at_head(srv: LiveServer) -> set[str]:
    text = srv.git("show", "main:domains/my/mycompany.nl.yaml")
    return {
        f"{line.strip().rstrip(':')}@mycompany.nl"
        for line in text.splitlines()
        if line.startswith("  ") and not line.startswith("    ")
    }
