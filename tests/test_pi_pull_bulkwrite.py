"""pipull/bulkwrite.py: a first apply's passwd-files, written by a helper process."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from types import ModuleType

import pytest


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


def test_abort_stops_the_helper(pipull: ModuleType, tmp_path: Path) -> None:
    w = pipull.bulkwrite.FileWriter(0o644, -1)
    w.put(str(tmp_path / "a.example"), b"x\n")
    w.abort()
    w.abort()  # twice is fine (the build's finally after a close)
    w.close()
