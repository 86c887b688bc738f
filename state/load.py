"""Loading a state: from a commit (with a parse cache) or from a checkout on disk.

Parsing 100k mailboxes of YAML takes seconds, so a commit is loaded through a cache keyed
by git blob id: a blob's content never changes, so a cached parse is always right, and a
restart (or a pull of someone else's commit) only parses the files that changed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mailstate.compiler.render import compile_state, diff_rendered
from mailstate.state import files
from mailstate.state.errors import StateInvalid
from mailstate.state.gitrepo import GitRepo
from mailstate.state.models import DomainFile, NodesFile, Settings
from mailstate.state.snapshot import Snapshot

CACHE_VERSION = 1


@dataclass
class ParseCache:
    """blob id → parsed DomainFile, persisted as a pickle in the server's own data dir."""

    path: Path | None = None
    entries: dict[str, DomainFile] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def open(cls, path: Path | None) -> ParseCache:
        cache = cls(path=path)
        if path is not None and path.exists():
            try:
                with path.open("rb") as fh:
                    version, entries = pickle.load(fh)  # our own file, written below
                if version == CACHE_VERSION and isinstance(entries, dict):
                    cache.entries = entries
            except Exception:  # a stale or torn cache is only a slower start
                cache.entries = {}
        return cache

    def save(self, keep: set[str] | None = None) -> None:
        if self.path is None or not self.dirty:
            return
        if keep is not None:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cache-")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((CACHE_VERSION, self.entries), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path)
        self.dirty = False


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
            dom = files.parse_domain(repo.blob(oid), path)
            cache.entries[oid] = dom
            cache.dirty = True
        domains[dom.domain] = dom
    cache.save(keep=seen)
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
    problems.extend(diff_rendered(compile_state(snap.settings, snap.domains.values()), actual))
    return problems


def _top_level(repo: GitRepo, commit: str) -> list[str]:
    return [entry.name for entry in repo.tree(commit) if entry.name is not None]
