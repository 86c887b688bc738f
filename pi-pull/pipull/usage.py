"""Mailbox usage: bytes and messages per Maildir, measured cheaply from the file names.

Dovecot (and Postfix's virtual agent) name a delivered message ``<unique>,S=<size>[,W=<n>]:2,<flags>``:
the ``S=`` field is the message's size in bytes, so counting a mailbox needs one directory
listing per ``cur``/``new`` folder and no ``stat`` at all. A name without ``S=`` is measured
with ``lstat`` instead.

What is counted: every file in ``cur/`` and ``new/`` of the Maildir root and of each subfolder
(``.Sent``, ``.Trash``, ``.a.b`` ...), with the Maildir root at ``<home>/Maildir`` (Dovecot's
``mail_location = maildir:~/Maildir``, as the bundle ships) or at ``<home>`` itself (Postfix's
virtual delivery). ``tmp/`` (deliveries in progress) and Dovecot's own files (indexes,
uidlist) are not mail. Symlinks are never followed: a home or a folder that is a symlink
counts as empty, so nothing outside the mail root is ever read.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .fsutil import write_file

_SIZE_RE = re.compile(r",S=([0-9]{1,15})(?:[,:]|$)")
MESSAGE_DIRS = ("cur", "new")

Usage = tuple[int, int]  # (bytes, messages)


def _count_dir(path: str) -> Usage:
    """(bytes, files) of one cur/ or new/ directory (not followed if it is a symlink)."""
    try:
        it = os.scandir(path)
    except OSError:
        return 0, 0
    return _count_entries(it)


def _count_entries(it: Any) -> Usage:
    """(bytes, files) of an open ``os.scandir`` iterator of a cur/ or new/ directory (closed here)."""
    used = count = 0
    with it:
        for entry in it:
            name = entry.name
            if name.startswith("."):
                continue
            m = _SIZE_RE.search(name)
            if m is not None:
                used += int(m.group(1))
                count += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                used += st.st_size
                count += 1
    return used, count


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _folder(path: str, subfolders: list[str] | None) -> Usage:
    """(bytes, messages) of one Maildir folder: one listing finds its cur/ and new/ (real
    directories only) and, for the root (``subfolders`` is a list), its ``.<name>`` subfolders."""
    used = count = 0
    try:
        it = os.scandir(path)
    except OSError:
        return 0, 0
    with it:
        for entry in it:
            name = entry.name
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if name in MESSAGE_DIRS:
                b, n = _count_dir(entry.path)
                used += b
                count += n
            elif subfolders is not None and name.startswith(".") and name not in (".", ".."):
                subfolders.append(entry.path)  # Maildir++: ".Sent", ".a.b"
    return used, count


def measure_maildir(home: str) -> Usage:
    """(bytes, messages) of the Maildir of one home; (0, 0) when it does not exist (yet)."""
    if not _is_real_dir(home):
        return 0, 0
    root = os.path.join(home, "Maildir")
    if not _is_real_dir(root):
        root = home
    subfolders: list[str] = []
    used, count = _folder(root, subfolders)
    for folder in subfolders:
        b, n = _folder(folder, None)
        used += b
        count += n
    return used, count


def measure(mail_root: str, mailboxes: Iterable[tuple[str, str, str]]) -> Iterator[dict[str, object]]:
    """The report's usage entries for ``(domain, local, id)`` triples (format 2 homes
    ``<mail_root>/<domain>/<local>~<id>``); a mailbox without a Maildir yet reports zeros.

    The triples come from the validated ``mailboxes`` fragments of the live release, so no
    path built here can leave the mail root."""
    for domain, local, box_id in mailboxes:
        used, count = measure_maildir(os.path.join(mail_root, domain, f"{local}~{box_id}"))
        yield {"email": f"{local}@{domain}", "id": box_id, "used_bytes": used, "messages": count}


# --------------------------------------------------------------------------- incremental, bounded
#
# What a full walk costs at 100k mailboxes (1.3M inodes, cold page cache: ~90 s) must not block a
# tick: a tick that applies a new commit would wait for it. So the node keeps, in
# ``<root>/usage-cache/`` next to state.json:
#
# * ``pass``: the mailboxes of the pass in progress, one ``<key> <domain> <local> <id>`` line each in
#   processing order, under a JSON header naming the commit they were listed from. Listed once per
#   pass (the git side costs ~2 s at 100k), so the ticks that continue a pass never read git.
# * ``c<nn>.json`` (SHARDS files): per mailbox, the kind of root (``M``: <home>/Maildir, ``H``: the
#   home itself), the root's signature and, per folder (INBOX ``""`` and each ``.<name>``), the
#   signature + bytes + count of its ``cur/`` and ``new/``. A signature is ``<mtime_ns>:<ino>`` of
#   an ``lstat``; ``-`` for a folder that is not a real directory; ``""`` (matches nothing) when
#   the mtime was within DIRTY_WINDOW_S of the measurement, because a change in that same
#   timestamp unit would leave the mtime as it was. Delivery adds a file to ``new/``, reading it
#   renames it to ``cur/``, a flag change renames it in ``cur/``: each changes the folder's mtime,
#   so an unchanged signature means an unchanged listing. New or removed subfolders change the
#   root's mtime, and only then is the root listed again.
#
# Mailboxes are processed in the order of their key ``<shard>/<domain>/<local>~<id>`` (shard =
# crc32(domain) % SHARDS, stable as mailboxes come and go), so one tick's slice touches a few
# consecutive shard files: it reads and rewrites only those. Every file is written atomically,
# holds only mailboxes of the current pass, and is safe to lose: a missing, oversized or damaged
# file (or entry) is a cache miss, and the folders are listed again.

SHARDS = 64
DIRTY_WINDOW_S = 2.0
MAX_CACHED_FOLDERS = 1000  # a mailbox with more subfolders is listed in full every pass, not cached
MAX_CACHE_FILE_BYTES = 64 * 1024 * 1024  # a shard file: 1/256 of the mailboxes
# The pass file lists every mailbox (~85 bytes each: 82.6 MB at 1M), so it has its own limit: under
# the shards' 64 MiB it would count as lost on every tick at 1M, and each tick would list all
# mailboxes from git again and rewrite the file (~20 s a tick, for the length of a pass).
MAX_PASS_FILE_BYTES = 1024 * 1024 * 1024
MAX_ENTRIES_PER_STEP = 100_000  # the server takes up to 200k per report
CACHE_VERSION = 1
USAGE_CACHE_DIR = "usage-cache"  # under [paths] root, next to state.json
PASS_STATE = "usage_pass"  # the key in state.json's lifecycle object while a pass is in progress

Box = tuple[str, str, str]  # (domain, local, id)
Folder = list[object]  # [sub, cur_sig, cur_bytes, cur_n, new_sig, new_bytes, new_n]


def box_key(domain: str, local: str, box_id: str) -> str:
    """The processing-order key of a mailbox; its first two characters name its shard file."""
    return f"{zlib.crc32(domain.encode()) % SHARDS:02x}/{domain}/{local}~{box_id}"


def _is_folder_name(name: object) -> bool:
    """ "" (the INBOX) or a Maildir++ ``.<name>``: a path is made of it, so a damaged cache must
    not be able to name anything outside the home (``..``, ``/``)."""
    return isinstance(name, str) and (
        name == "" or (name.startswith(".") and name not in (".", "..") and "/" not in name and "\0" not in name)
    )


def _read_limited(path: str, limit: int = MAX_CACHE_FILE_BYTES) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


class Scanner:
    """The incremental, time-bounded usage measurement (see the comment above).

    ``step()`` continues the pass recorded in ``ls`` (state.json's lifecycle object) for at most
    ``budget_s`` and returns the entries it measured. Seams for the tests: ``now`` (epoch seconds,
    compared with the folders' mtimes), ``monotonic`` (the budget), ``scandir`` (every
    directory listing goes through it) and the size limits of a shard file and of the pass file."""

    def __init__(
        self,
        mail_root: str,
        cache_dir: str,
        budget_s: float,
        *,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        scandir: Callable[[str], Any] = os.scandir,
        max_file_bytes: int = MAX_CACHE_FILE_BYTES,
        max_pass_bytes: int = MAX_PASS_FILE_BYTES,
    ) -> None:
        self.mail_root = mail_root
        self.max_file_bytes = max_file_bytes  # a shard file
        self.max_pass_bytes = max_pass_bytes  # the pass file (grows with the node: its own limit)
        self.cache_dir = cache_dir
        self.budget_s = budget_s
        self.now = now
        self.monotonic = monotonic
        self.scandir = scandir
        self.listed = 0  # directory listings of the last step (a figure for the log and the bench)
        self.hits = 0  # cur/new folders of the last step taken from the cache

    # ---- files

    def _path(self, name: str) -> str:
        return os.path.join(self.cache_dir, name)

    def _write(self, name: str, data: bytes) -> None:
        # Atomic (a temp file renamed over the old one) but not fsynced: a file that a crash
        # leaves empty or half written is damage, which costs one pass its listings, never a
        # wrong figure.
        path = self._path(name)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            write_file(tmp, data, 0o600)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written only costs the next pass its listings

    def _load_pass(self) -> tuple[str, list[str], list[Box]] | None:
        data = _read_limited(self._path("pass"), self.max_pass_bytes)
        if data is None:
            return None
        try:
            head, _, body = data.partition(b"\n")
            meta = json.loads(head)
            lines = body.decode("utf-8").splitlines()
            if not (
                isinstance(meta, dict)
                and meta.get("v") == CACHE_VERSION
                and meta.get("root") == self.mail_root
                and isinstance(meta.get("commit"), str)
                and meta.get("n") == len(lines)
            ):
                return None
            keys: list[str] = []
            boxes: list[Box] = []
            for line in lines:
                key, domain, local, box_id = line.split(" ")
                if key != box_key(domain, local, box_id) or (keys and key <= keys[-1]):
                    return None
                keys.append(key)
                boxes.append((domain, local, box_id))
        except (ValueError, UnicodeDecodeError):
            return None
        return meta["commit"], keys, boxes

    def _save_pass(self, commit: str, keys: list[str], boxes: list[Box]) -> None:
        head = json.dumps({"v": CACHE_VERSION, "root": self.mail_root, "commit": commit, "n": len(keys)})
        body = "".join(f"{k} {d} {lo} {i}\n" for k, (d, lo, i) in zip(keys, boxes))
        self._write("pass", (head + "\n" + body).encode("utf-8"))

    def _drop_shards(self, used: set[str]) -> None:
        """Remove the shard files no mailbox of the new pass falls into (the rest are pruned as
        the pass rewrites them), so the cache never holds more than one pass's mailboxes."""
        try:
            names = os.listdir(self.cache_dir)
        except OSError:
            return
        for name in names:
            if name.startswith("c") and name.endswith(".json") and name[1:3] not in used:
                try:
                    os.unlink(self._path(name))
                except OSError:
                    pass

    def _load_shard(self, shard: str) -> dict[str, Any]:
        data = _read_limited(self._path(f"c{shard}.json"), self.max_file_bytes)
        if data is None:
            return {}
        try:
            doc = json.loads(data)
        except ValueError:
            return {}
        if not (
            isinstance(doc, dict)
            and doc.get("v") == CACHE_VERSION
            and doc.get("root") == self.mail_root
            and isinstance(doc.get("boxes"), dict)
        ):
            return {}
        boxes: dict[str, Any] = doc["boxes"]
        return boxes

    def _save_shard(self, shard: str, old: dict[str, Any], entries: dict[str, Any]) -> None:
        if entries == old:
            return  # nothing changed in this shard: no write (the usual case of an incremental pass)
        doc = {"v": CACHE_VERSION, "root": self.mail_root, "boxes": entries}
        self._write(f"c{shard}.json", json.dumps(doc, separators=(",", ":")).encode())

    # ---- one mailbox

    def _sig(self, path: str, t: float) -> tuple[str, bool]:
        """(signature, is a real directory) of ``path`` (see the comment above)."""
        try:
            st = os.lstat(path)
        except OSError:
            return "-", False
        if not stat.S_ISDIR(st.st_mode):
            return "-", False
        if st.st_mtime >= t - DIRTY_WINDOW_S:
            return "", True
        return f"{st.st_mtime_ns}:{st.st_ino}", True

    def _count(self, path: str) -> Usage:
        self.listed += 1
        try:
            it = self.scandir(path)
        except OSError:
            return 0, 0
        return _count_entries(it)

    def _subfolders(self, root: str) -> list[str]:
        """The ``.<name>`` subfolders of a Maildir root (real directories only), sorted."""
        self.listed += 1
        out = []
        try:
            it = self.scandir(root)
        except OSError:
            return []
        with it:
            for entry in it:
                name = entry.name
                if name.startswith(".") and name not in (".", ".."):
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            out.append(name)
                    except OSError:
                        continue
        return sorted(out)

    def measure_home(self, home: str, cached: Any) -> tuple[Usage, Any]:
        """(bytes, messages) of one home and its new cache entry (None: nothing to keep)."""
        t = self.now()
        hsig, is_dir = self._sig(home, t)
        if not is_dir:
            return (0, 0), None
        root, kind = home + "/Maildir", "M"
        rsig, is_dir = self._sig(root, t)
        if not is_dir:
            root, kind, rsig = home, "H", hsig
        old: dict[str, list[Any]] = {}
        subs: list[str] | None = None
        try:
            if isinstance(cached, list) and len(cached) == 3 and cached[0] == kind and isinstance(cached[2], list):
                for f in cached[2]:
                    if isinstance(f, list) and len(f) == 7 and _is_folder_name(f[0]):
                        old[f[0]] = f
                if rsig and cached[1] == rsig:
                    subs = [s for s in old if s]
        except TypeError:
            old, subs = {}, None
        if subs is None:
            subs = self._subfolders(root)
        used = count = 0
        folders: list[Folder] = []
        for sub in ["", *subs]:
            prev = old.get(sub)
            row: Folder = [sub]
            for i, name in enumerate(MESSAGE_DIRS):
                path = f"{root}/{sub}/{name}" if sub else f"{root}/{name}"
                sig, is_dir = self._sig(path, t)
                b = n = 0
                if is_dir:
                    hit = prev is not None and sig and prev[1 + 3 * i] == sig
                    pb, pn = (prev[2 + 3 * i], prev[3 + 3 * i]) if hit and prev is not None else (None, None)
                    if type(pb) is int and type(pn) is int and pb >= 0 and pn >= 0:
                        b, n = pb, pn
                        self.hits += 1
                    else:
                        b, n = self._count(path)
                used += b
                count += n
                row += [sig, b, n]
            folders.append(row)
        entry = [kind, rsig, folders] if len(folders) <= MAX_CACHED_FOLDERS else None
        return (used, count), entry

    # ---- the pass

    def step(self, ls: dict[str, Any], commit: str, list_boxes: Callable[[], Iterable[Box]]) -> list[dict[str, object]]:
        """Continue (or start) the pass in ``ls[PASS_STATE]`` for at most ``budget_s``: the
        entries measured. ``list_boxes`` (the release's mailboxes, from git) is called only
        when a pass starts or its ``pass`` file is lost. When the pass is complete,
        ``PASS_STATE`` is removed from ``ls``."""
        self.listed = self.hits = 0
        state = ls.get(PASS_STATE)
        after = state.get("after") if isinstance(state, dict) else None
        loaded = self._load_pass() if isinstance(after, str) else None
        if loaded is not None and isinstance(state, dict) and loaded[0] != state.get("commit"):
            loaded = None  # not this pass's file (state.json and the cache disagree): list again
        if loaded is None:
            boxes = sorted((box_key(d, lo, i), (d, lo, i)) for d, lo, i in list_boxes())
            keys, blist = [k for k, _ in boxes], [b for _, b in boxes]
            self._save_pass(commit, keys, blist)
            self._drop_shards({k[:2] for k in keys})
        else:
            commit, keys, blist = loaded
        # A pass file re-listed mid-pass continues after the last mailbox done, wherever it is now.
        pos = bisect.bisect_right(keys, after) if isinstance(after, str) else 0
        # The budget is for measuring, after the pass list is loaded: at 1M mailboxes loading it
        # took longer than the budget, so every tick measured one mailbox and a pass never ended.
        t0 = self.monotonic()
        out: list[dict[str, object]] = []
        shard = ""
        entries: dict[str, Any] = {}
        kept: dict[str, Any] = {}
        while pos < len(keys):
            key = keys[pos]
            if key[:2] != shard:
                if shard:
                    self._save_shard(shard, kept, self._merge(kept, entries, keys, shard))
                shard, kept, entries = key[:2], self._load_shard(key[:2]), {}
            domain, local, box_id = blist[pos]
            (used, count), entry = self.measure_home(f"{self.mail_root}/{domain}/{local}~{box_id}", kept.get(key))
            if entry is not None:
                entries[key] = entry
            out.append({"email": f"{local}@{domain}", "id": box_id, "used_bytes": used, "messages": count})
            pos += 1
            if self.monotonic() - t0 >= self.budget_s or len(out) >= MAX_ENTRIES_PER_STEP:
                break
        if shard:
            self._save_shard(shard, kept, self._merge(kept, entries, keys, shard))
        if pos >= len(keys):
            ls.pop(PASS_STATE, None)
        else:
            ls[PASS_STATE] = {"commit": commit, "after": keys[pos - 1] if pos else ""}
        return out

    @staticmethod
    def _merge(kept: dict[str, Any], entries: dict[str, Any], keys: list[str], shard: str) -> dict[str, Any]:
        """A shard's new content: this step's entries, plus the old ones of the pass's mailboxes
        not measured yet (nothing else, so a shard never outgrows its mailboxes)."""
        lo = bisect.bisect_left(keys, shard + "/")
        hi = bisect.bisect_left(keys, shard + "0")  # "0" follows "/"
        out = dict(entries)
        for key in keys[lo:hi]:
            if key not in out and key in kept:
                out[key] = kept[key]
        return out
