"""Writing compiled files into a checkout: each file atomically, stale files removed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mailstate.state.files import RENDERED_DIR


def write_rendered(root: Path, expected: Mapping[str, bytes]) -> list[str]:
    """Make `root/rendered` hold exactly `expected`; return the repo paths that changed.

    Each file goes to a temp file in its folder and is `os.replace`d, so a reader (or a
    crash) never sees half a file.
    """
    changed: list[str] = []
    base = root / RENDERED_DIR
    for rel, data in sorted(expected.items()):
        target = root / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        changed.append(rel)
    if base.exists():
        for path in sorted(base.rglob("*"), reverse=True):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in expected:
                path.unlink()
                changed.append(rel)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return sorted(changed)
