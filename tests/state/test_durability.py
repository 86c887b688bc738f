"""An answered write is durable.

* Before the store answers, every new object of the commit is in one pack that is fsynced
  with its index and its folder (state/gitpack.py), and only then is the ref written,
  fsynced, renamed into place and its folder fsynced. Checked on the real system calls of a real write (strace).
* kill -9 of `mailstate serve` in the middle of writes loses nothing that was answered, and
  leaves nothing that stops the next start or the next write (a `main.lock` left behind).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mailstate.state.datadir import DataDir, open_store
from mailstate.state.errors import StoreError
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, git_out
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

# --- the system calls of one write -----------------------------------------------------------

_WRITE = """
import os, sys
from pathlib import Path
from mailstate.state.datadir import open_store
from mailstate.state.snapshot import Actor
store = open_store(Path(sys.argv[1]))
os.write(2, b"MARK-BEGIN\\n")
out = store.execute("link-domain", Actor.admin("test"), {"domain": sys.argv[2], "project_id": 7})
os.write(2, b"MARK-END\\n")
print(out.result["commit"])
"""

_CALL = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")
_FD_PATH = re.compile(r"^\d+<(.*)>")
_PACK = re.compile(r"/objects/pack/pack-([0-9a-f]{40})\.(pack|idx)$")


def _trace_one_write(data: DataDir, domain: str, tmp_path: Path) -> tuple[str, list[tuple[str, list[str]]]]:
    """(commit, [(syscall, [paths])]) of one store write, in order, successful calls only."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (CI installs it)")
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        [
            "strace", "-f", "-qq", "-y", "-o", str(trace),
            "-e", "trace=fsync,fdatasync,syncfs,link,linkat,rename,renameat,renameat2,mkdir,mkdirat,write",
            sys.executable, "-c", _WRITE, str(data.root), domain,
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    commit = proc.stdout.strip().splitlines()[-1]
    events: list[tuple[str, list[str]]] = []
    inside = False
    for line in trace.read_text().splitlines():
        if "MARK-BEGIN" in line:
            inside = True
            continue
        if "MARK-END" in line:
            break
        match = _CALL.match(line)
        if not inside or match is None or (match.group(3) != "0" and match.group(1) != "write"):
            continue
        name, args = match.group(1), match.group(2)
        if name in ("fsync", "fdatasync", "syncfs"):
            fd = _FD_PATH.match(args)
            events.append((name, [fd.group(1)] if fd else []))
        elif name != "write":
            events.append((name, re.findall(r'"([^"]*)"', args)))
    return commit, events


def test_every_file_of_a_write_is_fsynced_before_the_answer(data_dir: DataDir, tmp_path: Path) -> None:
    commit, events = _trace_one_write(data_dir, "durable.example", tmp_path)
    repo = str(data_dir.repo)
    synced_at: dict[str, list[int]] = {}
    for i, (name, paths) in enumerate(events):
        if name in ("fsync", "fdatasync") and paths:
            synced_at.setdefault(paths[0].rstrip("/"), []).append(i)

    def synced(path: str, after: int = -1, before: int = len(events)) -> bool:
        return any(after < i < before for i in synced_at.get(path.rstrip("/"), []))

    ref_moves = [
        i
        for i, (name, paths) in enumerate(events)
        if name.startswith("rename") and paths[-1:] == [f"{repo}/refs/heads/main"]
    ]
    assert len(ref_moves) == 1, events
    move = ref_moves[0]
    assert synced(f"{repo}/refs/heads/main.lock", before=move), (
        "the ref was renamed into place before its content was on disk"
    )
    assert synced(f"{repo}/refs/heads", after=move), "the ref's folder was not fsynced after the rename"

    # The write's objects: all in ONE pack, whose .pack and .idx were fsynced before they were
    # renamed into objects/pack, and that folder fsynced, all before the branch moves.
    renamed = {
        m.group(2): (m.group(1), i)
        for i, (name, paths) in enumerate(events[:move])
        if name.startswith("rename") and len(paths) == 2 and (m := _PACK.search(paths[1]))
    }
    assert set(renamed) == {"pack", "idx"}, events
    for kind, (pack_sha, at) in renamed.items():
        tmp = next(paths[0] for name, paths in events if name.startswith("rename") and paths[1].endswith(f".{kind}"))
        assert synced(tmp, before=at), f"the .{kind} was renamed into place before its content was on disk"
        assert pack_sha == renamed["pack"][0]
    assert renamed["pack"][1] < renamed["idx"][1], "the .idx named the pack before the .pack was in place"
    assert synced(f"{repo}/objects/pack", after=renamed["idx"][1], before=move), "objects/pack was not fsynced"
    new_objects = {
        line.split()[0] for line in git_out(data_dir.repo, "rev-list", "--objects", commit, f"^{commit}^").splitlines()
    }
    assert commit in new_objects and len(new_objects) >= 3  # at least a blob, a tree and the commit
    idx = data_dir.repo / f"objects/pack/pack-{renamed['pack'][0]}.idx"
    shown = subprocess.run(["git", "show-index"], input=idx.read_bytes(), capture_output=True, check=True).stdout
    in_pack = {line.split()[1] for line in shown.decode().splitlines()}
    assert new_objects <= in_pack, new_objects - in_pack
    loose = [o for o in new_objects if (data_dir.repo / "objects" / o[:2] / o[2:]).exists()]
    assert not loose, f"written as loose objects in the repo: {loose}"
    assert git_out(data_dir.repo, "config", "core.fsync").strip() == "all"  # git's own writes (repack, pushes)


def test_an_existing_data_dir_gets_durable_git_config_when_opened(data_dir: DataDir) -> None:
    git_out(data_dir.repo, "config", "--unset", "core.fsync")
    open_store(data_dir.root)
    assert git_out(data_dir.repo, "config", "core.fsync").strip() == "all"
    git_out(data_dir.repo, "config", "core.fsync", "committed")
    open_store(data_dir.root)
    assert git_out(data_dir.repo, "config", "core.fsync").strip() == "committed"  # an admin's choice stays


# --- a lock file left by a killed process ----------------------------------------------------


def test_a_stale_ref_lock_left_by_a_killed_process_does_not_block_writes(store: Store, data_dir: DataDir) -> None:
    lock = data_dir.repo / "refs" / "heads" / "main.lock"
    lock.write_text("half-written\n")
    old = time.time() - 60
    os.utime(lock, (old, old))
    out = store.execute("link-domain", ADMIN, {"domain": "after-crash.example", "project_id": 1})
    assert git_out(data_dir.repo, "rev-parse", "main").strip() == out.result["commit"]
    assert not lock.exists()


def test_a_fresh_ref_lock_is_left_to_its_owner(store: Store, data_dir: DataDir) -> None:
    lock = data_dir.repo / "refs" / "heads" / "main.lock"
    before = store.head
    lock.write_text("a git push in progress\n")
    with pytest.raises(StoreError) as err:
        store.execute("link-domain", ADMIN, {"domain": "blocked.example", "project_id": 1})
    assert err.value.code == "store_error"
    assert lock.exists() and git_out(data_dir.repo, "rev-parse", "main").strip() == before
    lock.unlink()
    assert store.execute("link-domain", ADMIN, {"domain": "blocked.example", "project_id": 1}).result["commit"]


def test_a_write_waits_for_a_ref_lock_git_lets_go_of(store: Store, data_dir: DataDir) -> None:
    # A background `git gc` (pack-refs) holds main.lock for a moment: the write waits for it
    # instead of failing. The helper lets go of the lock once the writer is inside the ref
    # update (it holds mailstate.lock only there), so no timing decides the outcome.
    import fcntl

    lock = data_dir.repo / "refs" / "heads" / "main.lock"
    lock.write_text("git pack-refs at work\n")
    released = threading.Event()

    def let_go_once_the_writer_waits() -> None:
        with open(data_dir.repo / "mailstate.lock", "a+b") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                except BlockingIOError:
                    break  # the writer holds it: it is at the ref
                time.sleep(0.001)
        lock.unlink()
        released.set()

    helper = threading.Thread(target=let_go_once_the_writer_waits)
    helper.start()
    out = store.execute("link-domain", ADMIN, {"domain": "waited.example", "project_id": 1})
    helper.join()
    assert released.is_set()
    assert git_out(data_dir.repo, "rev-parse", "main").strip() == out.result["commit"]


def test_ref_locks_left_before_the_store_opened_are_removed_at_once(data_dir: DataDir) -> None:
    """kill -9 while the branch or the accepted-head statement was being written, then a restart
    within a second: the locks the dead server left were made before this store opened the repo,
    so no writer of ours holds them, and they go at the next write rather than STALE_LOCK_S
    later; the statement is written, health is ok."""
    from mailstate.state.statement import REF as STATEMENT_REF
    from mailstate.state.statement import read_statement

    locks = [data_dir.repo / "refs" / "heads" / "main.lock", data_dir.repo / f"{STATEMENT_REF}.lock"]
    for lock in locks:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text("left by a killed server\n")
        made = time.time() - 1
        os.utime(lock, (made, made))
    store = open_store(data_dir.root)
    out = store.execute("link-domain", ADMIN, {"domain": "restarted.example", "project_id": 1})
    assert git_out(data_dir.repo, "rev-parse", "main").strip() == out.result["commit"]
    assert not any(lock.exists() for lock in locks)
    assert store.health()["status"] == "ok", store.health()
    found = read_statement(store.git.repo)
    assert found is not None and out.result["commit"] in found[1].decode()


# --- kill -9 of a running server -------------------------------------------------------------


def test_kill_9_during_writes_loses_nothing_that_was_answered(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path)
    srv.start()
    answered: dict[str, str] = {}  # domain -> commit
    lock = threading.Lock()
    try:
        for round_ in range(3):
            stop = threading.Event()

            def writer(name: str, stop: threading.Event = stop, round_: int = round_) -> None:
                with srv.client(srv.admin_token) as c:
                    n = 0
                    while not stop.is_set():
                        domain = f"r{round_}-{name}-{n}.example"
                        n += 1
                        try:
                            resp = c.post("/v1/email-account/add-domain", json={"domain": domain, "project_id": 1})
                        except httpx.HTTPError:
                            return  # the server is gone: this write was never answered
                        if resp.status_code in (200, 201):
                            with lock:
                                answered[domain] = resp.json()["commit"]

            threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while len(answered) < 10 * (round_ + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05 * round_)  # land the kill at a different point each round
            assert srv.proc is not None
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait()
            stop.set()
            for t in threads:
                t.join()
            srv.proc = None
            srv.start()  # the same data dir: it must come up after a kill -9
            with srv.client(srv.admin_token) as c:
                assert c.get("/v1/health").json()["status"] == "ok"
                listed = {d["domain"] for d in c.get("/v1/email-account/list-domains").json()["domains"]}
            missing = set(answered) - listed
            assert not missing, f"round {round_}: answered writes lost after kill -9: {sorted(missing)[:5]}"
            head = srv.git("rev-parse", "main").strip()
            for commit in answered.values():
                assert (
                    subprocess.run(
                        ["git", "-C", str(srv.data.repo), "merge-base", "--is-ancestor", commit, head]
                    ).returncode
                    == 0
                )
        assert len(answered) >= 30
        fsck = subprocess.run(
            ["git", "-C", str(srv.data.repo), "fsck", "--no-dangling"], capture_output=True, text=True
        )
        assert fsck.returncode == 0, fsck.stderr
        with srv.client(srv.admin_token) as c:  # and it still takes writes
            assert c.post(
                "/v1/email-account/link-domain", json={"domain": "after.example", "project_id": 1}
            ).status_code in (200, 201)
    finally:
        srv.stop()


# --- one pack per write, rolled up in the background -----------------------------------------


def test_writes_survive_a_concurrent_repack(store: Store, data_dir: DataDir) -> None:
    """git's repack -d (run in the background every few writes) removes the fan-out folders it
    empties; a write whose loose object lands in a folder being removed must still succeed."""
    stop = threading.Event()
    errors: list[str] = []

    def repack_forever() -> None:
        while not stop.is_set():
            proc = subprocess.run(
                ["git", "-C", str(data_dir.repo), "repack", "-d", "-q"], capture_output=True, text=True
            )
            if proc.returncode != 0 and "lock" not in proc.stderr:
                errors.append(proc.stderr)

    worker = threading.Thread(target=repack_forever, daemon=True)
    worker.start()
    try:
        for i in range(60):
            store.execute("add-domain", ADMIN, {"domain": f"race{i}.example"})
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors
    assert len(store.snapshot.domains) >= 60
    fsck = subprocess.run(["git", "-C", str(data_dir.repo), "fsck", "--no-progress"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
