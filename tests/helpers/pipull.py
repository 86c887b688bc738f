"""The node agent's test bench: a signed state repo and a node root that ``pi_pull.py`` ticks
against as a subprocess (``Setup``), and the agent's exit codes. The ``setup`` fixture
(tests/node/conftest.py) is ``make_setup(tmp_path)``."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.mailnode import (
    SigningKey,
    StateRepo,
    age_file,
    make_signing_key,
    require_binaries,
    run_pi_pull,
    write_allowed_signers,
)

# pi_pull.py's exit codes (pi-pull/README.md).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_LOCKED, EXIT_STALE = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Tick:
    """An in-process tick's exit code and log, named like a finished ``pi_pull.py`` process's."""

    returncode: int
    stderr: str


def tick_in_process(pipull: ModuleType, config: Path, *, later_by: float) -> Tick:
    """One ``pi_pull.py --once`` tick run by the agent package in this process (the ``pipull``
    fixture), its freshness judged `later_by` seconds from now: what the node decides once that
    much time has passed with no newer statement, without a test sleeping through it."""
    stream = io.StringIO()
    log = pipull.log.make_logger(stream=stream)
    agent = pipull.agent.Agent(
        pipull.config.load_config(str(config)), log=log, freshness_clock=lambda: time.time() + later_by
    )
    code = pipull.agent.run_once(agent, log)
    return Tick(code, stream.getvalue())


def isolate_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Nothing from the machine's git/ssh/gpg setup may leak into pi-pull or the test repos."""
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@dataclass
class Setup:
    tmp: Path
    key: SigningKey
    untrusted: SigningKey
    signers: Path
    repo: StateRepo
    root: Path
    sync_key: str
    sync_key_file: Path
    postfix_etc: Path
    reload_log: Path
    outputs: list[str] = field(default_factory=list)

    def config(self, **overrides: str) -> Path:
        """Write the pi-pull ini; overrides are `section__key=value`."""
        values: dict[str, dict[str, str]] = {
            "remote": {"url": str(self.repo.bare), "branch": "main"},
            "node": {"name": "pi-test", "sync_key_file": str(self.sync_key_file), "allowed_signers": str(self.signers)},
            "paths": {
                "root": str(self.root),
                "keep_releases": "5",
                "sync": "no",
                "mail_root": "/var/vmail",
                "mail_uid": "5000",
                "mail_gid": "5000",
            },
            "report": {"url": "", "timeout": "2"},
            "services": {
                "postfix_reload": f"echo postfix >> {self.reload_log}",
                "dovecot_reload": f"echo dovecot >> {self.reload_log}",
                "map_type": "hash",
                "postmap": f"postmap -c {self.postfix_etc}",
            },
        }
        for key, value in overrides.items():
            section, _, option = key.partition("__")
            values.setdefault(section, {})[option] = value
        path = self.tmp / "pi-pull.ini"
        path.write_text(
            "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) for s, opts in values.items())
        )
        return path

    def tick(self, config: Path | None = None, *args: str) -> subprocess.CompletedProcess[str]:
        r = run_pi_pull(config or self.config(), *args)
        self.outputs.append(r.stdout + r.stderr)
        return r

    def reloads(self) -> list[str]:
        return self.reload_log.read_text().split() if self.reload_log.exists() else []

    def current(self) -> str | None:
        link = self.root / "current"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def state(self) -> dict[str, Any]:
        return json.loads((self.root / "state.json").read_text())


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """(mtime_ns, ctime_ns, inode, size) of every path under root, root included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
    return out


def two_domains(repo: StateRepo) -> None:
    repo.set_mailbox("info@example.com", "info-password")
    repo.set_mailbox("sales@example.com", "sales-password", quota_mb=2048)
    repo.set_mailbox("admin@beta.org", "admin-password")


def make_setup(tmp_path: Path) -> Setup:
    """A signed state repo (trusted and untrusted keys), a node root, a sync key and a postmap config."""
    require_binaries("git", "ssh-keygen", "postmap")
    key = make_signing_key(tmp_path / "keys", "trusted")
    untrusted = make_signing_key(tmp_path / "keys", "untrusted")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    repo = StateRepo(tmp_path / "repo", key)
    postfix_etc = tmp_path / "postfix-etc"
    postfix_etc.mkdir()
    (postfix_etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = pi-pull.test\n")
    age_file(postfix_etc / "main.cf")  # else each postmap waits ~2 s for a "hot" main.cf
    sync_key = "sk_" + secrets.token_urlsafe(24)
    key_file = tmp_path / "sync_key"
    key_file.write_text(sync_key + "\n")
    key_file.chmod(0o600)
    return Setup(
        tmp=tmp_path,
        key=key,
        untrusted=untrusted,
        signers=signers,
        repo=repo,
        root=tmp_path / "node",
        sync_key=sync_key,
        sync_key_file=key_file,
        postfix_etc=postfix_etc,
        reload_log=tmp_path / "reloads.log",
    )
