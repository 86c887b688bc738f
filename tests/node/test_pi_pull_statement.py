"""pi-pull and the accepted-head statement; what a remote may make a node download, store and read.

Real git repos, real ssh-keygen signatures (StateRepo publishes statements with `git tag -s`),
the real built pi_pull.py as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailstate.state.signing import SshKeygenSigner
from mailstate.state.statement import parse_statement as server_parse_statement
from mailstate.state.statement import statement_payload as server_statement_payload
from mailstate.state.statement import verify_statement as server_verify_statement
from tests.helpers.mailnode import (
    StateRepo,
    git,
    make_signing_key,
    pi_pull_script,
    publish_statement,
    write_allowed_signers,
)
from tests.helpers.pipull import Setup, snapshot, two_domains

EXIT_OK, EXIT_REFUSED = 0, 3

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]
MiB = 1024 * 1024


def _objects(root: Path) -> set[str]:
    """Every object id the node's mirror holds (loose and packed), quarantine excluded."""
    mirror = root / "mirror.git"
    r = subprocess.run(
        ["git", "--git-dir", str(mirror), "cat-file", "--batch-all-objects", "--batch-check=%(objectname)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(r.stdout.split())


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- the statement


def test_statement_is_the_servers_format(setup: Setup, tmp_path: Path) -> None:
    """StateRepo's `git tag -s` statement is what state/statement.py parses and verifies."""
    sha = setup.repo.commit("first")
    raw = subprocess.run(
        ["git", "-C", str(setup.repo.bare), "cat-file", "tag", "refs/mailstate/accepted"],
        capture_output=True,
        check=True,
    ).stdout
    st = server_verify_statement(raw, setup.signers)
    assert st.head == sha and server_parse_statement(raw).issued_at == st.issued_at


def test_git_tag_s_and_the_server_write_the_same_bytes(setup: Setup) -> None:
    """ed25519 signatures are deterministic: the server's statement for (head, time, key) is
    byte for byte the tag `git tag -s` makes, so either can stand in for the other."""
    sha = setup.repo.commit("first", statement=False)
    tag = setup.repo.publish_statement(sha, issued_at=1767225600)
    raw = subprocess.run(
        ["git", "-C", str(setup.repo.bare), "cat-file", "tag", tag], capture_output=True, check=True
    ).stdout
    payload = server_statement_payload(sha, 1767225600)
    assert raw == payload + SshKeygenSigner(setup.key.private).sign(payload).encode()


def test_no_statement_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    setup.repo.commit("signed but never stated accepted", statement=False)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED
    assert "no accepted-head statement" in r.stderr
    assert not (setup.root / "current").exists()


def test_a_commit_on_main_without_a_statement_is_never_downloaded(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    bad = setup.repo.commit("pushed to main, refused by the server: no statement", statement=False)
    r = setup.tick()
    assert r.returncode == EXIT_OK and f"up to date at {good[:12]}" in r.stderr
    assert setup.current() == good
    assert bad not in _objects(setup.root)


def test_statement_by_an_admin_key_is_refused(setup: Setup, tmp_path: Path) -> None:
    """An admin key may sign commits, never statements: only principal `mailstate` states."""
    admin = make_signing_key(tmp_path / "keys", "admin")
    (setup.signers).write_text(
        setup.key.allowed_signers_line() + "\n" + admin.allowed_signers_line("admin@example.org") + "\n"
    )
    two_domains(setup.repo)
    good = setup.repo.commit("first")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("new@example.com", "new-password")
    setup.repo.commit("admin commit, admin statement", key=admin, push=False)
    setup.repo.push(git(setup.repo.work, "rev-parse", "HEAD"), statement_key=admin)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr
    assert setup.current() == good
    # the admin's commit itself is fine: once a server states it, it applies
    setup.repo.publish_statement(git(setup.repo.work, "rev-parse", "HEAD"))
    assert setup.tick().returncode == EXIT_OK
    assert setup.current() != good


def test_statement_by_an_untrusted_key_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit("first", statement=False)
    setup.repo.publish_statement(sha, key=setup.untrusted)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr
    # the same statement again: the same verdict, nothing downloaded or written
    before = snapshot(setup.root)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr
    assert snapshot(setup.root) == before


def test_statement_whose_fields_disagree_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit("first", statement=False)
    other = setup.repo.commit("second", statement=False)
    env = {
        **os.environ,
        "GIT_COMMITTER_NAME": "mailstate",
        "GIT_COMMITTER_EMAIL": "mailstate@localhost",
        "GIT_COMMITTER_DATE": "1700000000 +0000",
    }
    message = f"mailstate accepted head {sha[:12]}\n\nAccepted-Head: {other}\nIssued-At: 1700000000\n"  # object is sha
    base = ["git", "-C", str(setup.repo.work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={setup.key.private}"]
    subprocess.run(
        [*base, "tag", "-s", "-f", "-m", message, "mailstate-accepted", sha], check=True, env=env, capture_output=True
    )
    git(
        setup.repo.work,
        "push",
        "-q",
        "-f",
        str(setup.repo.bare),
        "refs/tags/mailstate-accepted:refs/mailstate/accepted",
    )
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "fields disagree" in r.stderr


def test_issued_at_is_kept_and_a_refreshed_statement_rebuilds_nothing(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit("first")
    assert setup.tick().returncode == EXIT_OK
    st = setup.state()["statement"]
    assert st["head"] == sha and isinstance(st["issued_at"], int)
    releases = snapshot(setup.root / "releases")
    reloads = setup.reloads()
    setup.repo.publish_statement(sha, issued_at=st["issued_at"] + 60)  # the server's periodic refresh
    r = setup.tick()
    assert r.returncode == EXIT_OK and f"up to date at {sha[:12]}" in r.stderr
    assert setup.state()["statement"]["issued_at"] == st["issued_at"] + 60
    assert snapshot(setup.root / "releases") == releases and setup.reloads() == reloads


def test_after_a_refusal_the_next_statement_applies(setup: Setup) -> None:
    """A node is never stuck behind a correction: the server states a commit that descends from
    the refused one (a revert), and the node moves forward."""
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    passwd.write_text(passwd.read_text().replace("{BLF-CRYPT}", "{PLAIN}x", 1))
    setup.repo.commit("hand-edited, signed, and (wrongly) stated", write=False)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and setup.current() == good
    setup.repo.set_mailbox("new@example.com", "new-password")
    fixed = setup.repo.commit("correction on top")
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == fixed and "refused" not in setup.state()


# --------------------------------------------------------------------------- limits: disk and memory


def test_a_refused_48_mib_blob_does_not_stay_in_the_mirror(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    before = _objects(setup.root)
    (setup.repo.work / "junk.bin").write_bytes(os.urandom(48 * MiB))
    setup.repo.commit("unsigned, 48 MiB", sign=False, write=False)
    blob = git(setup.repo.work, "rev-parse", "HEAD:junk.bin")
    r = setup.tick(setup.config(limits__max_fetch_mb="100"))
    assert r.returncode == EXIT_REFUSED and "is not signed" in r.stderr
    assert setup.current() == good
    assert blob not in _objects(setup.root) and _objects(setup.root) == before
    assert _du(setup.root / "mirror.git") < 4 * MiB
    assert not (setup.root / "mirror.git" / "quarantine").exists()


def test_a_fetch_over_max_fetch_mb_is_stopped_and_discarded(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    (setup.repo.work / "big.bin").write_bytes(os.urandom(6 * MiB))
    big = setup.repo.commit("signed, stated, 6 MiB", write=False)
    r = setup.tick(setup.config(limits__max_fetch_mb="2"))
    assert r.returncode == EXIT_REFUSED and "max_fetch_mb = 2 MiB" in r.stderr
    assert setup.current() == good and big not in _objects(setup.root)
    assert _du(setup.root / "mirror.git") < 4 * MiB
    # with room for it, the same statement applies (the verdict depended on the limit)
    r = setup.tick(setup.config(limits__max_fetch_mb="64"))
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == big


def test_an_oversized_rendered_file_is_refused_unread(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    passwd = setup.repo.work / "rendered/domains/ex/example.com/passwd"
    line = passwd.read_text().splitlines()[0]
    passwd.write_text(passwd.read_text() + (line + "\n") * (2 * MiB // len(line)))
    setup.repo.commit("2 MiB passwd", write=False)
    r = setup.tick(setup.config(limits__max_file_mb="1"))
    assert r.returncode == EXIT_REFUSED
    assert "rendered/domains/ex/example.com/passwd weighs 2.0 MiB, more than [limits] max_file_mb = 1" in r.stderr
    assert setup.current() == good


def _big_state(repo: StateRepo, n: int, hash_: str) -> None:
    """n mailboxes in one domain, written straight into rendered/ (the node reads nothing else)."""
    base = repo.work / "rendered/domains/bi/big.example"
    base.mkdir(parents=True, exist_ok=True)
    locals_ = [f"u{i:07d}" for i in range(n)]
    with open(base / "passwd", "w") as fh:
        for local in locals_:
            fh.write(
                f"{local}@big.example:{hash_}:5000:5000::/var/vmail/big.example/{local}::userdb_quota_rule=*:storage=1024M\n"
            )
    with open(base / "virtual_mailbox_maps", "w") as fh:
        for local in locals_:
            fh.write(f"{local}@big.example big.example/{local}/\n")
    (base / "virtual_mailbox_domains").write_text("big.example OK\n")


def test_a_64_mib_passwd_file_is_validated_in_bounded_memory(setup: Setup, tmp_path: Path) -> None:
    """Streaming: the agent's peak RSS stays far below the 255 MB a whole-file read took."""
    setup.repo.set_mailbox("info@example.com", "info-password")
    hash_ = setup.repo.domains["example.com"]["info"].password_hash
    setup.repo.write_tree()
    line = (
        f"u0000000@big.example:{hash_}:5000:5000::/var/vmail/big.example/u0000000::userdb_quota_rule=*:storage=1024M\n"
    )
    n = 64 * MiB // len(line) + 1  # a 64 MiB passwd-file
    _big_state(setup.repo, n, hash_)
    sha = setup.repo.commit("64 MiB passwd", write=False)
    size = (setup.repo.work / "rendered/domains/bi/big.example/passwd").stat().st_size
    assert size >= 64 * MiB
    cfg = setup.config(limits__max_file_mb="80", limits__max_fetch_mb="200", services__map_type="texthash")
    # getrusage survives execve, so a child exec'd from this (big) test process would report this
    # process's peak: the wrapper forks a fresh child and runs the zipapp inside it instead.
    wrapper = (
        "import os, resource, runpy, sys\n"
        "script, cfg = sys.argv[1], sys.argv[2]\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.argv = [script, '--config', cfg, '--once']\n"
        "    code = 0\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        code = e.code if isinstance(e.code, int) else 1\n"
        "    os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).encode())\n"
        "    os._exit(code)\n"
        "os.close(w)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('peak-rss-kib', os.read(r, 64).decode(), file=sys.stderr)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", wrapper, str(pi_pull_script()), str(cfg)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == sha
    peak_mib = int(r.stderr.split("peak-rss-kib")[1].split()[0]) / 1024
    print(f"pi-pull peak RSS for a {size / MiB:.0f} MiB passwd-file ({n} lines): {peak_mib:.0f} MiB")
    assert peak_mib < 64, r.stderr
    manifest = json.loads((setup.root / "current" / "MANIFEST.json").read_text())
    assert manifest["mailboxes"] == n + 1


def test_a_statement_of_unrelated_history_is_a_rollback(setup: Setup, tmp_path: Path) -> None:
    """A statement of unrelated history (another repo's) is a rollback; the node stays."""
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    other = StateRepo(tmp_path / "other", setup.key)
    other.set_mailbox("info@example.com", "hijack-password")
    sha = other.commit("unrelated root")
    git(setup.repo.work, "fetch", "--quiet", str(other.bare), "main")
    setup.repo.push(sha)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "does not descend" in r.stderr
    assert setup.current() == good
    assert sha not in _objects(setup.root)


def test_publish_statement_helper_forces_the_ref(tmp_path: Path) -> None:
    key = make_signing_key(tmp_path / "k", "server")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    repo = StateRepo(tmp_path / "r", key)
    a = repo.commit("a")
    b = repo.commit("b")
    tag = publish_statement(repo.work, repo.bare, a, key)
    raw = subprocess.run(
        ["git", "-C", str(repo.bare), "cat-file", "tag", "refs/mailstate/accepted"], capture_output=True, check=True
    ).stdout
    assert git(repo.bare, "rev-parse", "refs/mailstate/accepted") == tag
    assert server_verify_statement(raw, signers).head == a != b


def test_an_older_agents_mirror_loses_its_fetched_tip(setup: Setup) -> None:
    """An agent before statements kept whatever it fetched at refs/pi-pull/tip, refused or not:
    the first tick of this one drops that ref and the objects only it reached."""
    two_domains(setup.repo)
    setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    bad = setup.repo.commit("unsigned, never stated", sign=False, statement=False)
    mirror = setup.root / "mirror.git"
    subprocess.run(
        ["git", "--git-dir", str(mirror), "fetch", "-q", str(setup.repo.bare), "+refs/heads/main:refs/pi-pull/tip"],
        check=True,
    )
    assert bad in _objects(setup.root)
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert bad not in _objects(setup.root)
    refs = subprocess.run(
        ["git", "--git-dir", str(mirror), "for-each-ref", "--format=%(refname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert refs == ["refs/pi-pull/accepted", "refs/pi-pull/applied"]
