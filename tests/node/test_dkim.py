"""pi-pull's DKIM keys (pipull/dkim.py) with the real openssl: generation, the pending ->
active -> retired cycle on two selectors, OpenDKIM's tables, and that the private key stays
on the node. The keys are checked with dkimpy: a message signed with the node's private key
verifies against the reported ``p=``."""

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
    (node["root"] / "releases" / "r1" / "postfix" / "virtual_mailbox_domains").write_text(
        "one.example OK\nthree.example OK\n"
    )
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
