"""The node's side of mailbox owners' settings: pi-pull applies the sieve_scripts and
app_passwords fragments beside its releases (pipull/ownerfiles.py), with the real built
pi_pull.py, real git and real signatures.

tests/vectors/app_password_lines.json holds the node and the server to the same verdicts on an
app_passwords fragment, as test_sieve_vectors.py does for scripts.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.mailnode import StateRepo
from tests.helpers.sieve_vectors import APP, APP_LINES, SCRIPTS, SIEVE, fragment, script_of, text_of
from tests.helpers.sieve_vectors import APP_HASH as HASH
from tests.helpers.vectors import Node, node_repo

EXIT_OK, EXIT_REFUSED = 0, 3


def setup_node(tmp_path: Path) -> tuple[StateRepo, Node]:
    repo, node = node_repo(tmp_path, 2)
    for email in ("info@example.com", "anna@example.com", "bob@other.org"):
        repo.set_mailbox(email, password_hash=HASH)
    return repo, node


def test_every_hostile_app_password_fragment_is_refused_by_the_node(pipull: ModuleType) -> None:
    from pipull.apppass import check_fragment
    from pipull.errors import Refused

    for vec in APP_LINES["valid"]:
        assert check_fragment("example.com", text_of(vec)) == text_of(vec).count(b"\n")
    accepted = []
    for vec in APP_LINES["hostile"]:
        try:
            check_fragment("example.com", text_of(vec))
        except Refused:
            continue
        accepted.append(vec["name"])
    assert not accepted, accepted


@pytest.mark.e2e
def test_every_hostile_app_password_fragment_is_refused_by_the_server(
    mail_store: Store, data_dir: Any, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    accepted = []
    for i, vec in enumerate(APP_LINES["hostile"]):
        subprocess.run([*git, "checkout", "-q", "-f", "origin/main"], check=True)
        (work / APP).write_bytes(text_of(vec))
        subprocess.run([*git, "add", APP], check=True)
        subprocess.run([*git, "commit", "-q", "-S", "--allow-empty", "-m", vec["name"]], check=True)
        subprocess.run([*git, "push", "-q", "origin", f"HEAD:refs/vectors/{i}"], check=True)
        sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
        verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
        if verdict.ok:
            accepted.append(vec["name"])
    assert not accepted, accepted


@pytest.mark.e2e
def test_a_hostile_app_password_fragment_stops_the_commit_on_the_node(tmp_path: Path) -> None:
    repo, node = setup_node(tmp_path)
    repo.extra_files[APP] = text_of(APP_LINES["valid"][0])
    good = repo.commit("good")
    assert node.tick().returncode == EXIT_OK
    for vec in APP_LINES["hostile"][:6]:
        repo.extra_files[APP] = text_of(vec)
        repo.commit(vec["name"])
        r = node.tick()
        assert r.returncode == EXIT_REFUSED and "app_passwords of example.com" in r.stderr, (vec["name"], r.stderr)
        assert node.current() == good
    assert (node.root / "app-passwords" / "example.com").read_bytes() == text_of(APP_LINES["valid"][0])


@pytest.mark.e2e
def test_the_node_keeps_its_owner_files_in_step_with_the_commits(tmp_path: Path) -> None:
    repo, node = setup_node(tmp_path)
    one = script_of(SCRIPTS["valid"][0])
    two = script_of(SCRIPTS["valid"][1]).replace(b"info@example.com", b"anna@example.com")
    repo.extra_files[SIEVE] = fragment(two, "anna") + fragment(one)
    repo.extra_files[APP] = text_of(APP_LINES["valid"][0])
    first = repo.commit("scripts and app passwords")
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert "owners: 2 sieve script(s) and 1 app password file(s) written" in r.stderr
    sieve, apps = node.root / "sieve", node.root / "app-passwords"
    assert (sieve / "example.com" / "anna.sieve").read_bytes() == two
    for local in ("anna", "info"):
        script = sieve / "example.com" / f"{local}.sieve"
        # Ahead of now: a binary Dovecot compiled from the old script meanwhile is older than it.
        assert script.stat().st_mtime > time.time() and oct(script.stat().st_mode & 0o777) == "0o644"
    assert (apps / "example.com").read_bytes() == text_of(APP_LINES["valid"][0])
    # Every other enabled domain has an empty file: Dovecot logs every login for a missing one.
    assert (apps / "other.org").read_bytes() == b""
    assert json.loads((node.root / "owners.json").read_text())["commit"] == first

    # One script changes: only it is written again (the other keeps its inode and binary).
    anna_inode = (sieve / "example.com" / "anna.sieve").stat().st_ino
    changed = one.replace(b'"x"', b'"y"')
    repo.extra_files[SIEVE] = fragment(two, "anna") + fragment(changed)
    repo.commit("one script")
    r = node.tick()
    assert r.returncode == EXIT_OK and "owners: 1 sieve script(s) and 0 app password file(s)" in r.stderr, r.stderr
    assert (sieve / "example.com" / "info.sieve").read_bytes() == changed
    assert (sieve / "example.com" / "anna.sieve").stat().st_ino == anna_inode

    # The app passwords go (to an empty file: its size changes, so Dovecot reads it again), a
    # script goes, and a disabled domain takes its files with it.
    del repo.extra_files[APP]
    repo.extra_files[SIEVE] = fragment(two, "anna")
    repo.set_email_enabled("other.org", False)
    last = repo.commit("less")
    assert node.tick().returncode == EXIT_OK
    assert (apps / "example.com").read_bytes() == b""
    assert not (sieve / "example.com" / "info.sieve").exists()
    assert not (apps / "other.org").exists()
    del repo.extra_files[SIEVE]
    repo.commit("no scripts")
    assert node.tick().returncode == EXIT_OK
    assert not (sieve / "example.com").exists()
    assert last


@pytest.mark.e2e
def test_a_failed_apply_after_the_swap_is_caught_up_later(tmp_path: Path) -> None:
    """The scripts cannot be written (a file where their directory goes): the release is live,
    the tick says owners failed; once that is fixed, the next tick (no new commit) brings the
    scripts up to the applied commit."""
    repo, node = setup_node(tmp_path)
    repo.extra_files[SIEVE] = fragment(script_of(SCRIPTS["valid"][0]))
    sha = repo.commit("a script")
    node.root.mkdir()
    (node.root / "sieve").write_text("in the way\n")
    r = node.tick()
    assert r.returncode != EXIT_OK and "owners:" in r.stderr and "the next tick tries again" in r.stderr, r.stderr
    assert node.current() == sha and json.loads((node.root / "state.json").read_text())["applied_commit"] == sha
    (node.root / "sieve").unlink()
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert (node.root / "sieve" / "example.com" / "info.sieve").read_bytes() == script_of(SCRIPTS["valid"][0])
    assert json.loads((node.root / "owners.json").read_text())["commit"] == sha


def test_app_password_logins_are_read_from_dovecots_stats(pipull: ModuleType) -> None:
    from pipull.apppass import logins, new_uses

    dump = (
        b"metric_name\tfield\tcount\tsum\tmin\tmax\tavg\tmedian\tstddev\t%95\n"
        b"mailstate_app_logins\tduration\t3\t9\t1\t5\t3.00\t3\t1.00\t5\n"
        b"mailstate_app_logins_first_last@example.com\tduration\t3\t9\t1\t5\t3.00\t3\t1.00\t5\n"
        b"mailstate_app_logins_first_last@example.com_mailstate-app-03\tduration\t2\t6\t1\t5\t3.00\t3\t1.00\t5\n"
        b"mailstate_app_logins_info@example.com_mailstate-app-00\tduration\t1\t3\t3\t3\t3.00\t3\t0.00\t3\n"
        b"mailstate_app_logins_evil/../x@example.com_mailstate-app-01\tduration\t1\t3\t3\t3\t3.00\t3\t0.00\t3\n"
    )
    now = logins(dump)
    assert now == {"first_last@example.com 3": 2, "info@example.com 0": 1}
    assert new_uses({}, now) == [("first_last@example.com", 3), ("info@example.com", 0)]
    assert new_uses(now, now) == []  # nothing new
    assert new_uses({"info@example.com 0": 1, "first_last@example.com 3": 1}, now) == [("first_last@example.com", 3)]
    # Dovecot restarted (counts start again): a lower count means it logged in since.
    assert new_uses({"info@example.com 0": 9, "first_last@example.com 3": 2}, now) == [("info@example.com", 0)]


@pytest.mark.e2e
@pytest.mark.parametrize("count", [0, 1])
def test_owner_files_are_not_written_for_a_refused_first_commit(tmp_path: Path, count: int) -> None:
    repo, node = setup_node(tmp_path)
    hostile = SCRIPTS["hostile"][count]
    repo.extra_files[SIEVE] = fragment(script_of(hostile))
    repo.commit("hostile first")
    r = node.tick()
    assert r.returncode == EXIT_REFUSED, r.stderr
    assert not (node.root / "sieve").exists() and not (node.root / "owners.json").exists()


def test_the_node_and_its_validators_name_the_fragments_alike(pipull: ModuleType) -> None:
    from pipull import apppass, ownerfiles, sieve

    from mailstate.compiler import sieve as compiler_sieve

    assert ownerfiles.SIEVE_FRAGMENT == sieve.SIEVE_FRAGMENT == compiler_sieve.SIEVE_FRAGMENT
    assert ownerfiles.APP_FRAGMENT == apppass.APP_FRAGMENT == compiler_sieve.APP_FRAGMENT
