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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailstate.compiler.render import compile_state, diff_rendered
from mailstate.state import aliases, files
from mailstate.state.errors import StateInvalid
from mailstate.state.gitrepo import GitRepo
from mailstate.state.models import DomainFile, Mailbox, NodesFile, Settings
from mailstate.state.snapshot import Snapshot

CACHE_VERSION = 2
CACHE_MAGIC = b"mailstate-parse-cache"
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
# model: a 6-name set is 472 bytes, 40% of what a mailbox costs in memory (issue 14: ~470 MB at
# 1M mailboxes). Sharing is safe because the models are frozen (nothing sets an attribute, so
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
# an entry can be written from the models' __dict__ without pydantic's serializer (~half of a
# cache write: 0.56 s of 1.2 s at 100k mailboxes). A model with any other field uses model_dump.
_JSON_NATIVE = _FAST and _DOMAIN_FIELDS == {"domain", "project_id", "email_enabled", "alias_of", "mailboxes", "aliases"} and _MAILBOX_FIELDS == {
    "id", "password", "quota_mb", "active", "forward_to", "keep_copy"
}  # fmt: skip


def _domain_to_json(dom: DomainFile) -> dict[str, Any]:
    """`dom.model_dump(mode="json")`, faster for the JSON-native models (tests compare the two)."""
    if not _JSON_NATIVE:
        return dom.model_dump(mode="json")
    return {**dom.__dict__, "mailboxes": {local: box.__dict__ for local, box in dom.mailboxes.items()}}


def _domain_from_json(raw: dict[str, Any]) -> DomainFile:
    # Built without validation: the entry was validated when it was parsed, and its MAC
    # proves it is the one this data dir wrote for that blob.
    raw["mailboxes"] = {local: _built(Mailbox, box, _MAILBOX_FIELDS) for local, box in raw["mailboxes"].items()}
    dom: DomainFile = _built(DomainFile, raw, _DOMAIN_FIELDS)
    return dom


@dataclass
class ParseCache:
    """blob id → parsed DomainFile, persisted in the server's own data dir.

    The file (`DIR/cache/domains.json`) is JSON, which cannot run code when it loads, behind a
    header with an HMAC-SHA256 under a per-data-dir secret (`DIR/cache/key`, 0600, made on
    first use). A file whose MAC does not match (hand-edited, torn, from another data dir or
    another version of the models) is not used, so a poisoned entry is never served. Any
    failure to read or write the cache (a file where the folder should be, a folder or
    symlink where the file should be, no permission, a full disk) logs a warning and means
    no cache: the state is parsed from git, and the cache is rebuilt when it can be.
    """

    path: Path | None = None
    entries: dict[str, DomainFile] = field(default_factory=dict)
    dirty: bool = False

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

    def _decode(self, data: bytes) -> dict[str, DomainFile]:
        header, sep, body = data.partition(b"\n")
        parts = header.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != CACHE_MAGIC:
            raise ValueError("not a mailstate parse cache")
        if parts[1].decode("ascii") != _schema_tag():
            raise ValueError("written for another version of the models")
        mac = hmac.new(self._key(create=False), parts[1] + b"\n" + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac.encode(), parts[2]):
            raise ValueError("its MAC does not match (edited, torn, or from another data dir)")
        raw = json.loads(body)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {str(oid): _domain_from_json(entry) for oid, entry in raw.items()}

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache if it changed, keeping only `keep` (blob ids); never raises."""
        if self.path is None or not self.dirty:
            return
        if keep is not None:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
        try:
            key = self._key(create=True)
            tag = _schema_tag().encode()
            body = json.dumps({oid: _domain_to_json(dom) for oid, dom in self.entries.items()}, separators=(",", ":")).encode()
            mac = hmac.new(key, tag + b"\n" + body, hashlib.sha256).hexdigest().encode()
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cache-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(b" ".join([CACHE_MAGIC, tag, mac]) + b"\n" + body)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except Exception as exc:  # e.g. cache/ is a file, domains.json a folder, a full disk
            log.warning("parse cache %s not written (%s); the server runs without it", self.path, exc)
            self.path = None  # don't retry on every load
        self.dirty = False


def _drop_legacy_pickle(path: Path) -> None:
    # Format 1 of the cache was a pickle; it is never read (a pickle can run code), only removed.
    legacy = path.parent / "domains.pickle"
    try:
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink()
    except OSError:
        pass


def load_commit(repo: GitRepo, commit: str, cache: ParseCache | None = None) -> Snapshot:
    """The snapshot at `commit`, validated file by file."""
    cache = cache or ParseCache()
    raw_settings = repo.read(commit, files.SETTINGS_PATH)
    if raw_settings is None:
        raise StateInvalid(f"{files.SETTINGS_PATH} is missing at {commit[:12]}.")
    settings = files.parse_settings(raw_settings)
    raw_nodes = repo.read(commit, files.NODES_PATH)
    nodes = files.parse_nodes(raw_nodes) if raw_nodes is not None else NodesFile()
    domains: dict[str, DomainFile] = {}
    seen: set[str] = set()
    for path, oid in repo.walk_blobs(commit, files.DOMAINS_DIR):
        seen.add(oid)
        dom = cache.entries.get(oid)
        if dom is None or files.domain_path(dom.domain) != path:
            dom = _share_fields_set(files.parse_domain(repo.blob(oid), path))
            cache.entries[oid] = dom
            cache.dirty = True
        domains[dom.domain] = dom
    cache.save(keep=seen)
    # The cache is keyed by blob, not by format: the ids' rule is checked on every load.
    problems = files.format_problems(settings.format, domains.values())
    if problems:
        raise StateInvalid(problems[0], problems=problems)
    return Snapshot.build(commit, settings, domains, nodes)


@dataclass
class CheckoutState:
    """A state read from a working tree, with every problem found on the way."""

    settings: Settings | None
    domains: dict[str, DomainFile]
    nodes: NodesFile | None
    problems: list[str]


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
    return CheckoutState(settings, domains, nodes, problems)


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
        problems.extend(aliases.state_problems(loaded.domains, list(loaded.domains)))
        problems.extend(diff_rendered(compile_state(loaded.settings, loaded.domains.values()), read_rendered(root)))
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
        if path not in {files.SETTINGS_PATH, files.NODES_PATH, files.DOMAINS_DIR, files.RENDERED_DIR}
        and not path.startswith(".")
        and path not in {"README.md", "LICENSE"}
    ]
    problems.extend(aliases.state_problems(snap.domains, list(snap.domains)))
    problems.extend(diff_rendered(compile_state(snap.settings, snap.domains.values()), actual))
    return problems


def _top_level(repo: GitRepo, commit: str) -> list[str]:
    return [entry.name for entry in repo.tree(commit) if entry.name is not None]
