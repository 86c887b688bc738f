"""The node's incremental, time-bounded usage measurement (pi-pull/pipull/usage.py, Scanner).

Real Maildirs in a temp dir; the seams are the scanner's own: ``scandir`` (every listing is
counted), ``now`` (the clock the folders' mtimes are compared with) and ``monotonic`` (the
per-tick budget). Folder mtimes are set with ``os.utime``, so nothing sleeps."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

OLD = 1_700_000_000.0  # mtimes well before the scanner's clock: clean
NOW = OLD + 3600.0


class Seams:
    """Counts os.scandir calls (by path) and drives the budget clock."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.mono = 0.0
        self.per_call = 0.0  # the budget clock advances this much per reading

    def scandir(self, path: str) -> Any:
        self.listed.append(path)
        return os.scandir(path)

    def monotonic(self) -> float:
        self.mono += self.per_call
        return self.mono


def make_home(root: Path, domain: str, local: str, box_id: str, sizes: list[int]) -> Path:
    md = root / domain / f"{local}~{box_id}" / "Maildir"
    for sub in ("cur", "new", "tmp", ".Sent/cur", ".Sent/new", ".Sent/tmp"):
        (md / sub).mkdir(parents=True)
    for k, size in enumerate(sizes):
        (md / "cur" / f"17000000{k:02d}.M{k}P1.host,S={size}:2,S").write_text("")
    (md / ".Sent" / "new" / "1700000099.M9P1.host").write_bytes(b"s" * 7)  # no S=: lstat
    return md


def age(root: Path) -> None:
    """Every directory under root gets an old mtime (as if the last change was long ago)."""
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (OLD, OLD))


BOXES = [("a.example", f"u{i}", f"20261201-{i:06x}") for i in range(6)]


@pytest.fixture
def env(pipull: ModuleType, tmp_path: Path) -> tuple[Path, Path, Seams, Any]:
    mail = tmp_path / "vmail"
    for i, (d, lo, bid) in enumerate(BOXES):
        make_home(mail, d, lo, bid, [100 * (i + 1), 5])
    age(mail)
    seams = Seams()

    def scanner(budget: float = 10.0) -> Any:
        return pipull.usage.Scanner(
            str(mail),
            str(tmp_path / "node" / "usage-cache"),
            budget,
            now=lambda: NOW,
            monotonic=seams.monotonic,
            scandir=seams.scandir,
        )

    return mail, tmp_path / "node" / "usage-cache", seams, scanner


def full_pass(scanner: Any, ls: dict[str, Any]) -> dict[str, tuple[int, int]]:
    out = scanner.step(ls, "c" * 40, lambda: list(BOXES))
    assert "usage_pass" not in ls, "one step with a large budget completes the pass"
    return {str(e["email"]): (int(e["used_bytes"]), int(e["messages"])) for e in out}


def expected(i: int) -> tuple[int, int]:
    return 100 * (i + 1) + 5 + 7, 3


def test_an_unchanged_folder_is_not_listed_again_and_a_delivery_is_picked_up(pipull: ModuleType, env: Any) -> None:
    mail, _cache, seams, scanner = env
    ls: dict[str, Any] = {}
    first = full_pass(scanner(), ls)
    assert first == {f"u{i}@a.example": expected(i) for i in range(6)}
    # each mailbox: its root, cur/new of the INBOX and of .Sent (the same count as the full walk's)
    assert len(seams.listed) == 6 * 5
    assert first == {f"{lo}@{d}": pipull.usage.measure_maildir(str(mail / d / f"{lo}~{bid}")) for d, lo, bid in BOXES}

    seams.listed.clear()
    assert full_pass(scanner(), ls) == first
    assert seams.listed == [], "nothing changed: no listing at all, one lstat per folder"

    # a delivery into u2's new/ (its mtime changes), then u4 reads a message (new/ -> cur/)
    md2 = mail / "a.example" / f"u2~{BOXES[2][2]}" / "Maildir"
    (md2 / "new" / "1700000500.M5P1.host,S=4000").write_text("")
    os.utime(md2 / "new", (OLD + 10, OLD + 10))
    md4 = mail / "a.example" / f"u4~{BOXES[4][2]}" / "Maildir"
    os.rename(md4 / ".Sent" / "new" / "1700000099.M9P1.host", md4 / ".Sent" / "cur" / "1700000099.M9P1.host:2,S")
    os.utime(md4 / ".Sent" / "new", (OLD + 10, OLD + 10))
    os.utime(md4 / ".Sent" / "cur", (OLD + 10, OLD + 10))
    seams.listed.clear()
    got = full_pass(scanner(), ls)
    assert got["u2@a.example"] == (expected(2)[0] + 4000, 4)
    assert got["u4@a.example"] == expected(4)
    assert sorted(seams.listed) == sorted([str(md2 / "new"), str(md4 / ".Sent" / "cur"), str(md4 / ".Sent" / "new")])


def test_a_new_subfolder_is_found_through_the_roots_mtime(env: Any) -> None:
    mail, _cache, seams, scanner = env
    ls: dict[str, Any] = {}
    full_pass(scanner(), ls)
    md = mail / "a.example" / f"u0~{BOXES[0][2]}" / "Maildir"
    for sub in (".Trash/cur", ".Trash/new"):
        (md / sub).mkdir(parents=True)
    (md / ".Trash" / "cur" / "1.M1.h,S=50:2,T").write_text("")
    for p in (md, md / ".Trash", md / ".Trash" / "cur", md / ".Trash" / "new"):
        os.utime(p, (OLD + 20, OLD + 20))
    seams.listed.clear()
    assert full_pass(scanner(), ls)["u0@a.example"] == (expected(0)[0] + 50, 4)
    assert sorted(seams.listed) == sorted([str(md), str(md / ".Trash" / "cur"), str(md / ".Trash" / "new")])


def test_a_folder_changed_within_the_dirty_window_is_listed_again_next_pass(env: Any) -> None:
    mail, _cache, seams, scanner = env
    md = mail / "a.example" / f"u1~{BOXES[1][2]}" / "Maildir"
    os.utime(md / "cur", (NOW - 1, NOW - 1))  # same-second territory: a change may not move the mtime
    ls: dict[str, Any] = {}
    full_pass(scanner(), ls)
    # a message arrives in that same timestamp unit: the mtime stays what it was
    (md / "cur" / "1700000600.M6P1.host,S=900:2,").write_text("")
    os.utime(md / "cur", (NOW - 1, NOW - 1))
    seams.listed.clear()
    assert full_pass(scanner(), ls)["u1@a.example"] == (expected(1)[0] + 900, 4)
    assert seams.listed == [str(md / "cur")]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-types", "removed", "pass-file"])
def test_a_damaged_cache_means_a_full_rescan_with_the_right_figures(env: Any, damage: str) -> None:
    _mail, cache, seams, scanner = env
    ls: dict[str, Any] = {}
    first = full_pass(scanner(), ls)
    shards = sorted(p for p in cache.iterdir() if p.name.startswith("c"))
    assert shards and (cache / "pass").is_file()
    for p in shards:
        if damage == "garbage":
            p.write_bytes(b"\x00\xffnot json")
        elif damage == "truncated":
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        elif damage == "wrong-types":
            # valid JSON, nonsense values: the byte counts are strings, the folders a number
            text = p.read_text().replace('"M",', '"M",1,[["",["x"],"100",1,"-","a",-5]],"extra",')
            p.write_text(text.replace("[[", "7,[[", 1))
        elif damage == "removed":
            p.unlink()
    if damage == "pass-file":
        (cache / "pass").write_text("{not json\n")
        for p in shards:
            p.write_text('{"v":1,"root":"/elsewhere","boxes":{}}')  # another mail root's cache: ignored
    seams.listed.clear()
    assert full_pass(scanner(), ls) == first
    assert len(seams.listed) == 6 * 5


def test_the_budget_stops_the_pass_and_the_next_tick_resumes_it(env: Any) -> None:
    _mail, cache, seams, scanner = env
    seams.per_call = 1.0  # each reading of the budget clock: one second later
    ls: dict[str, Any] = {}
    calls: list[int] = []

    def listing() -> list[tuple[str, str, str]]:
        calls.append(1)
        return list(BOXES)

    seen: list[str] = []
    steps = 0
    while steps < 10:
        steps += 1
        out = scanner(budget=2.0).step(ls, "c" * 40, listing)
        assert 1 <= len(out) <= 2, out  # t0, then one reading per mailbox: stops at 2 s
        seen += [str(e["email"]) for e in out]
        if "usage_pass" not in ls:
            break
        assert isinstance(ls["usage_pass"]["after"], str)
    assert steps >= 3, steps
    assert sorted(seen) == sorted(f"{lo}@{d}" for d, lo, _ in BOXES), "every mailbox exactly once per pass"
    assert calls == [1], "git is read once per pass, not once per tick"
    # a lost pass file mid-pass: listed again, the pass continues after the last one done
    seen.clear()
    out = scanner(budget=2.0).step(ls, "c" * 40, listing)
    seen += [str(e["email"]) for e in out]
    (cache / "pass").unlink()
    while "usage_pass" in ls:
        seen += [str(e["email"]) for e in scanner(budget=2.0).step(ls, "c" * 40, listing)]
    assert sorted(seen) == sorted(f"{lo}@{d}" for d, lo, _ in BOXES)
    assert len(calls) == 3


def test_the_cache_holds_only_the_pass_mailboxes(env: Any) -> None:
    _mail, cache, _seams, scanner = env
    ls: dict[str, Any] = {}
    full_pass(scanner(), ls)
    out = scanner().step(ls, "d" * 40, lambda: BOXES[:2])  # four mailboxes left the release
    assert len(out) == 2 and "usage_pass" not in ls
    import json

    keys = [k for p in cache.iterdir() if p.name.startswith("c") for k in json.loads(p.read_text())["boxes"]]
    assert sorted(k.split("/", 1)[1] for k in keys) == sorted(f"{d}/{lo}~{b}" for d, lo, b in BOXES[:2])


def test_usage_budget_s_is_read_from_the_config_and_must_be_positive(pipull: ModuleType, tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    base = "[remote]\nurl = /x\n[node]\nallowed_signers = s\n[paths]\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    ini.write_text(base)
    assert pipull.config.load_config(str(ini)).usage_budget_s == 2.0
    ini.write_text(base + "[lifecycle]\nusage_budget_s = 0.5\n")
    assert pipull.config.load_config(str(ini)).usage_budget_s == 0.5
    for bad in ("0", "-1", "nan"):
        ini.write_text(base + f"[lifecycle]\nusage_budget_s = {bad}\n")
        with pytest.raises(pipull.errors.ConfigError, match="usage_budget_s"):
            pipull.config.load_config(str(ini))


@pytest.mark.e2e
def test_lifecycle_continues_a_pass_on_the_next_ticks_whatever_the_interval(
    pipull: ModuleType, env: Any, tmp_path: Path
) -> None:
    """Lifecycle.usage (what a tick calls): a pass starts every usage_interval, and a pass the
    budget cut short goes on at the next tick although the interval has not passed."""
    import logging
    import subprocess

    mail, _cache, _seams, _scanner = env
    node = tmp_path / "node"
    node.mkdir(exist_ok=True)
    mirror_dir = node / "mirror.git"
    subprocess.run(["git", "init", "-q", "--bare", str(mirror_dir)], check=True)
    lines = "".join(sorted(f"{lo} {bid} active\n" for _d, lo, bid in BOXES)).encode()
    settings = b"format 2\npurge_after_days 7\n"
    base = "rendered/domains/a./a.example"
    stream = (
        b"commit refs/heads/main\ncommitter t <t@example.invalid> 1700000000 +0000\ndata 1\nt\n"
        + b"M 100644 inline rendered/settings\ndata %d\n%s\n" % (len(settings), settings)
        + b"".join(
            b"M 100644 inline %s/%s\ndata 0\n\n" % (base.encode(), f)
            for f in (b"passwd", b"virtual_mailbox_maps", b"virtual_mailbox_domains")
        )
        + b"M 100644 inline %s/mailboxes\ndata %d\n%s\n\n" % (base.encode(), len(lines), lines)
    )
    subprocess.run(["git", "--git-dir", str(mirror_dir), "fast-import", "--quiet"], input=stream, check=True)
    sha = subprocess.run(
        ["git", "--git-dir", str(mirror_dir), "rev-parse", "main"], check=True, capture_output=True, text=True
    ).stdout.strip()
    cfg = pipull.config.Config(
        remote_url="/unused",
        root=str(node),
        mail_root=str(mail),
        mail_uid=1,
        mail_gid=1,
        report_url="http://127.0.0.1:9/unused",
    )
    cfg.usage_budget_s = 1e-9  # one mailbox per tick
    log = logging.getLogger("test-usage")
    runner = pipull.runner.Runner()
    mirror = pipull.mirror.Mirror(cfg, runner, log)
    clock = [NOW]
    life = pipull.lifecycle.Lifecycle(
        cfg, mirror, pipull.release.Releases(cfg, runner, log, mirror), log, clock=lambda: clock[0]
    )
    st: dict[str, Any] = {"applied_commit": sha, "lifecycle": {"purge_after_days": 7}}
    seen = []
    for _ in range(len(BOXES)):
        out = life.usage(st)
        assert out is not None and len(out) == 1
        seen += [e["email"] for e in out]
        clock[0] += 60  # one tick later: far less than usage_interval
    assert sorted(seen) == sorted(f"{lo}@{d}" for d, lo, _ in BOXES)
    assert "usage_pass" not in st["lifecycle"] and st["lifecycle"]["usage_at"] == NOW
    assert life.usage(st) is None, "the pass is complete: the next one waits for usage_interval"
    clock[0] = NOW + cfg.usage_interval
    assert life.usage(st) is not None and st["lifecycle"]["usage_at"] == clock[0]


def test_a_forged_cache_cannot_make_the_scanner_read_outside_the_home(env: Any, tmp_path: Path) -> None:
    """Folder names come from the cache: a name with ``..`` or ``/`` is damage, not a path."""
    import json

    _mail, cache, seams, scanner = env
    ls: dict[str, Any] = {}
    first = full_pass(scanner(), ls)
    outside = tmp_path / "outside"
    (outside / "cur").mkdir(parents=True)
    (outside / "cur" / "secret,S=999999").write_text("")
    for p in cache.iterdir():
        if p.name.startswith("c"):
            doc = json.loads(p.read_text())
            for entry in doc["boxes"].values():
                entry[2].append(["/../../../outside", "-", 0, 0, "-", 0, 0])
                entry[2].append(["../../../../outside", "-", 0, 0, "-", 0, 0])
            p.write_text(json.dumps(doc))
    seams.listed.clear()
    assert full_pass(scanner(), ls) == first
    assert not any("outside" in p for p in seams.listed)


def test_a_pass_file_larger_than_a_shard_may_be_is_still_read(pipull: ModuleType, env: Any) -> None:
    """The pass file lists every mailbox and outgrows the shard limit on a big node (82.6 MB at
    1M against 64 MiB): it has its own limit, or each tick would list all mailboxes from git
    again. Here the shard limit is 1 byte (every shard unreadable: a full rescan, figures still
    right) and the pass file must still be read on the next ticks."""
    mail, cache, seams, _scanner = env
    seams.per_call = 1.0
    calls: list[int] = []

    def listing() -> list[tuple[str, str, str]]:
        calls.append(1)
        return list(BOXES)

    def scanner() -> Any:
        return pipull.usage.Scanner(
            str(mail),
            str(cache),
            2.0,
            now=lambda: NOW,
            monotonic=seams.monotonic,
            scandir=seams.scandir,
            max_file_bytes=1,
        )

    ls: dict[str, Any] = {}
    seen: list[tuple[str, int, int]] = []
    for _ in range(20):
        seen += [
            (str(e["email"]), int(e["used_bytes"]), int(e["messages"])) for e in scanner().step(ls, "c" * 40, listing)
        ]
        if "usage_pass" not in ls:
            break
    assert (cache / "pass").stat().st_size > 1
    assert calls == [1], "the pass file was read back, not listed again from git on every tick"
    assert sorted(seen) == sorted((f"{lo}@{d}", *expected(i)) for i, (d, lo, _) in enumerate(BOXES))
