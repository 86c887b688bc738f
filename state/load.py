"""Loading a state: from a commit (with a parse cache) or from a checkout on disk.

Parsing 100k mailboxes of YAML takes seconds, so a commit is loaded through a cache keyed
by git blob id: a blob's content never changes, so a cached parse is always right, and a
restart (or a pull of someone else's commit) only parses the files that changed. The cache
file is authenticated (HMAC) and is JSON, so a damaged or planted one is only a slower start.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mailstate.compiler.render import compile_state, diff_rendered
from mailstate.state import aliases, files, placement
from mailstate.state import limits as lim
from mailstate.state.domainmap import DomainMap, Lazy, Placement, placement_of
from mailstate.state.errors import StateInvalid
from mailstate.state.gitrepo import GitRepo
from mailstate.state.models import DomainFile, Limits, Mailbox, NodesFile, ProjectFile, Settings, SpamPolicy
from mailstate.state.snapshot import Snapshot

CACHE_VERSION = 5
CACHE_MAGIC = b"mailstate-parse-cache-5"
MAX_CACHE_BYTES = 1 << 30  # far above 100k mailboxes (~25 MB); a bigger file is not ours
_KEY_BYTES = 32

log = logging.getLogger("mailstate.cache")


@functools.cache
def _schema_tag() -> str:
    # A change to the models changes what an entry means: it invalidates every cache.
    schema = json.dumps(DomainFile.model_json_schema(), sort_keys=True).encode()
    return hashlib.sha256(schema + str(CACHE_VERSION).encode()).hexdigest()[:16]


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file (not a symlink, FIFO, folder) of at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data


# Building 120k models with model_construct takes ~1 s at 100k mailboxes; setting the four
# attributes model_construct sets, directly, takes a third of that. Only for plain models: no
# private attributes, no extra fields (the cache test compares the result with parsed models).
_new = object.__new__
_set = object.__setattr__
_DOMAIN_FIELDS = set(DomainFile.model_fields)
_MAILBOX_FIELDS = set(Mailbox.model_fields)
_FAST = all(not m.__private_attributes__ and m.model_config.get("extra") == "forbid" for m in (DomainFile, Mailbox))
# One `__pydantic_fields_set__` shared by every loaded model of a class, instead of a set per
# model: a 6-name set is 472 bytes, 40% of what a mailbox costs in memory (~470 MB at 1M
# mailboxes). Sharing is safe because the models are frozen (nothing sets an attribute, so
# nothing adds to the set in place), model_copy copies the set before it updates the copy, and
# the set already holds every field name. Nothing in mailstate reads it (no exclude_unset).
_SHARED_FIELDS_SET: dict[type[Any], set[str]] = {DomainFile: set(_DOMAIN_FIELDS), Mailbox: set(_MAILBOX_FIELDS)}


def _share_fields_set(dom: DomainFile) -> DomainFile:
    """`dom` (validated) with its and its mailboxes' fields sets replaced by the shared ones."""
    if _FAST:
        shared = _SHARED_FIELDS_SET[Mailbox]
        for box in dom.mailboxes.values():
            _set(box, "__pydantic_fields_set__", shared)
        _set(dom, "__pydantic_fields_set__", _SHARED_FIELDS_SET[DomainFile])
    return dom


def _built(cls: type[Any], values: dict[str, Any], names: set[str]) -> Any:
    if values.keys() != names:
        raise ValueError(f"a cached {cls.__name__} has fields {sorted(values)}")
    if not _FAST:
        return cls.model_construct(**values)
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", _SHARED_FIELDS_SET[cls])
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


# The fields whose values are JSON already (str, int, bool, None, lists and dicts of them), so
# an entry can be written from the models' __dict__ without pydantic's serializer (about half of
# a cache write). A model with any other field uses model_dump.
# A mailbox's owner settings (state/owners.py: vacation, filters, app passwords) and its
# `sending` (state.sending) and `spam_policy` (state/spam.py), and a domain's `limits` and
# `spam_policy`, are models, not JSON: a mailbox or domain that has any is dumped and validated
# by pydantic (few have them). `sender_rules` (sender -> allow|block) is JSON already.
_MODEL_FIELDS = ("vacation", "filters", "app_passwords", "sending", "spam_policy")
_JSON_NATIVE = _FAST and _DOMAIN_FIELDS == {"domain", "project_id", "email_enabled", "alias_of", "home", "moving_to", "moved_from", "replica", "limits", "spam_policy", "sender_rules", "mailboxes", "aliases"} and _MAILBOX_FIELDS == {
    "id", "password", "quota_mb", "active", "forward_to", "keep_copy", "sender_rules", *_MODEL_FIELDS
}  # fmt: skip


def _plain_box(box: dict[str, Any]) -> bool:
    return all(box.get(name) is None for name in _MODEL_FIELDS)


def _domain_to_json(dom: DomainFile) -> dict[str, Any]:
    """`dom.model_dump(mode="json")`, faster for the JSON-native models (tests compare the two)."""
    if not _JSON_NATIVE:
        return dom.model_dump(mode="json")
    boxes = {
        local: box.__dict__ if _plain_box(box.__dict__) else box.model_dump(mode="json")
        for local, box in dom.mailboxes.items()
    }
    out = {**dom.__dict__, "mailboxes": boxes}
    if dom.limits is not None:
        out["limits"] = dom.limits.model_dump(mode="json")
    if dom.spam_policy is not None:
        out["spam_policy"] = dom.spam_policy.model_dump(mode="json")
    return out


def _domain_from_json(raw: dict[str, Any]) -> DomainFile:
    # Built without validation: the entry was validated when it was parsed, and its MAC
    # proves it is the one this data dir wrote for that blob (a mailbox with model fields is
    # validated again, to build its nested models).
    raw["mailboxes"] = {
        local: _built(Mailbox, box, _MAILBOX_FIELDS) if _plain_box(box) else _share_box(Mailbox.model_validate(box))
        for local, box in raw["mailboxes"].items()
    }
    if raw.get("limits") is not None:
        raw["limits"] = Limits.model_validate(raw["limits"])
    if raw.get("spam_policy") is not None:
        raw["spam_policy"] = SpamPolicy.model_validate(raw["spam_policy"])
    dom: DomainFile = _built(DomainFile, raw, _DOMAIN_FIELDS)
    return dom


def _share_box(box: Mailbox) -> Mailbox:
    if _FAST:
        _set(box, "__pydantic_fields_set__", _SHARED_FIELDS_SET[Mailbox])
    return box


def _entry_mac(key: bytes, oid: str, data: bytes) -> str:
    # Binds the entry to its blob id, so an entry filed under another blob never verifies.
    mac = hashlib.blake2b(oid.encode(), key=key, digest_size=16)
    mac.update(data)
    return mac.hexdigest()


class _CacheFile:
    """The bytes of one cache file as read at open: where `Lazy` entries are parsed from.

    Read whole into memory (not mmapped): the file can then be replaced, truncated or damaged
    on disk without a reader of the old one ever faulting.
    """

    def __init__(self, data: bytes, body_start: int, key: bytes | None) -> None:
        self.data = data
        self.body_start = body_start
        self.key = key
        self.repo: GitRepo | None = None  # set by load_commit: where a bad entry is parsed from instead

    def bytes_of(self, entry: Lazy) -> bytes | None:
        """The entry's bytes, unverified (None when the file is too short for them)."""
        start = self.body_start + entry.offset
        data = self.data[start : start + entry.length]
        return data if len(data) == entry.length else None

    def raw(self, entry: Lazy) -> bytes | None:
        """The entry's JSON bytes if its MAC verifies, else None."""
        data = self.bytes_of(entry)
        if data is None:
            return None
        if self.key is not None and not hmac.compare_digest(_entry_mac(self.key, entry.oid, data), entry.mac):
            return None
        return data  # key None: this process's own parse (state.load._parse_in_workers), not a file

    def load(self, entry: Lazy) -> DomainFile:
        data = self.raw(entry)
        if data is not None:
            try:
                dom = _domain_from_json(json.loads(data))
                if dom.domain == entry.domain:
                    return dom
            except Exception:  # a verified entry that does not build: not ours after all
                pass
        log.warning("parse cache entry for %s not used (damaged); parsing it from git", entry.domain)
        if self.repo is None:
            raise StateInvalid(
                f"The parse cache entry for {entry.domain} is damaged and no repository is at hand to parse it from."
            )
        path = files.domain_path(entry.domain)
        return _share_fields_set(files.parse_domain(self.repo.blob(entry.oid), path))


def _row(value: Any, kind: type, nullable: bool = False) -> Any:
    if (value is None and nullable) or (type(value) is kind):
        return value
    raise ValueError(f"a cache index field is {type(value).__name__}, not {kind.__name__}")


@dataclass
class ParseCache:
    """blob id → parsed DomainFile (or a `Lazy` entry of the file), persisted in the data dir.

    The file (`DIR/cache/domains.json`) is a header line, an index (JSON: per blob id the
    domain, its project, alias target, format fit, the domains it hands mail to (state.aliases
    links), its entry's place and MAC, then the fields of the placement index: home, moving_to,
    moved_from, replica, mailbox count), then the
    entries (each the JSON of one DomainFile). The header carries an HMAC-SHA256 of the index
    under a per-data-dir secret (`DIR/cache/key`, 0600, made on first use) and each entry a
    keyed BLAKE2b of its blob id and bytes, so a start reads the index alone (~0.3 s at 200k
    domains) and a domain is parsed on first use (state.domainmap). JSON cannot run code when
    it loads. An index whose MAC does not match (hand-edited, torn, from another data dir or
    another version of the models) is not used; an entry whose MAC does not match is parsed
    from git instead, so a poisoned entry is never served. Any failure to read or write the
    cache (a file where the folder should be, a folder or symlink where the file should be,
    no permission, a full disk) logs a warning and means no cache: the state is parsed from
    git, and the cache is rebuilt when it can be.
    """

    path: Path | None = None
    entries: dict[str, DomainFile | Lazy] = field(default_factory=dict)
    dirty: bool = False
    file: _CacheFile | None = None

    @property
    def key_path(self) -> Path | None:
        return None if self.path is None else self.path.parent / "key"

    @classmethod
    def open(cls, path: Path | None) -> ParseCache:
        """The cache at `path` (None: in memory only); never raises, an unusable file is no cache."""
        cache = cls(path=path)
        if path is None:
            return cache
        _drop_legacy_pickle(path)
        try:
            data = _read_regular(path, MAX_CACHE_BYTES)
        except FileNotFoundError:
            return cache
        except OSError as exc:
            log.warning("parse cache %s not used (%s); parsing the state from git", path, exc)
            return cache
        try:
            cache.entries = cache._decode(data)
        except Exception as exc:  # any damage at all is only a slower start
            log.warning("parse cache %s not used (%s); parsing the state from git, it will be rebuilt", path, exc)
            cache.entries = {}
            cache.file = None
            cache.dirty = True  # rewrite it with what this load parses
        return cache

    def _key(self, create: bool) -> bytes:
        assert self.key_path is not None
        try:
            key = _read_regular(self.key_path, _KEY_BYTES)
            if len(key) == _KEY_BYTES:
                return key
        except FileNotFoundError:
            if not create:
                raise
        if not create:
            raise ValueError(f"{self.key_path} is not a cache key")
        # A new (or a broken) key: a cache signed with the old one simply stops matching.
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(_KEY_BYTES)
        fd, tmp = tempfile.mkstemp(dir=self.key_path.parent, prefix=".key-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
            os.replace(tmp, self.key_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def _decode(self, data: bytes) -> dict[str, DomainFile | Lazy]:
        nl = data.find(b"\n", 0, 512)
        parts = data[:nl].split(b" ") if nl > 0 else []
        if len(parts) != 4 or parts[0] != CACHE_MAGIC:
            if data.startswith(b"mailstate-parse-cache "):
                raise ValueError("written in the cache format of an older mailstate")
            raise ValueError("not a mailstate parse cache")
        if parts[1].decode("ascii") != _schema_tag():
            raise ValueError("written for another version of the models")
        index_len = int(parts[2])
        index = data[nl + 1 : nl + 1 + index_len]
        if len(index) != index_len:
            raise ValueError("truncated")
        key = self._key(create=False)
        mac = hmac.new(key, parts[1] + b"\n" + index, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac.encode(), parts[3]):
            raise ValueError("its MAC does not match (edited, torn, or from another data dir)")
        rows = json.loads(index)
        if not isinstance(rows, list):
            raise ValueError("its index is not a JSON list")
        source = _CacheFile(data, nl + 1 + index_len, key)
        entries: dict[str, DomainFile | Lazy] = {}
        for (
            oid,
            domain,
            project_id,
            alias_of,
            fits,
            offset,
            length,
            entry_mac,
            links,
            home,
            moving_to,
            moved_from,
            replica,
            boxes,
        ) in rows:
            if type(links) is not list or any(type(name) is not str for name in links):
                raise ValueError("a cache index field is not a list of domain names")
            where = (
                _row(home, str, nullable=True),
                _row(moving_to, str, nullable=True),
                _row(moved_from, str, nullable=True),
                _row(replica, str, nullable=True),
                _row(boxes, int),
            )
            entries[_row(oid, str)] = Lazy(
                source,
                _row(domain, str),
                oid,
                _row(offset, int),
                _row(length, int),
                _row(entry_mac, str),
                _row(project_id, int, nullable=True),
                _row(alias_of, str, nullable=True),
                _row(fits, int),
                frozenset(links),
                where,
            )
        self.file = source
        return entries

    def bind(self, repo: GitRepo) -> None:
        """Where entries that fail their MAC are parsed from instead."""
        if self.file is not None:
            self.file.repo = repo

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache if it changed, keeping only `keep` (blob ids); never raises.

        Entries still unparsed are copied as bytes from the file they were read from, so a
        restart after a few writes re-encodes only the domains those writes changed."""
        if self.path is None or not self.dirty:
            return
        if keep is not None:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
        try:
            key = self._key(create=True)
            tag = _schema_tag().encode()
            rows: list[list[Any]] = []
            chunks: list[bytes] = []
            offset = 0
            for oid, entry in self.entries.items():
                if isinstance(entry, Lazy):
                    source = entry.source
                    data = source.bytes_of(entry) if isinstance(source, _CacheFile) else None
                    if data is not None and isinstance(source, _CacheFile) and source.key == key:
                        # Copied with its MAC, unverified: the MAC is checked when it is read.
                        mac = entry.mac
                    elif data is not None and isinstance(source, _CacheFile) and source.key is None:
                        mac = _entry_mac(key, oid, data)  # this process's workers' parse: no MAC yet
                    else:  # another key's file, or a short entry
                        data = entry_json(source.load(entry))
                        mac = _entry_mac(key, oid, data)
                    meta = [entry.project_id, entry.alias_of, entry.fits, *placement_of(entry)]
                    links = sorted(entry.links)
                else:
                    data = entry_json(entry)
                    mac = _entry_mac(key, oid, data)
                    meta = [entry.project_id, entry.alias_of, files.format_fits(entry), *placement_of(entry)]
                    links = sorted(aliases.links(entry))
                # The links and the placement fields go last, after the entry's place and MAC.
                rows.append([oid, entry.domain, *meta[:3], offset, len(data), mac, links, *meta[3:]])
                chunks.append(data)
                offset += len(data)
            index = json.dumps(rows, separators=(",", ":")).encode()
            mac_index = hmac.new(key, tag + b"\n" + index, hashlib.sha256).hexdigest().encode()
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cache-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(b" ".join([CACHE_MAGIC, tag, str(len(index)).encode(), mac_index]) + b"\n")
                    fh.write(index)
                    fh.writelines(chunks)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except Exception as exc:  # e.g. cache/ is a file, domains.json a folder, a full disk
            log.warning("parse cache %s not written (%s); the server runs without it", self.path, exc)
            self.path = None  # don't retry on every load
        self.dirty = False


def entry_json(dom: DomainFile) -> bytes:
    """A cache entry's bytes for `dom` (also what state.parseworker hands back)."""
    return json.dumps(_domain_to_json(dom), separators=(",", ":")).encode()


def _drop_legacy_pickle(path: Path) -> None:
    # Format 1 of the cache was a pickle; it is never read (a pickle can run code), only removed.
    legacy = path.parent / "domains.pickle"
    try:
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink()
    except OSError:
        pass


# A cold start (no cache) parses every domain file: ~110 µs each with pydantic, 22 s for the
# 200k files of 1M mailboxes on one core. From this many files on, they are parsed in worker
# processes (state.parseworker), one per core, which hand back each entry's JSON and index fields; this process
# builds no model at all (the entries stay `Lazy` until read, state.domainmap).
PARALLEL_MIN = 5000


class _Parsed(NamedTuple):
    """One domain file a parse worker (state/parseworker.py) parsed: its index fields and JSON."""

    oid: str
    domain: str
    project_id: int | None
    alias_of: str | None
    fits: int
    links: frozenset[str]
    where: Placement
    data: bytes


def _parse_in_workers(repo: GitRepo, todo: list[tuple[str, str]], workers: int) -> list[Lazy] | None:
    """`todo` (path, oid) parsed by `workers` processes (state.parseworker), in order: Lazy
    entries over their JSON. None when a worker could not run (the caller parses here)."""
    procs = _start_workers(repo, workers)
    if procs is None:
        return None

    indexed = [(i, path, oid) for i, (path, oid) in enumerate(todo)]
    feeders = [
        threading.Thread(target=_feed, args=(proc, indexed[n::workers]), daemon=True) for n, proc in enumerate(procs)
    ]
    for thread in feeders:
        thread.start()
    found: dict[int, _Parsed] = {}
    failures: list[tuple[int, list[str]]] = []

    readers = [threading.Thread(target=_drain, args=(proc, found, failures), daemon=True) for proc in procs]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    for thread in feeders:
        thread.join()
    codes = [proc.wait() for proc in procs]
    if failures:
        raise StateInvalid(min(failures)[1][0], problems=min(failures)[1])  # the first bad file, as a serial parse
    if any(codes) or len(found) != len(todo):
        log.warning("parse workers failed (exit %s); parsing in this process", codes)
        return None
    return _lazy_entries([found[i] for i in range(len(todo))])


def _feed(proc: subprocess.Popen[bytes], share: list[tuple[int, str, str]]) -> None:
    """Hand one worker its share of the files, then close its input."""
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(f"{i} {path} {oid}\n" for i, path, oid in share).encode())
        proc.stdin.close()
    except OSError:  # it stopped early (a bad file): its answer says so
        pass


def _drain(proc: subprocess.Popen[bytes], found: dict[int, _Parsed], failures: list[tuple[int, list[str]]]) -> None:
    """Read one worker's answers into `found`, or its first failure into `failures`."""
    # One reader per worker: read in turn, a worker blocks on its full pipe while the
    # other is read, and the parse runs on one core.
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(b"{"):
            meta = json.loads(line)
            failures.append((int(meta["index"]), [str(p) for p in meta["problems"]]))
            break
        fields = line.decode().rstrip("\n").split("\t")
        index, oid, domain, project, alias_of, fits, links, home, moving_to, moved_from, replica, boxes, length = fields
        data = proc.stdout.read(int(length))
        found[int(index)] = _Parsed(
            oid,
            domain,
            int(project) if project else None,
            alias_of or None,
            int(fits),
            frozenset(links.split()),
            (home or None, moving_to or None, moved_from or None, replica or None, int(boxes)),
            data,
        )
    proc.stdout.close()


def _start_workers(repo: GitRepo, workers: int) -> list[subprocess.Popen[bytes]] | None:
    """`workers` state.parseworker processes on `repo`; None (and none left running) when one
    could not start."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mailstate.state.parseworker", str(repo.path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
            )
    except OSError as exc:
        log.warning("parse workers not started (%s); parsing in this process", exc)
        for proc in procs:
            proc.kill()
        return None
    return procs


def _lazy_entries(rows: list[_Parsed]) -> list[Lazy]:
    """Lazy entries over the workers' answers, their JSON in one buffer, in order."""
    source = _CacheFile(b"".join(row.data for row in rows), 0, None)
    out: list[Lazy] = []
    offset = 0
    for row in rows:
        out.append(
            Lazy(
                source,
                row.domain,
                row.oid,
                offset,
                len(row.data),
                "",
                row.project_id,
                row.alias_of,
                row.fits,
                row.links,
                row.where,
            )
        )
        offset += len(row.data)
    return out


def load_commit(
    repo: GitRepo, commit: str, cache: ParseCache | None = None, *, parallel_min: int = PARALLEL_MIN
) -> Snapshot:
    """The snapshot at `commit`, validated file by file (cached entries were validated when
    they were parsed; they stay unparsed until first read, state.domainmap). From
    `parallel_min` uncached files on, they are parsed in one worker process per core."""
    cache = cache or ParseCache()
    raw_settings = repo.read(commit, files.SETTINGS_PATH)
    if raw_settings is None:
        raise StateInvalid(f"{files.SETTINGS_PATH} is missing at {commit[:12]}.")
    settings = files.parse_settings(raw_settings)
    raw_nodes = repo.read(commit, files.NODES_PATH)
    nodes = files.parse_nodes(raw_nodes) if raw_nodes is not None else NodesFile()
    seen: set[str] = set()
    cache.bind(repo)
    listing = list(repo.walk_blobs(commit, files.DOMAINS_DIR))
    todo: list[tuple[str, str]] = []
    for path, oid in listing:
        seen.add(oid)
        entry = cache.entries.get(oid)
        if entry is None or files.domain_path(entry.domain) != path:
            todo.append((path, oid))
    workers = min(os.cpu_count() or 1, 8)
    parsed = _parse_in_workers(repo, todo, workers) if len(todo) >= parallel_min and workers > 1 else None
    if parsed is not None:
        for lazy in parsed:
            cache.entries[lazy.oid] = lazy
    else:
        for path, oid in todo:
            cache.entries[oid] = _share_fields_set(files.parse_domain(repo.blob(oid), path))
    cache.dirty = cache.dirty or bool(todo)
    domains: dict[str, DomainFile | Lazy] = {}
    for _path, oid in listing:
        entry = cache.entries[oid]
        domains[entry.domain] = entry
    cache.save(keep=seen)
    # The cache is keyed by blob, not by format: the ids' rule is checked on every load, from
    # each entry's stored fit; only a domain that breaks it is parsed to say how.
    dmap = DomainMap.of(domains)
    unfit = dmap.unfit(files.format_bit(settings.format))
    if unfit:
        problems = files.format_problems(settings.format, [dmap[name] for name in sorted(unfit)])
        raise StateInvalid(problems[0], problems=problems)
    return Snapshot.build(commit, settings, dmap, nodes, load_projects(repo, commit))


def load_projects(repo: GitRepo, commit: str) -> dict[int, ProjectFile]:
    """Every project file of `commit` (only projects with limits have one: few, small, parsed each time)."""
    out: dict[int, ProjectFile] = {}
    for path, oid in repo.walk_blobs(commit, files.PROJECTS_DIR):
        if files.project_from_path(path) is None:
            raise StateInvalid(f"{path}: unexpected file (project files live at projects/<pp>/<project_id>.yaml)")
        project = files.parse_project(repo.blob(oid), path)
        out[project.project_id] = project
    return out


@dataclass
class CheckoutState:
    """A state read from a working tree, with every problem found on the way."""

    settings: Settings | None
    domains: dict[str, DomainFile]
    nodes: NodesFile | None
    problems: list[str]
    projects: dict[int, ProjectFile] = field(default_factory=dict)

    def limits_state(self) -> lim.State:
        by_project: dict[int, set[str]] = {}
        for dom in self.domains.values():
            if dom.project_id is not None:
                by_project.setdefault(dom.project_id, set()).add(dom.domain)
        return lim.State(self.domains, by_project, self.projects)


def load_checkout(root: Path) -> CheckoutState:
    """Read and validate every state file of a checkout; collect all problems."""
    problems: list[str] = []
    settings = nodes = None
    try:
        settings = files.parse_settings((root / files.SETTINGS_PATH).read_bytes())
    except FileNotFoundError:
        problems.append(f"{files.SETTINGS_PATH}: missing")
    except StateInvalid as exc:
        problems.extend(exc.problems)
    nodes_file = root / files.NODES_PATH
    if nodes_file.exists():
        try:
            nodes = files.parse_nodes(nodes_file.read_bytes())
        except StateInvalid as exc:
            problems.extend(exc.problems)
    else:
        nodes = NodesFile()
    domains: dict[str, DomainFile] = {}
    base = root / files.DOMAINS_DIR
    for path in sorted(base.rglob("*")) if base.exists() else []:
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if files.domain_from_path(rel) is None:
            problems.append(f"{rel}: unexpected file (domain files live at domains/<bb>/<domain>.yaml)")
            continue
        try:
            dom = files.parse_domain(path.read_bytes(), rel)
        except StateInvalid as exc:
            problems.extend(exc.problems)
            continue
        if dom.domain in domains:
            problems.append(f"{rel}: duplicate domain {dom.domain}")
        domains[dom.domain] = dom
    if settings is not None:
        problems.extend(files.format_problems(settings.format, domains.values()))
    projects = load_checkout_projects(root, problems)
    return CheckoutState(settings, domains, nodes, problems, projects)


def load_checkout_projects(root: Path, problems: list[str] | None = None) -> dict[int, ProjectFile]:
    """The project files of a checkout; what does not parse goes to `problems` (or is left out)."""
    projects: dict[int, ProjectFile] = {}
    pbase = root / files.PROJECTS_DIR
    for path in sorted(pbase.rglob("*")) if pbase.exists() else []:
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if files.project_from_path(rel) is None:
            if problems is not None:
                problems.append(f"{rel}: unexpected file (project files live at projects/<pp>/<project_id>.yaml)")
            continue
        try:
            project = files.parse_project(path.read_bytes(), rel)
        except StateInvalid as exc:
            if problems is not None:
                problems.extend(exc.problems)
            continue
        projects[project.project_id] = project
    return projects


def read_rendered(root: Path) -> dict[str, bytes]:
    """Every file below `root/rendered`, keyed by repo path."""
    base = root / files.RENDERED_DIR
    if not base.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def check_checkout(root: Path) -> list[str]:
    """All problems of a checkout: schema, invariants, and rendered/ equal to compile()."""
    loaded = load_checkout(root)
    problems = list(loaded.problems)
    if loaded.settings is not None and not loaded.problems:
        problems.extend(problem_lines(aliases.problems(loaded.domains, loaded.domains)))
        problems.extend(lim.state_problems(loaded.limits_state()))
        problems.extend(_placement_problems(loaded.settings, loaded.domains, loaded.nodes or NodesFile()))
        if not problems:
            expected = compile_state(loaded.settings, loaded.domains.values(), loaded.projects, loaded.nodes)
            problems.extend(diff_rendered(expected, read_rendered(root)))
    return problems


def check_commit(repo: GitRepo, commit: str, cache: ParseCache | None = None) -> list[str]:
    """All problems of a commit: schema, invariants, and rendered/ equal to compile()."""
    try:
        snap = load_commit(repo, commit, cache)
    except StateInvalid as exc:
        return exc.problems
    actual = {path: repo.blob(oid) for path, oid in repo.walk_blobs(commit, files.RENDERED_DIR)}
    problems = [
        f"{path}: unexpected file at the top of the repo"
        for path in _top_level(repo, commit)
        if path
        not in {files.SETTINGS_PATH, files.NODES_PATH, files.DOMAINS_DIR, files.RENDERED_DIR, files.PROJECTS_DIR}
        and not path.startswith(".")
        and path not in {"README.md", "LICENSE"}
    ]
    problems.extend(problem_lines(aliases.problems(snap.domains, snap.domains)))
    problems.extend(lim.state_problems(lim.State(snap.domains, snap.by_project, snap.projects)))
    problems.extend(_placement_problems(snap.settings, snap.domains, snap.nodes))
    if not problems:
        expected = compile_state(snap.settings, snap.domains.values(), snap.projects, snap.nodes)
        problems.extend(diff_rendered(expected, actual))
    return problems


def problem_lines(found: list[aliases.Problem]) -> list[str]:
    """Cross-domain problems as `mailstate check` prints them: `<domain file>: <message>`."""
    return [f"{files.domain_path(p.domain)}: {p.message}" for p in found]


def _placement_problems(settings: Settings, domains: Mapping[str, DomainFile], nodes: NodesFile) -> list[str]:
    """state.placement's rules across domain files and nodes.yaml, for a whole state."""
    homed = [name for name, dom in domains.items() if dom.home is not None or dom.replica is not None]
    found = placement.problems(domains, nodes, homed)
    if homed and settings.format < 2:
        found.append(f"{files.SETTINGS_PATH}: format: placing domains on nodes (home:) needs state format 2")
    return found


def _top_level(repo: GitRepo, commit: str) -> list[str]:
    return [entry.name for entry in repo.tree(commit) if entry.name is not None]
