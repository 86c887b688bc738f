"""Staged objects and the one pack a write group lands them in.

The store writes a group's objects (blobs, trees, commits, the statement's tag; ~11 a write)
into a staging folder of loose objects off the repo's disk (tmpfs when there is one), where
creating a file costs microseconds, not the milliseconds a busy journalled disk takes. Before
a ref may name any of them, `write_pack` puts every staged object into ONE pack in the repo:
the .pack and its .idx (version 2, the format git and libgit2 read) are written to temp files,
fsynced, renamed into `objects/pack` (the .idx last: git ignores a pack without its index) and
the folder is fsynced. Then the staged copies are deleted. A process that dies before that
loses only objects no ref named; git gc drops a pack nobody references.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

# Pack entry type codes (git's object types).
_TYPES = {b"commit": 1, b"tree": 2, b"blob": 3, b"tag": 4}


@dataclass(frozen=True)
class StagedObject:
    """One loose object of the staging folder, read back: its id, git type and content."""

    oid: bytes  # 20 raw bytes
    kind: int
    data: bytes
    path: Path


def read_staged(stage: Path) -> list[StagedObject]:
    """Every loose object in the staging folder `stage` (`xx/yyyy…` files)."""
    out: list[StagedObject] = []
    for folder in sorted(os.listdir(stage)):
        if len(folder) != 2:
            continue
        for name in sorted(os.listdir(stage / folder)):
            if len(name) != 38:
                continue  # a temp file being written
            path = stage / folder / name
            raw = zlib.decompress(path.read_bytes())
            header, _, data = raw.partition(b"\0")
            kind, _, size = header.partition(b" ")
            if int(size) != len(data) or kind not in _TYPES:
                raise ValueError(f"staged object {folder}{name} is damaged")
            out.append(StagedObject(bytes.fromhex(folder + name), _TYPES[kind], data, path))
    return out


def _entry_header(kind: int, size: int) -> bytes:
    """A pack entry's type-and-size header (git's variable-length encoding)."""
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _index(entries: list[tuple[bytes, int, int]], pack_sha: bytes) -> bytes:
    """The version-2 .idx of a pack: (oid, crc32, offset) of each entry, by oid."""
    entries = sorted(entries)
    fanout = [0] * 256
    for oid, _, _ in entries:
        fanout[oid[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    body = b"\377tOc" + struct.pack(">I", 2) + struct.pack(">256I", *fanout)
    body += b"".join(oid for oid, _, _ in entries)
    body += b"".join(struct.pack(">I", crc) for _, crc, _ in entries)
    body += b"".join(struct.pack(">I", offset) for _, _, offset in entries)  # packs stay far below 2 GB
    body += pack_sha
    return body + hashlib.sha1(body).digest()


def _write_file(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_pack(pack_dir: Path, objects: list[StagedObject], *, sync: bool = True) -> str:
    """Write `objects` as one durable pack in `pack_dir`; returns its name (pack-<sha>).

    The caller fsyncs `pack_dir` afterwards so the new names are durable too. `sync=False`
    (benchmarks only) fsyncs nothing."""
    parts = [b"PACK", struct.pack(">II", 2, len(objects))]
    offset = 12
    entries: list[tuple[bytes, int, int]] = []
    for obj in objects:
        entry = _entry_header(obj.kind, len(obj.data)) + zlib.compress(obj.data, 1)
        entries.append((obj.oid, zlib.crc32(entry), offset))
        parts.append(entry)
        offset += len(entry)
    body = b"".join(parts)
    pack_sha = hashlib.sha1(body).digest()
    name = f"pack-{pack_sha.hex()}"
    tmp = uuid.uuid4().hex
    pack_tmp, idx_tmp = pack_dir / f"tmp_pack_{tmp}", pack_dir / f"tmp_idx_{tmp}"
    try:
        _write_file(pack_tmp, body + pack_sha, sync)
        _write_file(idx_tmp, _index(entries, pack_sha), sync)
        os.replace(pack_tmp, pack_dir / f"{name}.pack")
        os.replace(idx_tmp, pack_dir / f"{name}.idx")
    finally:
        pack_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
    return name
