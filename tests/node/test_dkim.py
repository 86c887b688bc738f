"""pi-pull's DKIM keys (pipull/dkim.py) with the real openssl: generation, the pending ->
active -> retired cycle on two selectors, OpenDKIM's tables, and that the private key stays
on the node. The keys are checked with dkimpy: a message signed with the node's private key
verifies against the reported ``p=``.

The tables list the live release's domains in every map layout (the bundle's default of 16
bucketed tables a map, one table a map, other map types): releases built by a real pi-pull
tick from a signed state repo, read back with the real ``postmap -s``."""

from __future__ import annotations

import importlib
import io
import logging
import os
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import dkim
import pytest

from tests.helpers.mailnode import (
    StateRepo,
    age_file,
    make_signing_key,
    require_binaries,
    run_pi_pull,
    write_allowed_signers,
)

pytestmark = pytest.mark.e2e

MESSAGE = b"From: anna@one.example\r\nTo: x@ext.example\r\nSubject: hi\r\n\r\nhello\r\n"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node(pipull: ModuleType, tmp_path: Path) -> dict[str, Any]:
    mod = importlib.import_module("pipull.dkim")
    config = importlib.import_module("pipull.config")
    runner = importlib.import_module("pipull.runner")
    root = tmp_path / "root"
    (root / "releases" / "r1" / "postfix").mkdir(parents=True)
    (root / "releases" / "r1" / "postfix" / "virtual_mailbox_domains").write_text("one.example OK\ntwo.example OK\n")
    (root / "current").symlink_to("releases/r1")
    reloads = tmp_path / "reloads"
    cfg = config.Config(
        remote_url="/nowhere", node_name="mpi01", root=str(root), mail_root="/var/vmail", mail_uid=5000, mail_gid=5000
    )
    cfg.dkim = True
    cfg.dkim_key_dir = str(tmp_path / "dkim")
    cfg.dkim_key_owner = ""
    cfg.dkim_publish_wait = 3600
    cfg.dkim_reload = f"echo reload >> {reloads}"
    buf = io.StringIO()
    log = logging.getLogger(f"test-dkim-{id(tmp_path)}")
    log.addHandler(logging.StreamHandler(buf))
    log.setLevel(logging.DEBUG)
    clock = Clock()
    d = mod.Dkim(cfg, runner.Runner(), log, clock)
    return {
        "mod": mod,
        "dkim": d,
        "clock": clock,
        "cfg": cfg,
        "reloads": reloads,
        "log": buf,
        "dir": Path(cfg.dkim_key_dir),
        "root": root,
    }


def _reloads(n: dict[str, Any]) -> int:
    p: Path = n["reloads"]
    return len(p.read_text().splitlines()) if p.exists() else 0


def _verifies(private: bytes, selector: str, public_b64: str, domain: str = "one.example") -> bool:
    sig = dkim.sign(MESSAGE, selector.encode(), domain.encode(), private, include_headers=[b"from", b"to", b"subject"])
    txt = f"v=DKIM1; k=rsa; p={public_b64}".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt if name == f"{selector}._domainkey.{domain}.".encode() else b""

    return bool(dkim.verify(sig + MESSAGE, dnsfunc=dnsfunc))


def test_first_key_is_pending_and_signs_nothing_until_reported_and_published(node: dict[str, Any]) -> None:
    d, clock = node["dkim"], node["clock"]
    entries = d.step()
    assert [(e["selector"], e["state"]) for e in entries] == [("ms1-mpi01", "pending")]
    key = node["dir"] / "ms1-mpi01.private"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The report entry is the public half only; the p= value verifies a signature made with the private key.
    assert set(entries[0]) == {"selector", "public_key", "state", "created_at"}
    assert "PRIVATE" not in repr(entries) and key.read_bytes().decode() not in repr(entries)
    assert _verifies(key.read_bytes(), "ms1-mpi01", entries[0]["public_key"])
    # Pending: OpenDKIM's tables are empty (nothing signs with an unpublished key).
    assert (node["dir"] / "KeyTable").read_bytes() == b"" and (node["dir"] / "SigningTable").read_bytes() == b""
    # Not reported yet: however long it waits, it stays pending.
    clock.now += 10 * 86400
    assert d.step()[0]["state"] == "pending"
    d.reported(entries)
    clock.now += 3599
    assert d.step()[0]["state"] == "pending"
    clock.now += 1
    entries = d.step()
    assert [(e["selector"], e["state"]) for e in entries] == [("ms1-mpi01", "active")]
    kt = (node["dir"] / "KeyTable").read_text()
    assert kt == f"one.example one.example:ms1-mpi01:{key}\ntwo.example two.example:ms1-mpi01:{key}\n"
    assert (node["dir"] / "SigningTable").read_text() == "*@one.example one.example\n*@two.example two.example\n"
    # The private key never reaches the log.
    assert (
        "BEGIN PRIVATE" not in node["log"].getvalue() and key.read_text().splitlines()[1] not in node["log"].getvalue()
    )


def test_reload_only_when_the_tables_change(node: dict[str, Any]) -> None:
    d = node["dkim"]
    d.reported(d.step())
    node["clock"].now += 3600
    d.step()
    n = _reloads(node)
    d.step()
    d.step()
    assert _reloads(node) == n  # nothing changed: no reload
    # A new release with other domains goes live (as a swap does: releases are never edited).
    (node["root"] / "releases" / "r2" / "postfix").mkdir(parents=True)
    (node["root"] / "releases" / "r2" / "postfix" / "virtual_mailbox_domains").write_text(
        "one.example OK\nthree.example OK\n"
    )
    (node["root"] / "current.tmp").symlink_to("releases/r2")
    (node["root"] / "current.tmp").replace(node["root"] / "current")
    d.step()
    assert _reloads(node) == n + 1
    assert "three.example three.example:ms1-mpi01:" in (node["dir"] / "KeyTable").read_text()
    assert "two.example" not in (node["dir"] / "SigningTable").read_text()


def test_a_failed_reload_is_retried_next_tick(node: dict[str, Any]) -> None:
    d, cfg = node["dkim"], node["cfg"]
    cfg.dkim_reload = "exit 3"
    assert d.step() is None  # logged, not raised: mail keeps flowing
    assert "opendkim reload failed (rc=3)" in node["log"].getvalue()
    cfg.dkim_reload = f"echo reload >> {node['reloads']}"
    assert d.step() is not None
    assert _reloads(node) == 1


def test_rotation_publishes_the_new_key_before_it_signs_and_keeps_the_old_one(node: dict[str, Any]) -> None:
    d, clock = node["dkim"], node["clock"]
    d.reported(d.step())
    clock.now += 3600
    first = d.step()[0]
    assert "new pending key on ms2-mpi01" in d.rotate()
    assert "already holds a pending key" in d.rotate()
    entries = d.step()
    assert [(e["selector"], e["state"]) for e in entries] == [("ms1-mpi01", "active"), ("ms2-mpi01", "pending")]
    assert ":ms1-mpi01:" in (node["dir"] / "KeyTable").read_text()  # still signing with the old key
    d.reported(entries)
    clock.now += 1800
    assert ":ms1-mpi01:" in (node["dir"] / "KeyTable").read_text() and d.step()[1]["state"] == "pending"
    clock.now += 1800
    entries = d.step()
    assert [(e["selector"], e["state"]) for e in entries] == [("ms1-mpi01", "retired"), ("ms2-mpi01", "active")]
    assert entries[0]["public_key"] == first["public_key"]  # the old key stays published
    assert ":ms2-mpi01:" in (node["dir"] / "KeyTable").read_text()
    assert _verifies((node["dir"] / "ms2-mpi01.private").read_bytes(), "ms2-mpi01", entries[1]["public_key"])
    # The next rotation replaces the retired key on ms1 with a new pending one.
    d.rotate()
    entries = d.step()
    assert [(e["selector"], e["state"]) for e in entries] == [("ms1-mpi01", "pending"), ("ms2-mpi01", "active")]
    assert entries[0]["public_key"] != first["public_key"]


def test_rotate_days_rotates_automatically(node: dict[str, Any]) -> None:
    d, clock, cfg = node["dkim"], node["clock"], node["cfg"]
    cfg.dkim_rotate_days = 30
    d.reported(d.step())
    clock.now += 3600
    assert [e["state"] for e in d.step()] == ["active"]
    clock.now += 29 * 86400
    assert [e["state"] for e in d.step()] == ["active"]
    clock.now += 86400
    assert [(e["selector"], e["state"]) for e in d.step()] == [("ms1-mpi01", "active"), ("ms2-mpi01", "pending")]


def test_off_unless_enabled_and_config_checks(node: dict[str, Any], pipull: ModuleType, tmp_path: Path) -> None:
    node["cfg"].dkim = False
    assert node["dkim"].step() is None and not node["dir"].exists()
    config = importlib.import_module("pipull.config")
    errors = importlib.import_module("pipull.errors")
    signers = tmp_path / "allowed_signers"
    signers.write_text("")
    base = f"[remote]\nurl = /x\n[node]\nname = node-1\nallowed_signers = {signers}\n[paths]\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    ini = tmp_path / "pi-pull.ini"
    ini.write_text(base.replace("node-1", "Node_1") + "[dkim]\nenabled = yes\n")
    with pytest.raises(errors.ConfigError, match="lowercase"):
        config.load_config(str(ini))
    ini.write_text(base + "[dkim]\nenabled = yes\nkey_dir = /etc/pi-pull/dkim\npublish_wait = 60\nrotate_days = 90\n")
    cfg = config.load_config(str(ini))
    assert (cfg.dkim, cfg.dkim_publish_wait, cfg.dkim_rotate_days) == (True, 60.0, 90.0)
    assert importlib.import_module("pipull.dkim").Dkim(cfg, None, logging.getLogger("x")).selectors == (
        "ms1-node-1",
        "ms2-node-1",
    )
    for bad, needle in (("publish_wait = -1\n", "publish_wait"), ("rotate_days = -2\n", "rotate_days")):
        ini.write_text(base + "[dkim]\nenabled = yes\n" + bad)
        with pytest.raises(errors.ConfigError) as exc:
            config.load_config(str(ini))
        assert needle in str(exc.value)


def test_openssl_failure_is_a_clear_message(node: dict[str, Any]) -> None:
    node["cfg"].dkim_openssl = "false"
    assert node["dkim"].step() is None
    assert "openssl genpkey failed" in node["log"].getvalue()
    assert not [p for p in os.listdir(node["dir"]) if p.endswith(".private") or ".tmp-" in p]


# --------------------------------------------------------------------------- every map layout

# (map_type, map_buckets): the bundle's default first (compiler/node_bundle.py), then the others.
LAYOUTS = [("hash", 16), ("hash", 0), ("btree", 4), ("texthash", 0)]
HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


class CountingRunner:
    """pipull's Runner (the agent's seam), recording every argv it runs."""

    def __init__(self, runner: Any) -> None:
        self.inner = runner
        self.argvs: list[list[str]] = []

    def run(self, argv: list[str], **kw: Any) -> Any:
        self.argvs.append(list(argv))
        return self.inner.run(argv, **kw)

    def shell(self, command: str, **kw: Any) -> Any:
        return self.inner.shell(command, **kw)

    def postmap_dumps(self) -> int:
        return sum(1 for a in self.argvs if "-s" in a and a[0].endswith("postmap"))


@pytest.fixture
def built(tmp_path: Path, pipull: ModuleType, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A node root whose releases the real pi-pull single file builds from a signed state repo, in
    the layout ``request.param``; ``apply()`` commits the repo and runs one tick."""
    require_binaries("git", "ssh-keygen", "postmap", "openssl")
    map_type, buckets = request.param
    key = make_signing_key(tmp_path / "keys", "trusted")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    etc = tmp_path / "postfix-etc"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = pi-pull.test\n")
    age_file(etc / "main.cf")  # else each postmap waits ~2 s for a "hot" main.cf
    repo = StateRepo(tmp_path / "repo", key, format=2)
    root = tmp_path / "node"
    ini = tmp_path / "pi-pull.ini"
    ini.write_text(
        f"[remote]\nurl = {repo.bare}\n[node]\nname = mpi01\nallowed_signers = {signers}\n"
        f"[paths]\nroot = {root}\nsync = no\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
        f"[services]\npostfix_reload = true\ndovecot_reload = true\nmap_type = {map_type}\n"
        f"postmap = postmap -c {etc}\nmap_buckets = {buckets}\n[lifecycle]\npurge = no\nusage_interval = 0\n"
    )

    def apply() -> None:
        repo.commit()
        r = run_pi_pull(ini)
        assert r.returncode == 0, r.stderr

    config = importlib.import_module("pipull.config")
    cfg = config.load_config(str(ini))
    cfg.dkim = True
    cfg.dkim_key_dir = str(tmp_path / "dkim")
    cfg.dkim_key_owner = ""
    cfg.dkim_publish_wait = 0
    cfg.dkim_reload = "true"
    return {"repo": repo, "root": root, "cfg": cfg, "apply": apply, "buckets": buckets}


def _dkim(pipull: ModuleType, cfg: Any) -> tuple[Any, CountingRunner, io.StringIO]:
    runner = CountingRunner(importlib.import_module("pipull.runner").Runner())
    buf = io.StringIO()
    log = logging.getLogger(f"test-dkim-layout-{id(cfg)}")
    log.handlers = [logging.StreamHandler(buf)]
    log.setLevel(logging.DEBUG)
    return importlib.import_module("pipull.dkim").Dkim(cfg, runner, log, Clock()), runner, buf


@pytest.mark.parametrize("built", LAYOUTS, ids=[f"{t}-{n}" for t, n in LAYOUTS], indirect=True)
def test_the_release_domains_are_listed_in_every_layout(built: dict[str, Any], pipull: ModuleType) -> None:
    release = importlib.import_module("pipull.release")
    runner = importlib.import_module("pipull.runner").Runner()
    repo, cfg, current = built["repo"], built["cfg"], str(built["root"] / "current")
    assert release.release_domains(current, cfg, runner) == []  # nothing applied yet
    for i in range(40):
        repo.set_mailbox(f"u{i}@d{i % 13}.example", password_hash=HASH)
    built["apply"]()
    assert release.release_domains(current, cfg, runner) == sorted(repo.domains)
    version = release.domain_list_version(current)

    repo.set_mailbox("another@d1.example", password_hash=HASH)  # the same domains
    built["apply"]()
    assert release.release_domains(current, cfg, runner) == sorted(repo.domains)
    if built["buckets"]:  # bucketed: only a changed virtual_mailbox_domains table gives a new version
        assert release.domain_list_version(current) == version
    repo.set_mailbox("x@new.example", password_hash=HASH)
    repo.set_email_enabled("d2.example", False)
    built["apply"]()
    assert release.release_domains(current, cfg, runner) == sorted(d for d in repo.domains if d != "d2.example")
    assert release.domain_list_version(current) != version


@pytest.mark.parametrize("built", LAYOUTS[:2], ids=[f"{t}-{n}" for t, n in LAYOUTS[:2]], indirect=True)
def test_opendkim_tables_list_the_live_domains_and_are_listed_again_only_on_change(
    built: dict[str, Any], pipull: ModuleType
) -> None:
    repo, cfg = built["repo"], built["cfg"]
    for name in ("shop.example", "b.example", "c.example"):
        repo.set_mailbox(f"anna@{name}", password_hash=HASH)
    built["apply"]()
    d, runner, log = _dkim(pipull, cfg)
    d.reported(d.step())
    d.clock.now += 1
    d.step()
    key = Path(cfg.dkim_key_dir) / "ms1-mpi01.private"
    assert (Path(cfg.dkim_key_dir) / "KeyTable").read_text() == "".join(
        f"{n} {n}:ms1-mpi01:{key}\n" for n in ("b.example", "c.example", "shop.example")
    )
    assert (
        Path(cfg.dkim_key_dir) / "SigningTable"
    ).read_text() == "*@b.example b.example\n*@c.example c.example\n*@shop.example shop.example\n"
    assert "dkim: signing the mail of 3 domain(s) with ms1-mpi01" in log.getvalue()

    # A tick with nothing new lists nothing; in the bucketed layout neither does a new mailbox.
    dumps = runner.postmap_dumps()
    d.step()
    repo.set_mailbox("bob@shop.example", password_hash=HASH)
    built["apply"]()
    d.step()
    assert runner.postmap_dumps() == dumps
    repo.set_mailbox("anna@d.example", password_hash=HASH)
    built["apply"]()
    d.step()
    assert "d.example d.example:ms1-mpi01:" in (Path(cfg.dkim_key_dir) / "KeyTable").read_text()
    assert runner.postmap_dumps() == dumps + (16 if built["buckets"] else 0)


@pytest.mark.parametrize("built", LAYOUTS[:1], ids=["hash-16"], indirect=True)
def test_the_log_never_says_it_signs_when_the_tables_are_empty(built: dict[str, Any], pipull: ModuleType) -> None:
    repo, cfg = built["repo"], built["cfg"]
    repo.set_email_enabled("empty.example", True)
    repo.set_email_enabled("empty.example", False)  # a commit, but no email-enabled domain
    built["apply"]()
    d, _runner, log = _dkim(pipull, cfg)
    d.reported(d.step())
    assert "nothing is signed: no key is active yet" in log.getvalue()
    d.clock.now += 1
    assert [e["state"] for e in d.step()] == ["active"]
    assert (Path(cfg.dkim_key_dir) / "KeyTable").read_bytes() == b""
    text = log.getvalue()
    assert "ms1-mpi01 is active but the live release lists no domain: tables empty, nothing is signed" in text
    assert "signing with" not in text and "signing the mail" not in text
