"""pipull/bulkwrite.py: a first apply's passwd-files, written by a helper process."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e


def test_files_have_their_content_mode_and_group(pipull: ModuleType, tmp_path: Path) -> None:
    gid = os.getegid()
    if os.geteuid() == 0:
        try:
            gid = grp.getgrnam("dovecot").gr_gid
        except KeyError:
            pass
    w = pipull.bulkwrite.FileWriter(0o640, gid)
    want = {f"d{i}.example": (f"user{i}@d{i}.example:x\n" * (i % 7 + 1)).encode() for i in range(3000)}
    want["empty.example"] = b""
    for name, data in want.items():
        w.put(str(tmp_path / name), data)
    w.close()
    assert sorted(os.listdir(tmp_path)) == sorted(want)
    for name, data in want.items():
        st = os.stat(tmp_path / name)
        assert (tmp_path / name).read_bytes() == data
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid


def test_an_existing_file_is_an_error_not_overwritten(pipull: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "b.example").write_bytes(b"live\n")
    w = pipull.bulkwrite.FileWriter(0o644, -1)
    for name in ("a.example", "b.example", "c.example"):
        w.put(str(tmp_path / name), b"new\n")
    with pytest.raises(OSError, match=r"writing passwd-files failed: .*FileExists"):
        w.close()
    assert (tmp_path / "b.example").read_bytes() == b"live\n"
    assert not (tmp_path / "c.example").exists()  # the helper stopped at the first failure


def children() -> dict[int, bytes]:
    """This process's child processes: {pid: command line}."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if int(stat_line.rsplit(b")", 1)[1].split()[1]) == os.getpid():
            found[int(entry)] = cmdline
    return found


def test_abort_stops_the_helper(pipull: ModuleType, tmp_path: Path) -> None:
    before = children()
    w = pipull.bulkwrite.FileWriter(0o644, -1)
    helpers = [pid for pid, cmd in children().items() if pid not in before and b"\0-I\0-S\0-c\0" in cmd]
    assert len(helpers) == 1, children()
    (helper,) = helpers
    w.put(str(tmp_path / "a.example"), b"x\n")  # still pending in this process
    w.abort()
    # The helper has exited and was reaped: no process (not even a zombie) has its pid.
    assert helper not in children()
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
    w.abort()  # twice is fine (the build's finally after a close)
    w.close()  # a no-op now: it writes nothing and raises nothing
    assert os.listdir(tmp_path) == []  # what was pending when the build was refused is never written
