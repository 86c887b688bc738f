"""Every commit verified, admin key rotation and freshness on the node, and on server adoption.

Real git repos, real ssh-keygen signatures, the built pi_pull.py as a subprocess; the server
side through a real data dir's store (conftest's `mail_store`).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mailstate.state.chain import range_problems
from mailstate.state.keyrotation import endorsement_payload, sign_endorsement
from mailstate.state.signing import Ed25519Signer
from mailstate.state.statement import parse_statement as server_parse_statement
from mailstate.state.statement import statement_payload
from tests.helpers.common import PROJECT_A
from tests.helpers.mailnode import SigningKey, git, make_signing_key
from tests.helpers.pipull import Setup, two_domains

pytestmark = pytest.mark.e2e

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_STALE = 0, 1, 3, 5


def _stamp(ts: int) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(ts))


def _commit_at(setup: Setup, message: str, key: SigningKey | None, when: int, *, statement: bool = True) -> str:
    """A commit of the work tree signed by `key` (None: unsigned) with committer time `when`."""
    repo = setup.repo
    repo.write_tree()
    git(repo.work, "add", "-A")
    env = {**os.environ, "GIT_COMMITTER_DATE": f"{when} +0000", "GIT_AUTHOR_DATE": f"{when} +0000"}
    args = ["git", "-C", str(repo.work)]
    if key is not None:
        args += ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key.private}", "commit", "-S"]
    else:
        args += ["commit"]
    subprocess.run([*args, "--quiet", "--allow-empty", "-m", message], check=True, env=env, capture_output=True)
    sha = git(repo.work, "rev-parse", "HEAD")
    repo.push(sha, statement=statement)
    return sha


# --------------------------------------------------------------------------- every commit verified (node)


def test_an_unsigned_commit_under_a_trusted_tip_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    hidden = setup.repo.commit("unsigned, in the middle", sign=False, statement=False)
    setup.repo.set_mailbox("cover@example.com", "cover-password")
    tip = setup.repo.commit("trusted tip on top")
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED, r.stderr
    assert f"commit {hidden[:12]} (between applied {good[:12]} and tip {tip[:12]}) is not signed" in r.stderr
    assert setup.current() == good


def test_an_untrusted_commit_under_a_trusted_tip_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("evil@example.com", "evil-password")
    hidden = setup.repo.commit("untrusted key, in the middle", key=setup.untrusted, statement=False)
    setup.repo.commit("trusted tip on top")
    r = setup.tick()
    assert (
        r.returncode == EXIT_REFUSED
        and f"commit {hidden[:12]}" in r.stderr
        and "not signed by a trusted key" in r.stderr
    )
    assert setup.current() == good


def test_a_signed_range_applies_and_a_first_apply_checks_the_tip(setup: Setup) -> None:
    """A first apply verifies the tip only (the history under it never goes live on this node:
    pipull/chain.py); later ticks verify every commit since the applied one."""
    two_domains(setup.repo)
    setup.repo.commit("unsigned root, before this node existed", sign=False, statement=False)
    setup.repo.set_mailbox("a@example.com", "a-password")
    first = setup.repo.commit("first")
    assert setup.tick().returncode == EXIT_OK and setup.current() == first
    for i in range(5):
        setup.repo.set_mailbox(f"u{i}@example.com", "u-password")
        tip = setup.repo.commit(f"change {i}", statement=i == 4)
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == tip


# --------------------------------------------------------------------------- admin key rotation (node)


def _admin_setup(setup: Setup, tmp_path: Path, admin_options: str = "") -> SigningKey:
    admin = make_signing_key(tmp_path / "admin-keys", "admin")
    opts = f'namespaces="git"{admin_options}'
    setup.signers.write_text(
        setup.key.allowed_signers_line() + "\n" + f"admin@example.org {opts} {admin.public_line}\n"
    )
    return admin


def test_an_admin_key_removed_from_allowed_signers_signs_nothing_after(setup: Setup, tmp_path: Path) -> None:
    admin = _admin_setup(setup, tmp_path)
    two_domains(setup.repo)
    setup.repo.commit("server commit")
    setup.repo.set_mailbox("a1@example.com", "pw")
    a1 = setup.repo.commit("admin commit while trusted", key=admin, statement=False)
    setup.repo.publish_statement(a1)
    assert setup.tick().returncode == EXIT_OK and setup.current() == a1
    # the admin leaves: their line is removed from the node's allowed_signers
    setup.signers.write_text(setup.key.allowed_signers_line() + "\n")
    setup.repo.set_mailbox("a2@example.com", "pw")
    a2 = setup.repo.commit("admin commit after removal", key=admin, statement=False)
    setup.repo.set_mailbox("s@example.com", "pw")
    setup.repo.commit("server commit on top")
    r = setup.tick()
    assert (
        r.returncode == EXIT_REFUSED and f"commit {a2[:12]}" in r.stderr and "not signed by a trusted key" in r.stderr
    )
    assert setup.current() == a1
    # the server's own history, without the removed key's new commit, applies
    git(setup.repo.work, "reset", "--quiet", "--hard", a1)
    setup.repo.remove_mailbox("a2@example.com")
    fixed = setup.repo.commit("server commit on the last good one")
    assert setup.tick().returncode == EXIT_OK and setup.current() == fixed


def test_an_admin_key_with_valid_before_signs_nothing_dated_after_and_cannot_backdate(
    setup: Setup, tmp_path: Path
) -> None:
    now = int(time.time())
    retired_at = now - 3600
    admin = _admin_setup(setup, tmp_path, f',valid-before="{_stamp(retired_at)}"')
    two_domains(setup.repo)
    base = _commit_at(setup, "server commit, two hours ago", setup.key, now - 7200)
    assert setup.tick().returncode == EXIT_OK
    # signed before valid-before: good (verified at its committer time)
    setup.repo.set_mailbox("early@example.com", "pw")
    early = _commit_at(setup, "admin commit before retirement", admin, retired_at - 60)
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == early != base
    # signed after: refused
    setup.repo.set_mailbox("late@example.com", "pw")
    late = _commit_at(setup, "admin commit after retirement", admin, now)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and f"commit {late[:12]}" in r.stderr and "expired" in r.stderr, r.stderr
    assert setup.current() == early
    # backdated below valid-before, on top of a newer server commit: refused (time goes backwards)
    git(setup.repo.work, "reset", "--quiet", "--hard", early)
    setup.repo.remove_mailbox("late@example.com")
    setup.repo.set_mailbox("s@example.com", "pw")
    _commit_at(setup, "server commit now", setup.key, now, statement=False)
    setup.repo.set_mailbox("sneaky@example.com", "pw")
    sneaky = _commit_at(setup, "retired admin, backdated", admin, retired_at - 30)
    r = setup.tick()
    assert (
        r.returncode == EXIT_REFUSED and f"commit {sneaky[:12]}" in r.stderr and "dated before its parent" in r.stderr
    ), r.stderr
    assert setup.current() == early


def test_a_commit_dated_in_the_future_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    setup.repo.set_mailbox("f@example.com", "pw")
    future = _commit_at(setup, "from the future", setup.key, int(time.time()) + 86400)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and f"commit {future[:12]}" in r.stderr and "in the future" in r.stderr
    assert setup.current() == good


# --------------------------------------------------------------------------- freshness (node)


def test_a_stale_statement_keeps_serving_and_exits_5_then_recovers(setup: Setup) -> None:
    two_domains(setup.repo)
    good = setup.repo.commit("good")
    assert setup.tick().returncode == EXIT_OK
    cfg = setup.config(freshness__max_staleness="60")
    # a frozen feed: the host keeps serving a statement issued long ago
    setup.repo.publish_statement(good, issued_at=int(time.time()) - 600)
    r = setup.tick(cfg)
    assert r.returncode == EXIT_OK, r.stderr  # older than the kept one: a replay, the kept one is still fresh
    setup.repo.set_mailbox("new@example.com", "pw")
    new = setup.repo.commit("new, but stated with an old Issued-At", statement=False)
    setup.repo.publish_statement(new, issued_at=int(time.time()) - 600)
    r = setup.tick(cfg)
    assert r.returncode == EXIT_STALE and setup.current() == good, (
        r.stderr
    )  # an old statement never brings a commit live
    # now the kept statement itself grows old
    st = setup.state()
    st["statement"]["issued_at"] = int(time.time()) - 120
    (setup.root / "state.json").write_text(__import__("json").dumps(st))
    r = setup.tick(cfg)
    assert r.returncode == EXIT_STALE, r.stderr
    assert "stale:" in r.stderr and "max_staleness = 60" in r.stderr and setup.current() == good
    assert setup.state()["last_status"] == "stale"
    # the same old statement again (a git host that keeps serving an old tip): still stale
    assert setup.tick(cfg).returncode == EXIT_STALE
    # the remote unreachable: the kept statement decides, still stale, still serving
    r = setup.tick(setup.config(freshness__max_staleness="60", remote__url=str(setup.tmp / "gone.git")))
    assert r.returncode == EXIT_STALE and "failed" in r.stderr and setup.current() == good
    # with a longer max_staleness the same failure is a plain error
    r = setup.tick(setup.config(remote__url=str(setup.tmp / "gone.git")))
    assert r.returncode == EXIT_ERROR
    # recovery: a fresh statement applies, ok
    setup.repo.publish_statement(new)
    r = setup.tick(setup.config(freshness__max_staleness="60"))
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == new and setup.state()["last_status"] == "ok"


def test_a_statement_issued_in_the_future_is_refused(setup: Setup) -> None:
    two_domains(setup.repo)
    sha = setup.repo.commit("first", statement=False)
    setup.repo.publish_statement(sha, issued_at=int(time.time()) + 3600)
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "in the future" in r.stderr
    assert setup.current() is None


# --------------------------------------------------------------------------- the statement format, both sides


def test_node_and_server_parse_the_same_statement_with_endorsements(pipull: Any, tmp_path: Path) -> None:
    old = make_signing_key(tmp_path, "old")
    new = make_signing_key(tmp_path, "new")
    e1 = sign_endorsement(
        old.private,
        endorsement_payload(" ".join(old.public_line.split()[:2]), " ".join(new.public_line.split()[:2]), 1767225600),
    )
    payload = statement_payload("a" * 40, 1767225700, (e1,))
    raw = payload + Ed25519Signer(new.private).sign(payload).encode()
    server = server_parse_statement(raw)
    node = pipull.statement.parse_statement("t" * 40, raw)
    assert (server.head, server.issued_at, server.payload, server.endorsements) == (
        node.head,
        node.issued_at,
        node.payload,
        node.endorsements,
    )
    assert node.endorsements == (e1,)
    parsed = pipull.trust.parse_endorsement(e1)
    assert parsed.issued_at == 1767225600 and parsed.new_key == " ".join(new.public_line.split()[:2])


# --------------------------------------------------------------------------- server adoption


def _push_on_top(data_dir: Any, tmp_path: Path, commits: list[tuple[str, Path | None, int | None]]) -> list[str]:
    """Clone the data dir's repo, make each (message, key or None, committer time) commit, push to main."""
    work = tmp_path / "work"
    if not work.exists():
        subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    shas = []
    for i, (message, key, when) in enumerate(commits):
        (work / "README.md").write_text(f"{message} {i} {time.time()}\n")
        subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
        env = {**os.environ, **({"GIT_COMMITTER_DATE": f"{when} +0000"} if when else {})}
        signing = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S"] if key else ["commit"]
        subprocess.run(
            ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", *signing, "-qm", message],
            check=True,
            env=env,
        )
        shas.append(git(work, "rev-parse", "HEAD"))
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:main"], check=True)
    return shas


def test_the_server_refuses_an_unsigned_commit_under_a_signed_tip(
    mail_store: Any, data_dir: Any, tmp_path: Path
) -> None:
    good = mail_store.head
    hidden, tip = _push_on_top(
        data_dir, tmp_path, [("unsigned, in the middle", None, None), ("signed by the server key", data_dir.key, None)]
    )
    assert mail_store.watch()
    assert mail_store.head == good
    problem = mail_store.upstream_problem
    assert problem is not None and problem["commit"] == tip
    assert f"commit {hidden[:12]}" in problem["problems"][0] and "not signed by a trusted key" in problem["problems"][0]
    # a later write through the store replaces the refused commits (the node never sees them)
    mail_store.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": "another password"})
    assert git(data_dir.repo, "rev-parse", "main^") == good


def test_the_server_adopts_a_signed_range_and_honours_admin_valid_before(
    mail_store: Any, data_dir: Any, tmp_path: Path
) -> None:
    admin = make_signing_key(tmp_path / "admin", "admin")
    now = int(time.time())
    retired_at = now - 3600
    with open(data_dir.allowed_signers, "a") as fh:
        fh.write(f'admin@example.org namespaces="git",valid-before="{_stamp(retired_at)}" {admin.public_line}\n')
    parent_time = int(
        subprocess.run(
            ["git", "-C", str(data_dir.repo), "log", "-1", "--format=%ct", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    before = max(parent_time, retired_at - 1800)
    shas = _push_on_top(
        data_dir, tmp_path, [("admin, before retirement", admin.private, before), ("server", data_dir.key, before + 1)]
    )
    assert mail_store.watch() and mail_store.upstream_problem is None and mail_store.head == shas[-1]
    # after valid-before: refused
    (late,) = _push_on_top(data_dir, tmp_path, [("admin, after retirement", admin.private, now)])
    assert mail_store.watch()
    problem = mail_store.upstream_problem
    assert (
        problem is not None
        and f"commit {late[:12]}" in problem["problems"][0]
        and "not signed by a trusted key" in problem["problems"][0]
    )
    assert mail_store.head == shas[-1]
    # and the range check says the same for a backdated one on top of a later commit
    assert (
        "dated before its parent"
        in range_problems(
            data_dir.repo, shas[-1], _backdated(data_dir, tmp_path, admin, before - 5), data_dir.allowed_signers
        )[0]
    )


def _backdated(data_dir: Any, tmp_path: Path, admin: SigningKey, when: int) -> str:
    work = tmp_path / "work"
    subprocess.run(
        ["git", "-C", str(work), "reset", "-q", "--hard", git(data_dir.repo, "rev-parse", "main")], check=True
    )
    (work / "README.md").write_text("backdated\n")
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    env = {**os.environ, "GIT_COMMITTER_DATE": f"{when} +0000"}
    subprocess.run(["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", "-c", "gpg.format=ssh",
                    "-c", f"user.signingkey={admin.private}", "commit", "-S", "-qm", "backdated"], check=True, env=env)  # fmt: skip
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:refs/heads/side"], check=True)
    return git(work, "rev-parse", "HEAD")


def test_freshness_config_is_checked(setup: Setup) -> None:
    for key, value in (("max_staleness", "-1"), ("clock_skew", "100000"), ("max_staleness", "soon")):
        r = setup.tick(setup.config(**{f"freshness__{key}": value}))
        assert r.returncode == 2 and f"[freshness] {key}" in r.stderr, r.stderr


# --------------------------------------------------------------------------- server key rotation (node, a chain of them)


def _pub(key: SigningKey) -> str:
    return " ".join(key.public_line.split()[:2])


def _state_with_endorsements(setup: Setup, sha: str, signer: SigningKey, endorsements: tuple[bytes, ...]) -> str:
    """Write a statement of `sha` carrying `endorsements`, signed by `signer`, at the remote's statement ref."""
    payload = statement_payload(sha, int(time.time()), endorsements)
    raw = payload + Ed25519Signer(signer.private).sign(payload).encode()
    argv = ["git", "-C", str(setup.repo.bare), "hash-object", "-t", "tag", "-w", "--stdin"]
    tag = subprocess.run(argv, input=raw, capture_output=True, check=True).stdout.decode().strip()
    git(setup.repo.bare, "update-ref", "refs/mailstate/accepted", tag)
    return tag


def test_a_node_offline_through_two_rotations_follows_the_chain(setup: Setup, tmp_path: Path) -> None:
    a = setup.key  # provisioned
    b = make_signing_key(tmp_path / "rot", "b")
    c = make_signing_key(tmp_path / "rot", "c")
    x = make_signing_key(tmp_path / "rot", "x")
    now = int(time.time())
    two_domains(setup.repo)
    first = _commit_at(setup, "signed by A", a, now - 30)
    assert setup.tick().returncode == EXIT_OK
    provisioned = setup.signers.read_text()
    a_to_b = sign_endorsement(a.private, endorsement_payload(_pub(a), _pub(b), now - 20))
    b_to_c = sign_endorsement(b.private, endorsement_payload(_pub(b), _pub(c), now - 10))
    # commits by B then C (dated after their rotation), stated by C with both endorsements
    setup.repo.set_mailbox("b@example.com", "pw")
    _commit_at(setup, "signed by B", b, now - 15, statement=False)
    setup.repo.set_mailbox("c@example.com", "pw")
    tip = _commit_at(setup, "signed by C", c, now, statement=False)
    # without the endorsements C is a stranger
    _state_with_endorsements(setup, tip, c, ())
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr and setup.current() == first
    # an endorsement by a key the node never trusted teaches nothing
    x_to_c = sign_endorsement(x.private, endorsement_payload(_pub(x), _pub(c), now - 5))
    _state_with_endorsements(setup, tip, c, (x_to_c,))
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and setup.current() == first and not (setup.root / "trust.json").exists()
    # the chain A -> B -> C: learned in order, and the range signed by B and C applies
    _state_with_endorsements(setup, tip, c, (a_to_b, b_to_c))
    r = setup.tick()
    assert r.returncode == EXIT_OK, r.stderr
    assert setup.current() == tip and r.stderr.count("learned server key") == 2
    trust = __import__("json").loads((setup.root / "trust.json").read_text())
    assert [e["key"] for e in trust["learned"]] == [_pub(b), _pub(c)]
    assert set(trust["retired"]) == {_pub(a).split()[1], _pub(b).split()[1]}
    assert setup.signers.read_text() == provisioned
    effective = (setup.root / "allowed_signers.effective").read_text()
    assert f'valid-before="{_stamp(now - 20)}"' in effective and f'valid-before="{_stamp(now - 10)}"' in effective
    # the retired A can neither sign a statement nor endorse another key any more
    a_to_x = sign_endorsement(a.private, endorsement_payload(_pub(a), _pub(x), now - 1))
    setup.repo.set_mailbox("x@example.com", "pw")
    forged = setup.repo.commit("signed by X", key=x, statement=False)
    _state_with_endorsements(setup, forged, x, (a_to_b, b_to_c, a_to_x))
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr and setup.current() == tip
    _state_with_endorsements(setup, forged, a, ())
    r = setup.tick()
    assert r.returncode == EXIT_REFUSED and "not signed by a server key" in r.stderr and setup.current() == tip


def test_another_server_follows_a_key_rotation_through_upstream(tmp_path: Path) -> None:
    """Upstream mode: server A rotates its key; B refuses nothing, learns A's new key from the
    endorsement in A's statement on upstream, and retires A's old key in its allowed_signers."""
    from mailstate.state.datadir import init_data_dir, open_store
    from mailstate.state.keyrotation import rotate_key
    from mailstate.state.models import Settings
    from tests.helpers.common import ADMIN, FakeClock

    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    a = init_data_dir(tmp_path / "a", Settings(bcrypt_cost=4), clock=FakeClock())
    b = init_data_dir(tmp_path / "b", Settings(bcrypt_cost=4), clock=FakeClock())
    trusted = a.allowed_signers.read_text() + b.allowed_signers.read_text()
    for dd in (a, b):
        dd.allowed_signers.write_text(trusted)
    sa = open_store(a.root, upstream=str(up))
    sb = open_store(b.root, upstream=str(up))
    sa.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    assert sb.sync() is None and sb.head == sa.head
    old, new = rotate_key(a.root)
    sa.execute("enable-email", PROJECT_A, {"domain": "example.com"})  # signed by A's new key
    assert sb.sync() is None, sb.upstream_problem
    assert sb.head == sa.head
    signers = b.allowed_signers.read_text()
    assert new.split()[1] in signers
    assert "valid-before=" in next(line for line in signers.splitlines() if old.split()[1] in line)
    # a key nobody endorsed is still refused
    stranger = make_signing_key(tmp_path / "s", "stranger")
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(up), str(work)], check=True)
    (work / "README.md").write_text("stranger\n")
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", "-c", "gpg.format=ssh",
                    "-c", f"user.signingkey={stranger.private}", "commit", "-S", "-qm", "stranger"], check=True)  # fmt: skip
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True)
    problem = sb.sync()
    assert problem is not None and "not signed by a trusted key" in problem["problems"][0]


def test_the_server_never_dates_a_commit_before_its_parent(mail_store: Any, data_dir: Any, tmp_path: Path) -> None:
    """conftest's store runs on a clock months behind; on top of a commit dated now (an admin's),
    its next commit takes the parent's time, so nodes never see a time going backwards."""
    later = int(time.time()) + 60  # within the skew nodes allow
    (admin_commit,) = _push_on_top(data_dir, tmp_path, [("signed now", data_dir.key, later)])
    assert mail_store.watch() and mail_store.head == admin_commit
    mail_store.execute("add-user", PROJECT_A, {"email": "after@example.com", "password": "another password"})
    times = git(data_dir.repo, "log", "-2", "--format=%ct", "main").split()
    assert times == [str(later), str(later)]
    assert range_problems(data_dir.repo, admin_commit, mail_store.head, data_dir.allowed_signers) == []
