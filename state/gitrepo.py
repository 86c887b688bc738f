"""The git layer: in-memory trees and signed commits on a bare repo, through pygit2.

Why pygit2 and not the git CLI or GitPython: a commit built in memory touches only the trees
on the changed paths (measured ~35 ms for a 20k-entry flat tree, far less once the state fans
out into two-character folders), where `git add && git commit` re-reads the index (~100 ms)
and GitPython's index handling costs ~690 ms.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pygit2

from mailstate.state.errors import BranchMoved, StoreError
from mailstate.state.gitpack import read_staged, write_pack
from mailstate.state.signing import Signer

BRANCH = "main"
REF = f"refs/heads/{BRANCH}"

# Durability: an answered write must survive a power cut. A write makes ~11 objects; as loose
# files on the repo's disk each costs a file creation (milliseconds on a busy journalled disk)
# and they all need flushing. Instead the objects are staged as loose files off that disk
# (tmpfs when there is one) and, before a ref may name them, flush_objects() writes every staged
# object as ONE fsynced pack (state/gitpack.py); a group of writes shares that pack. Then the
# ref moves, itself fsynced with its folder (_put_loose_ref; the libgit2 fsync option, which the
# refdb reads when the repo is opened, covers the other refs libgit2 writes; the option is
# process-wide, so it is on only while a repo is opened, under a lock).
_durable = True
_fsync_option = threading.Lock()
# git holds refs/heads/main.lock for milliseconds; one this old was left by a killed process.
STALE_LOCK_S = 10.0
# How long a write waits for a `main.lock` another git process holds before it fails.
REF_LOCK_WAIT_S = 2.0
# A ref lock made before this process opened the repo and this old was left by a killed process.
LEFT_LOCK_S = 0.5
log = logging.getLogger("mailstate.git")


def name_key(name: str) -> str:
    """`name` as the one interned string of its value, for every tree lookup by name.

    pygit2 (1.21 at least) keeps a reference to the str it is given by Tree.__getitem__,
    `in`, TreeBuilder.get and TreeBuilder.remove, and never drops it: a fresh string a write
    stays alive for good (~11 a write, the RSS climbing by megabytes per thousand writes).
    Interned, every lookup of a name holds the same object, so the leak stops growing.
    tests/state/test_gitrepo_trees.py checks it against the installed pygit2."""
    return sys.intern(name)


def set_durable(enabled: bool) -> None:
    """Make the writes of repositories opened from now on durable (the default), or not
    (benchmarks only: the cost of durability is measured against it)."""
    global _durable
    _durable = enabled


@contextmanager
def _libgit2_fsync() -> Iterator[None]:
    with _fsync_option:
        pygit2.settings.enable_fsync_gitdir(True)
        try:
            yield
        finally:
            pygit2.settings.enable_fsync_gitdir(False)


_T = TypeVar("_T")


def _retry_write(fn: Callable[..., _T], *args: Any) -> _T:
    """Write one loose object, trying again if a concurrent `git repack -d` raced us.

    repack's prune-packed step removes fan-out folders (objects/13/) that it emptied; libgit2
    creates the folder, then its temp file in it, so a removal in between fails the write with
    "No such file or directory". The next attempt recreates the folder.
    """
    for attempt in range(4):
        try:
            return fn(*args)
        except (pygit2.GitError, OSError):
            if attempt == 3:
                raise
            time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")


# libgit2's object cache (process-wide; its default is 256 MB). Each write leaves ~0.7 KB of new
# commits and trees in it, so a server's RSS climbed with every write until 256 MB; the store
# serves reads from its own snapshot and keeps its tree builders, so a small cache costs nothing.
OBJECT_CACHE_BYTES = 8 * 1024 * 1024


# libgit2 maps pack files into memory in windows of up to 1 GB and keeps them mapped up to 8 GB
# (its 64-bit defaults), so a server's RSS carried every pack page it had read since the last
# renewal of its object database. Smaller windows and a cap make libgit2 unmap the least
# recently used windows: a read from a cold window costs one mmap of a page-cached file.
PACK_WINDOW_BYTES = 4 * 1024 * 1024
PACK_MAPPED_LIMIT_BYTES = 32 * 1024 * 1024


def bound_object_cache() -> None:
    """Cap libgit2's object cache at OBJECT_CACHE_BYTES and its pack mappings at
    PACK_MAPPED_LIMIT_BYTES (never raise a lower cap)."""
    if pygit2.settings.cached_memory[1] > OBJECT_CACHE_BYTES:
        pygit2.settings.cache_max_size(OBJECT_CACHE_BYTES)
    if pygit2.settings.mwindow_size > PACK_WINDOW_BYTES:
        pygit2.settings.mwindow_size = PACK_WINDOW_BYTES
    if pygit2.settings.mwindow_mapped_limit > PACK_MAPPED_LIMIT_BYTES:
        pygit2.settings.mwindow_mapped_limit = PACK_MAPPED_LIMIT_BYTES


# Trees whose entries are kept for the next write (GitRepo._take_entries): the ~6 trees a write
# rewrites plus the buckets recent writes touched.
TREES_KEPT = 128

# zlib level of the objects in the staging folder (GitRepo._write_loose): 0 stores them as they
# are, since flush_objects compresses them into the pack a moment later.
STAGED_ZLIB_LEVEL = 0

# A tree's entries as GitRepo writes them from Python: name -> entry, the bytes the tree object
# holds for it (`<mode> <name>\0<20-byte id>`), kept in git's order: by the name's bytes, with a
# "/" after a folder's. The tree's content is then the entries joined.
TreeEntries = dict[str, bytes]
_FOLDER_MODES = (b"40000", b"040000")  # a tree written by an old git may carry the leading zero
_TREE_LINE = re.compile(rb"((\d+) ([^\0]*)\0.{20})", re.DOTALL)  # (entry, mode, name)


def tree_entry(name: str, oid: bytes, *, folder: bool) -> bytes:
    """The entry of a file (mode 100644) or folder (40000) `name` naming `oid`."""
    return (b"40000 " if folder else b"100644 ") + name.encode("utf-8", "surrogateescape") + b"\0" + oid


def is_folder(entry: bytes) -> bool:
    return entry.startswith(b"40000 ") or entry.startswith(b"040000 ")


def _order_key(entry: bytes) -> bytes:
    """Where git puts `entry` in its tree: the name's bytes, a folder's followed by "/"."""
    mode, _, rest = entry.partition(b" ")
    return rest[:-21] + b"/" if mode in _FOLDER_MODES else rest[:-21]


def in_git_order(entries: TreeEntries) -> TreeEntries:
    """`entries` in git's order (sorted() does little work on what is nearly in order)."""
    return dict(sorted(entries.items(), key=lambda item: _order_key(item[1])))


def parse_tree(body: bytes) -> TreeEntries:
    """The entries of a tree object's content (any modes, kept as they are), in git's order.
    ValueError when the content is not a run of whole entries."""
    lines = _TREE_LINE.findall(body)
    if sum(len(line) for line, _, _ in lines) != len(body):
        raise ValueError("a damaged tree")
    keyed = [(raw + b"/" if mode in _FOLDER_MODES else raw, raw, line) for line, mode, raw in lines]
    if any(keyed[i][0] >= keyed[i + 1][0] for i in range(len(keyed) - 1)):
        keyed.sort()  # git's own trees are in order; any other is written in order
    return {raw.decode("utf-8", "surrogateescape"): line for _, raw, line in keyed}


_libc_syncfs: Any = None


def _syncfs(path: Path) -> bool:
    """syncfs(2) the filesystem holding `path`: every dirty file and folder on it reaches the
    disk. False when the platform has no syncfs (then the caller fsyncs file by file)."""
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _libc_syncfs = libc.syncfs
            _libc_syncfs.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            _libc_syncfs = False
    if _libc_syncfs is False:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# libgit2's pack backend keeps every pack it has seen open (its index mapped, a file handle)
# even once a roll-up deleted it; with a pack a write group that grows by the hour. Every this
# many flushes the repo gets a new object database, and the old one closes them all.
ODB_REOPEN_EVERY = 64

# Where staged objects go: tmpfs when the machine has one (file creation costs microseconds).
STAGE_ROOTS = ("/dev/shm",)


def _stage_folder(repo: Path) -> Path | None:
    """A new, private staging folder for the objects of `repo`, or None when the repo borrows
    objects from elsewhere (objects/info/alternates: then objects are written in place)."""
    if (repo / "objects" / "info" / "alternates").exists():
        return None
    for root in STAGE_ROOTS:
        if os.access(root, os.W_OK):
            _drop_dead_stages(Path(root))
            return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=root))
    return Path(tempfile.mkdtemp(prefix="stage-", dir=repo / "objects" / "pack"))


STAGE_PREFIX = "mailstate-objects-"


def _drop_dead_stages(root: Path) -> None:
    """Remove the staging folders of processes that are gone (killed before they cleaned up):
    tmpfs is memory. What they held was never named by a ref."""
    for entry in root.glob(f"{STAGE_PREFIX}*-*"):
        pid = entry.name[len(STAGE_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def signed_commit(text: str, signature: str) -> bytes:
    """The commit object `text` (a commit's headers, a blank line, its message) with
    `signature` in a `gpgsig` header after the others, byte for byte what libgit2's
    create_commit_with_signature writes (and what git strips to verify): each line break of
    the signature continued with a space, and one line break after it."""
    end = text.index("\n\n") + 1
    return (text[:end] + "gpgsig " + signature.replace("\n", "\n ") + "\n" + text[end:]).encode("utf-8")


class GitRepo:
    """A bare (or non-bare) repository the store commits to.

    Objects written through `repo` (pygit2 directly too) are staged, readable through this
    object only, until flush_objects() puts them in the repo; every ref update here flushes
    first, and so does commit() unless told not to."""

    def __init__(self, path: Path | str) -> None:
        # Absolute: the path goes to `git -C` and into the lock file's name, and must not
        # change meaning if the process changes directory.
        self.path = Path(os.path.abspath(path))
        self.durable = _durable
        self.opened_at = time.time()  # a ref lock older than this was left by another process
        self._pending: list[pygit2.Oid] = []  # objects written since the last flush_objects()
        # tree id -> the entries of exactly that tree (see _take_entries), newest last.
        self._trees: OrderedDict[bytes, TreeEntries] = OrderedDict()
        self._trees_lock = threading.Lock()
        try:
            with _libgit2_fsync() if self.durable else nullcontext():
                self.repo = pygit2.Repository(str(self.path))
                self.repo.references.get(REF)  # opens the refdb, which reads the option now
        except (pygit2.GitError, KeyError) as exc:
            raise StoreError(f"{self.path} is not a git repository.") from exc
        self.flushes = 0  # flush_objects calls that wrote something (a pack each when staged)
        self._stage = _stage_folder(self.path)
        self._packs: pygit2.OdbBackendPack | None = None
        if self._stage is not None:
            weakref.finalize(self, shutil.rmtree, self._stage, True)
            self._stage_odb(self._stage)

    def _stage_odb(self, stage: Path) -> None:
        """Read objects from the repo's packs, then the staged objects, then the repo's loose
        objects (others' writes); write new ones to the staging folder (libgit2 writes to the
        first backend that can write: the pack backend cannot)."""
        objects = str(self.path / "objects")
        self._packs = pygit2.OdbBackendPack(objects)
        odb = pygit2.Odb()
        odb.add_backend(self._packs, 3)
        odb.add_backend(pygit2.OdbBackendLoose(str(stage), 1, False), 2)
        odb.add_backend(pygit2.OdbBackendLoose(objects, 1, False), 1)
        self.repo.set_odb(odb)

    @classmethod
    def init_bare(cls, path: Path) -> GitRepo:
        """Create an empty bare repository whose HEAD points at `main`."""
        try:
            pygit2.init_repository(str(path), bare=True, initial_head=BRANCH)
        except pygit2.GitError as exc:
            raise StoreError(f"Cannot create a repository at {path}.") from exc
        return cls(path)

    def head(self) -> str | None:
        """The commit `main` points at, or None before the first commit."""
        ref = self.repo.references.get(REF)
        return None if ref is None else str(ref.target)

    def tree(self, commit: str) -> pygit2.Tree:
        obj = self.repo[commit]
        if not isinstance(obj, pygit2.Commit):
            raise StoreError(f"{commit} is not a commit.")
        return obj.tree

    def read(self, commit: str | None, path: str) -> bytes | None:
        """The bytes of `path` at `commit`, or None when it does not exist there."""
        if commit is None:
            return None
        try:
            entry = self.tree(commit)[name_key(path)]
        except KeyError:
            return None
        obj = self.repo[entry.id]
        return obj.data if isinstance(obj, pygit2.Blob) else None

    def walk_blobs(self, commit: str, prefix: str) -> Iterator[tuple[str, str]]:
        """(path, blob id) of every file below the folder `prefix` at `commit`."""
        try:
            entry = self.tree(commit)[name_key(prefix)]
        except KeyError:
            return
        stack: list[tuple[str, pygit2.Tree]] = []
        top = self.repo[entry.id]
        if isinstance(top, pygit2.Tree):
            stack.append((prefix, top))
        while stack:
            base, tree = stack.pop()
            for item in tree:
                path = f"{base}/{item.name}"
                if item.type_str == "tree":
                    sub = self.repo[item.id]
                    assert isinstance(sub, pygit2.Tree)
                    stack.append((path, sub))
                elif item.type_str == "blob":
                    yield path, str(item.id)

    def blob(self, oid: str) -> bytes:
        obj = self.repo[oid]
        assert isinstance(obj, pygit2.Blob)
        return obj.data

    def build_tree(self, base: str | None, changes: Mapping[str, bytes | None]) -> str:
        """A new root tree: `base`'s tree with files written (bytes) or removed (None).

        A None for a folder removes the whole folder; folders left empty disappear.
        """
        with self._trees_lock:
            try:
                oid = self._build(self.tree(base).id.raw if base else None, changes)
                if oid is None:
                    oid = _retry_write(self._write_loose, b"tree", b"")  # the empty tree
                    self._pending.append(pygit2.Oid(raw=oid))
            except (pygit2.GitError, OSError, ValueError) as exc:
                self._trees.clear()  # some entries may be half-changed
                raise StoreError("git could not write the tree.") from exc
        return oid.hex()

    def _write_blob(self, data: bytes) -> pygit2.Oid:
        """Write `data` as a loose blob from Python (_write_loose)."""
        return pygit2.Oid(raw=self._write_loose(b"blob", data))

    def _write_loose(self, kind: bytes, data: bytes) -> bytes:
        """Write a loose object of type `kind` the way git does (zlib, temp file, link); returns
        its id (20 raw bytes).

        Not libgit2 (create_blob, TreeBuilder.write): libgit2 holds the GIL through the whole
        write, and creating the file can take milliseconds on a busy disk, so every reader of
        the server waited for it; Python's os calls let go of the GIL. It also skips libgit2's
        look for an existing copy, which rescans the pack folder on every miss (a new object
        always misses); a copy that exists already is harmless, and repack drops it. Durable
        with the rest of the write's objects (flush_objects).

        A staged object is stored uncompressed (zlib level 0, still a valid loose object): it
        lives until the next flush, which compresses it into the pack anyway. Written in the
        repo (no staging folder) it stays there, compressed as git would."""
        raw = b"%s %d\0" % (kind, len(data)) + data
        digest = hashlib.sha1(raw).digest()
        hexsha = digest.hex()
        folder = f"{self._stage or self.path / 'objects'}/{hexsha[:2]}"
        final = f"{folder}/{hexsha[2:]}"
        if not os.path.exists(final):
            try:
                os.mkdir(folder)
            except FileExistsError:
                pass
            tmp = f"{folder}/tmp_obj_{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                os.write(fd, zlib.compress(raw, STAGED_ZLIB_LEVEL if self._stage else 1))
            finally:
                os.close(fd)
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass  # another writer (or process) wrote the same object: same bytes
            finally:
                os.unlink(tmp)
        return digest

    def _take_entries(self, base: bytes | None) -> TreeEntries:
        """The entries of tree `base` (20 raw bytes), to change and write as a new tree.

        The trees a write rewrites (the root, `domains/`, `domains/<bb>/` with ~800 entries at
        200k domains, the same under `rendered/`) are the next write's bases. Reading such a
        tree back from libgit2 and parsing it costs far more than the write's changes, so the
        entries that were written as a tree are kept under the tree's id and taken again; they
        hold exactly that tree, since entries are only ever filed under the id of the tree
        their last write made.
        """
        if base is None:
            return {}
        kept = self._trees.pop(base, None)
        if kept is not None:
            return kept
        tree = self.repo[pygit2.Oid(raw=base)]
        if not isinstance(tree, pygit2.Tree):
            raise StoreError(f"{base.hex()} is not a tree.")
        return parse_tree(tree.read_raw())

    def _keep_entries(self, oid: bytes, entries: TreeEntries) -> None:
        self._trees[oid] = entries
        while len(self._trees) > TREES_KEPT:
            self._trees.popitem(last=False)

    def _build(self, base: bytes | None, changes: Mapping[str, bytes | None]) -> bytes | None:
        """Write the tree `base` with `changes` (paths below it) applied; its id (20 raw bytes),
        or None when it is left empty."""
        direct: dict[str, bytes | None] = {}
        nested: dict[str, dict[str, bytes | None]] = {}
        for path, data in changes.items():
            head, _, rest = path.partition("/")
            head = name_key(head)
            if rest:
                nested.setdefault(head, {})[rest] = data
            else:
                direct[head] = data
        entries = self._take_entries(base)
        moved = False  # an entry added, or turned from file to folder or back: order again
        for name, data in direct.items():
            if data is None:
                entries.pop(name, None)
            else:
                blob = _retry_write(self._write_loose, b"blob", data)
                self._pending.append(pygit2.Oid(raw=blob))
                old = entries.get(name)
                moved = moved or old is None or is_folder(old)
                entries[name] = tree_entry(name, blob, folder=False)
        for name, sub in nested.items():
            old = entries.get(name)
            current = old[-20:] if old is not None and is_folder(old) else None
            new = self._build(current, sub)
            if new is not None:
                moved = moved or current is None
                entries[name] = tree_entry(name, new, folder=True)
            elif current is not None:
                del entries[name]  # the folder is left empty (a file of that name stays)
        if not entries:
            return None
        if moved:
            entries = in_git_order(entries)
        oid = _retry_write(self._write_loose, b"tree", b"".join(entries.values()))
        self._pending.append(pygit2.Oid(raw=oid))
        self._keep_entries(oid, entries)
        return oid

    def commit(
        self,
        tree: str,
        parent: str | None,
        message: str,
        signer: Signer,
        when: datetime,
        identity: tuple[str, str] = ("mailstate", "mailstate@localhost"),
        *,
        flush: bool = True,
    ) -> str:
        """Create a signed commit object (the branch does not move). With `flush`, it and the
        objects before it are in the repo on return (flush_objects); the store's write groups
        pass False and flush once for the group."""
        delta = when.utcoffset()
        offset = int(delta.total_seconds() // 60) if delta is not None else 0
        person = pygit2.Signature(identity[0], identity[1], int(when.timestamp()), offset)
        parents: list[str | pygit2.Oid] = [pygit2.Oid(hex=parent)] if parent else []
        try:
            text = str(self.repo.create_commit_string(person, person, message, pygit2.Oid(hex=tree), parents))
        except pygit2.GitError as exc:
            raise StoreError("git could not write the commit.") from exc
        try:
            signature = signer.sign(text.encode("utf-8"))
        except StoreError:
            raise
        except Exception as exc:  # any signer failure is a store failure; the branch stays put
            raise StoreError("The commit could not be signed.") from exc
        try:
            oid = self.write_object(b"commit", signed_commit(text, signature))
        except OSError as exc:
            raise StoreError("git could not write the commit.") from exc
        if flush:
            self.flush_objects()
        return oid

    def write_object(self, kind: bytes, data: bytes) -> str:
        """Write an object (a commit, the statement's tag) from Python like the blobs and trees
        (_write_loose), not through libgit2: libgit2 first looks for an existing copy, and a new
        object always misses, which searches every pack's index (touching pages of the big one,
        so the server's file-backed memory grew with the repo) and rescans the pack folder.
        Durable with the rest of the write's objects (flush_objects)."""
        oid = pygit2.Oid(raw=_retry_write(self._write_loose, kind, data))
        self._pending.append(oid)
        return str(oid)

    def flush_objects(self, extra: Iterable[str] = ()) -> None:
        """Make every object written through this repo object so far durable, before a ref
        points at any of them: the staged objects go into ONE pack (fsynced, with its index
        and folder; state/gitpack.py), then their staged copies are deleted.

        Without a staging folder (a repo with alternates) the objects are loose files in the
        repo: `extra` names objects written with pygit2 directly, and one syncfs(2) of the
        repo's filesystem (or, where it is missing, an fsync of each object file and its
        fan-out folder) puts them on disk. No fsync at all for a repo opened with
        set_durable(False)."""
        if self._stage is not None:
            self._pack_staged(self._stage)
            return
        pending = [*self._pending, *(pygit2.Oid(hex=oid) for oid in extra)]
        self._pending.clear()
        if pending:
            self.flushes += 1
        if not self.durable or not pending:
            return
        try:
            if not _syncfs(self.path / "objects"):
                folders: set[Path] = set()
                for oid in dict.fromkeys(str(o) for o in pending):
                    loose = self.path / "objects" / oid[:2] / oid[2:]
                    if loose.exists():  # already packed (an existing object) needs nothing
                        fsync_path(loose)
                        folders.add(loose.parent)
                for folder in sorted(folders):
                    fsync_path(folder)
        except OSError as exc:
            raise StoreError("git's objects could not be written to disk.") from exc

    def _pack_staged(self, stage: Path) -> None:
        self._pending.clear()
        try:
            staged = read_staged(stage)
            if not staged:
                return
            pack_dir = self.path / "objects" / "pack"
            pack_dir.mkdir(exist_ok=True)
            write_pack(pack_dir, staged, sync=self.durable)
            if self.durable:
                fsync_path(pack_dir)
        except (OSError, ValueError, zlib.error) as exc:
            raise StoreError("git's objects could not be written to disk.") from exc
        self.flushes += 1
        assert self._packs is not None
        if self.flushes % ODB_REOPEN_EVERY == 0:
            self._stage_odb(stage)  # a new pack backend (sees the new pack), the old one closed
        else:
            self._packs.refresh()  # libgit2 finds them in the new pack before the staged copies go
        for obj in staged:
            obj.path.unlink(missing_ok=True)
        for folder in {obj.path.parent for obj in staged}:
            try:
                folder.rmdir()  # the next flush then lists only the folders its objects made
            except OSError:
                pass  # not empty: an object written meanwhile, for the next flush

    def move_branch(self, new: str, expected: str | None) -> None:
        """Point `main` at `new` if it still points at `expected` (compare-and-swap).

        The check and the update happen under an exclusive lock file in the repo, so two
        processes writing one data dir (a server and `mailstate call`, say) cannot both win.
        """
        self.flush_objects()
        with self._ref_lock():
            if self.head() != expected:
                raise BranchMoved("The branch moved underneath the store; the write was not applied.")
            self._write_ref(new)

    def set_branch(self, new: str) -> None:
        """Point `main` at `new` unconditionally (under the same lock as move_branch)."""
        self.flush_objects()
        with self._ref_lock():
            self._write_ref(new)

    def _write_ref(self, new: str) -> None:
        """Write `main` (the ref lock is held)."""
        try:
            self._put_ref_waiting(REF, new)
        except OSError as exc:
            raise StoreError("git could not update the branch.") from exc

    def put_ref(self, ref: str, new: str, *, sync: bool = True) -> None:
        """Point the loose ref `ref` at `new` unconditionally (the caller holds ref_lock); fsynced
        unless `sync` is False (then a power cut may leave the old value). FileExistsError when
        `<ref>.lock` stays held (_put_ref_waiting). The object is not looked up: flush it first."""
        self._put_ref_waiting(ref, new, sync=sync)

    def _put_ref_waiting(self, ref: str, new: str, *, sync: bool = True) -> None:
        """_put_loose_ref, waiting for a held `<ref>.lock`: git holds one for milliseconds (a
        background `git gc`'s pack-refs does), so it is waited for, up to REF_LOCK_WAIT_S; one a
        killed process left behind (_clear_stale_ref_lock), which would refuse every later
        write, is removed once. FileExistsError when the lock is still held at the deadline."""
        deadline = time.monotonic() + REF_LOCK_WAIT_S
        cleared = False
        while True:
            try:
                self._put_loose_ref(ref, new, sync=sync)
                return
            except FileExistsError:
                if not cleared and self._clear_stale_ref_lock(ref):
                    cleared = True
                    continue
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _put_loose_ref(self, ref: str, new: str, *, sync: bool = True) -> None:
        """Point the loose ref file `ref` at `new` the way git does: `<ref>.lock` created
        exclusively (git and libgit2 honour it), written, then renamed into place. Written
        from Python, not libgit2: the fsyncs then let go of the GIL. Durable (an answered
        write is on disk): the lock file is fsynced before the rename, its folder after."""
        path = self.path / ref
        lock = path.with_name(path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            try:
                os.write(fd, f"{new}\n".encode())
                if self.durable and sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(lock, path)
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        if self.durable and sync:
            fsync_path(path.parent)

    def _clear_stale_ref_lock(self, ref: str) -> bool:
        """Remove `<ref>.lock` when a dead process left it: one older than STALE_LOCK_S, or one
        made before this process opened the repo that has sat for LEFT_LOCK_S. Our own writers
        hold the flock of _ref_lock while they write a ref, so a lock found then is another
        process's; a live `git push` or `git gc` holds it for milliseconds, not seconds."""
        lock = self.path / f"{ref}.lock"
        try:
            made = lock.stat().st_mtime
        except OSError:
            return False
        age = time.time() - made
        if age < STALE_LOCK_S and not (made < self.opened_at and age >= LEFT_LOCK_S):
            return False  # maybe a live `git push` into the repo: let it finish
        lock.unlink(missing_ok=True)
        log.warning("removed %s, left %.0f s ago by a process that died while moving a ref", lock, age)
        return True

    @contextmanager
    def ref_lock(self) -> Iterator[None]:
        """The lock move_branch holds: hold it to read, check and update another ref as one
        step across processes (the accepted-head statement's forward-only swap)."""
        with self._ref_lock():
            yield

    @contextmanager
    def _ref_lock(self) -> Iterator[None]:
        with open(self.path / "mailstate.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_root(self, commit: str) -> bool:
        """True when `commit` has no parents."""
        obj = self.repo[commit]
        return isinstance(obj, pygit2.Commit) and not obj.parents

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        if ancestor == descendant:
            return True
        try:
            return bool(self.repo.descendant_of(pygit2.Oid(hex=descendant), pygit2.Oid(hex=ancestor)))
        except (pygit2.GitError, ValueError, KeyError):
            return False

    def commits_between(self, old: str, new: str) -> int | None:
        """How many commits `new` is ahead of `old`, or None when unrelated/unknown."""
        try:
            ahead, _behind = self.repo.ahead_behind(pygit2.Oid(hex=new), pygit2.Oid(hex=old))
        except (pygit2.GitError, ValueError, KeyError):
            return None
        return int(ahead)


def git(*args: str, cwd: Path | str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the git CLI with a clean, predictable configuration."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise StoreError(f"git {args[0]} failed: {exc.stderr.strip()[:500]}") from exc
    except OSError as exc:
        raise StoreError("git is not installed.") from exc
