"""`mailstate`, the command line: help everywhere, init, tokens, call; exit codes and messages.

(compile/check are in test_compiler.py, log in test_audit.py.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailstate.api.cli import build_parser, main
from mailstate.state.datadir import DataDir
from mailstate.state.errors import Unauthenticated
from mailstate.state.localdb import LocalDB
from tests.helpers.common import commit_count, git_out, read_file, verify_commit


def all_commands() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return found


COMMANDS = all_commands()


def test_core_commands_exist() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {
        "init",
        "serve",
        "mcp",
        "token",
        "token create",
        "token list",
        "token revoke",
        "call",
        "compile",
        "check",
        "log",
    } <= names


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "mailstate")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mailstate")
    assert " ".join(["mailstate", *command]) in out.splitlines()[0]
    # every --help ends with the exit codes
    assert "exit codes:" in out and "  2    usage error or invalid input" in out and "  4    store, git" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mailstate {version('mailstate')}"


@pytest.mark.e2e
def test_serve_logs_json_lines(tmp_path: Path) -> None:
    from tests.helpers.server import LiveServer

    srv = LiveServer(tmp_path)
    srv.env["MAILSTATE_LOG_LEVEL"] = "info"
    srv.extra_args = ["--log-format", "json"]
    srv.start()
    try:
        with srv.client(srv.admin_token) as c:
            assert c.get("/v1/email-account/list-domains").status_code == 200
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any(
        a["path"] == "/v1/email-account/list-domains" and a["status"] == 200 and a["method"] == "GET" for a in access
    ), access
    assert srv.admin_token not in srv.log_text()
    env_srv = subprocess.run(
        [sys.executable, "-m", "mailstate.api.cli", "serve", "--data", str(tmp_path / "d2")],
        capture_output=True, text=True, env={**srv.env, "MAILSTATE_LOG_FORMAT": "yaml"}, timeout=60,
    )  # fmt: skip
    assert env_srv.returncode == 2 and "log format must be one of text, json" in env_srv.stderr


@pytest.mark.e2e
def test_console_script_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "mailstate.api.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "init" in proc.stdout and "compile" in proc.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# --- init ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_init_creates_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    code = main(
        [
            "init",
            "--data",
            str(root),
            "--bcrypt-cost",
            "4",
            "--mail-root",
            "/srv/mail",
            "--uid",
            "8",
            "--gid",
            "9",
            "--default-quota-mb",
            "300",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert str(root) in out
    dd = DataDir(root)
    assert (dd.repo / "HEAD").exists() and (dd.repo / "objects").is_dir()  # bare
    assert dd.key.exists() and Path(f"{dd.key}.pub").exists()
    assert dd.allowed_signers.read_text().startswith("mailstate ")
    assert dd.db.exists()
    assert commit_count(dd.repo) == 1
    assert verify_commit(dd).returncode == 0
    settings = yaml.safe_load(git_out(dd.repo, "show", "main:mailstate.yaml"))
    assert settings == {
        "format": 2,
        "mail_root": "/srv/mail",
        "uid": 8,
        "gid": 9,
        "default_quota_mb": 300,
        "bcrypt_cost": 4,
        "purge_after_days": 7,
    }
    assert (
        git_out(dd.repo, "show", "main:rendered/settings") == "format 2\npurge_after_days 7\n"
    )  # new data dirs start at format 2
    assert yaml.safe_load(git_out(dd.repo, "show", "main:nodes.yaml")) == {"nodes": {}}
    # the private key is never printed
    assert Path(dd.key).read_text().splitlines()[1] not in out
    # the admin token is: once, as the last line, and it works
    token = out.strip().splitlines()[-1]
    assert out.count(token) == 1 and "shown ONCE" in out
    db = LocalDB(dd.db)
    try:
        assert db.authenticate(token).is_admin
        assert [t.name for t in db.list_tokens()] == ["admin"]
    finally:
        db.close()


@pytest.mark.e2e
def test_init_without_a_token_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    assert main(["init", "--data", str(root), "--bcrypt-cost", "4", "--no-token"]) == 0
    out = capsys.readouterr().out
    assert f"mailstate token create --data {root} --admin" in out
    db = LocalDB(DataDir(root).db)
    try:
        assert db.list_tokens() == []
    finally:
        db.close()


@pytest.mark.e2e
def test_init_refuses_a_used_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    assert main(["init", "--data", str(root), "--bcrypt-cost", "4"]) == 0
    head = git_out(root / "state.git", "rev-parse", "main")
    key = (root / "signing_key").read_bytes()
    capsys.readouterr()
    assert main(["init", "--data", str(root), "--bcrypt-cost", "4"]) == 4
    err = capsys.readouterr().err
    assert "already" in err and str(root) in err
    assert git_out(root / "state.git", "rev-parse", "main") == head
    assert (root / "signing_key").read_bytes() == key


@pytest.mark.parametrize(
    "args",
    [
        ["--bcrypt-cost", "3"],
        ["--bcrypt-cost", "32"],
        ["--mail-root", "relative/path"],
        ["--mail-root", "/var/../etc"],
        ["--uid", "0"],
        ["--default-quota-mb", "0"],
        ["--send-per-hour", "-1"],
        ["--send-per-day", "10", "--auto-suspend-factor", "0.5"],
    ],
)
def test_init_bad_settings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    root = tmp_path / "data"
    assert main(["init", "--data", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [")
    assert not (root / "state.git").exists()


@pytest.mark.e2e
def test_init_writes_the_sending_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    assert main(["init", "--data", str(root), "--no-token", "--send-per-hour", "100", "--send-per-day", "500"]) == 0
    assert "sending:\n  send_per_hour: 100\n  send_per_day: 500\n  auto_suspend_factor: 3.0\n" in (
        read_file(root / "state.git", "mailstate.yaml") or ""
    )
    assert (
        read_file(root / "state.git", "rendered/sending")
        == "send_per_hour 100\nsend_per_day 500\nauto_suspend_factor 3\n"
    )


def test_init_non_numeric_cost_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["init", "--data", str(tmp_path / "d"), "--bcrypt-cost", "high"])
    assert info.value.code == 2


# --- tokens --------------------------------------------------------------------------------------


def test_token_create_prints_the_token_last_and_stores_only_its_hash(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "create", "--data", str(data_dir.root), "--project", "101", "--name", "dashboard"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    token = lines[-1]
    assert token.startswith("mst_")
    assert "dashboard" in lines[0]
    secret = token.split("_", 2)[2]
    # only the SHA-256 of the secret is on disk, never the token or the secret
    for f in data_dir.root.iterdir():
        if f.is_file() and f.name.startswith("mailstate.db"):
            raw = f.read_bytes()
            assert token.encode() not in raw and secret.encode() not in raw
    rows = sqlite3.connect(str(data_dir.db)).execute("SELECT name, project_id, secret_sha256 FROM tokens").fetchall()
    assert rows == [("dashboard", 101, hashlib.sha256(secret.encode()).hexdigest())]
    # and it works
    db = LocalDB(data_dir.db)
    try:
        actor = db.authenticate(token)
        assert actor.project_id == 101 and actor.name == "token:dashboard"
        with pytest.raises(Unauthenticated):
            db.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B"))
        with pytest.raises(Unauthenticated):
            db.authenticate(token + "\n")
    finally:
        db.close()


def test_token_admin_list_and_revoke(data_dir: DataDir, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "--data", str(data_dir.root), "--admin", "--name", "ops"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    db = LocalDB(data_dir.db)
    try:
        assert db.authenticate(token).is_admin
    finally:
        db.close()
    assert main(["token", "list", "--data", str(data_dir.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["role"], t["revoked"]) for t in listed] == [("ops", "admin", False)]
    assert token.split("_", 2)[2] not in json.dumps(listed)
    assert main(["token", "list", "--data", str(data_dir.root)]) == 0
    text = capsys.readouterr().out
    assert "ops" in text and token not in text
    assert main(["token", "revoke", "--data", str(data_dir.root), "ops"]) == 0
    capsys.readouterr()
    db = LocalDB(data_dir.db)
    try:
        with pytest.raises(Unauthenticated):
            db.authenticate(token)
    finally:
        db.close()
    assert main(["token", "revoke", "--data", str(data_dir.root), "ops"]) == 3
    assert "token_not_found" in capsys.readouterr().err


def test_token_revoke_is_unambiguous(data_dir: DataDir, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(data_dir.root)
    tokens = {}
    for who in (["--project", "1"], ["--project", "2"], ["--admin"]):
        assert main(["token", "create", "--data", d, *who, "--name", "shared"]) == 0
        tokens[who[-1]] = capsys.readouterr().out.strip().splitlines()[-1]
    ids = {k: t.split("_")[1] for k, t in tokens.items()}
    # `token list` has a header row and shows the ids
    assert main(["token", "list", "--data", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROLE", "CREATED", "STATUS"]
    assert {line.split()[0] for line in lines[1:]} == set(ids.values())
    # a name three active tokens share revokes nothing, and lists the candidates' ids
    assert main(["token", "revoke", "--data", d, "shared"]) == 3
    err = capsys.readouterr().err
    assert "token_ambiguous" in err and all(i in err for i in ids.values())
    db = LocalDB(data_dir.db)
    try:
        for token in tokens.values():
            db.authenticate(token)
        # by id: exactly that token
        assert main(["token", "revoke", "--data", d, ids["1"]]) == 0
        assert ids["1"] in capsys.readouterr().out
        with pytest.raises(Unauthenticated):
            db.authenticate(tokens["1"])
        db.authenticate(tokens["2"])
        assert main(["token", "revoke", "--data", d, ids["--admin"]]) == 0
        capsys.readouterr()
        # now one active token has the name: the name is enough
        assert main(["token", "revoke", "--data", d, "shared"]) == 0
        assert ids["2"] in capsys.readouterr().out
        with pytest.raises(Unauthenticated):
            db.authenticate(tokens["2"])
    finally:
        db.close()
    assert main(["token", "revoke", "--data", d, "shared"]) == 3
    assert "token_not_found" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"text"', "NaN", "[" * 100000])
def test_call_bad_json_is_a_usage_error_not_a_traceback(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    assert main(["call", "--data", str(data_dir.root), "add-domain", "--json", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [invalid_request]: --json") and "Traceback" not in err


def test_token_create_needs_a_role_and_a_data_dir(
    tmp_path: Path, data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "create", "--data", str(data_dir.root)])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["token", "create", "--data", str(data_dir.root), "--admin", "--project", "1"])
    capsys.readouterr()
    assert main(["token", "create", "--data", str(tmp_path / "nothing"), "--admin"]) == 4
    assert "mailstate init" in capsys.readouterr().err
    assert main(["token", "create", "--data", str(data_dir.root), "--admin", "--name", "bad name!"]) == 2


# --- call ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_call_runs_operations_and_maps_errors(data_dir: DataDir, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(data_dir.root)
    assert main(["call", "--data", d, "link-domain", "domain=example.com", "project_id=7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["project_id"] == 7 and len(out["commit"]) == 40
    assert main(["call", "--data", d, "--project", "7", "enable-email", "domain=example.com"]) == 0
    capsys.readouterr()
    body = json.dumps({"email": "info@example.com", "password": "p4ss word: yes", "quota_mb": 10})
    assert main(["call", "--data", d, "--project", "7", "add-user", "--json", body]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["email"] == "info@example.com" and out["quota_mb"] == 10
    assert "p4ss word" not in json.dumps(out)
    # conflict → 3, invalid → 2, other project's domain → 3, admin op as project → 3
    assert main(["call", "--data", d, "--project", "7", "add-user", "--json", body]) == 3
    assert "mailbox_exists" in capsys.readouterr().err
    assert main(["call", "--data", d, "--project", "7", "add-user", "email=bad", "password=whatever1"]) == 2
    err = capsys.readouterr().err
    assert "invalid_email" in err
    assert main(["call", "--data", d, "--project", "8", "list-users", "domain=example.com"]) == 3
    assert "domain_not_found" in capsys.readouterr().err
    assert main(["call", "--data", d, "--project", "7", "add-node", "name=n1"]) == 3
    assert "admin_required" in capsys.readouterr().err
    assert main(["call", "--data", d, "no-such-operation"]) == 2
    assert "unknown_operation" in capsys.readouterr().err
    assert main(["call", "--data", d, "add-domain", "justtext"]) == 2
    capsys.readouterr()
    # a failing password never reaches the terminal
    assert (
        main(["call", "--data", d, "--project", "7", "update-password", "email=info@example.com", "password=short"])
        == 2
    )
    assert "short" not in capsys.readouterr().err.replace("shorter", "")
    # reads print JSON and commit nothing
    before = commit_count(data_dir.repo)
    assert main(["call", "--data", d, "list-users"]) == 0
    assert json.loads(capsys.readouterr().out)["users"][0]["email"] == "info@example.com"
    assert commit_count(data_dir.repo) == before
    # the actor of a CLI call is recorded
    assert "Actor: cli:" in git_out(data_dir.repo, "log", "-3", "--format=%(trailers)")


def test_call_on_uninitialised_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", "--data", str(tmp_path / "nothing"), "list-domains"]) == 4
    assert "mailstate init" in capsys.readouterr().err


def test_compile_and_check_on_a_missing_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nowhere")]) == 1
    assert "mailstate.yaml: missing" in capsys.readouterr().out
    assert main(["compile", "--check", str(tmp_path / "nowhere")]) == 1
    assert "mailstate.yaml: missing" in capsys.readouterr().err


@pytest.mark.e2e
def test_check_a_checkout_of_a_real_state_repo(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What CI does on a pull request: clone, check."""
    d = str(data_dir.root)
    main(["call", "--data", d, "add-domain", "domain=example.com", "project_id=3"])
    main(["call", "--data", d, "add-user", "email=info@example.com", "password=password123"])
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(clone)], check=True)
    capsys.readouterr()
    assert main(["check", str(clone)]) == 0
    assert main(["compile", "--check", str(clone)]) == 0
    (clone / "rendered/domains/ex/example.com/passwd").write_text("root:x:0:0::/root::\n")
    assert main(["check", str(clone)]) == 1
    assert "rendered/domains/ex/example.com/passwd" in capsys.readouterr().out
