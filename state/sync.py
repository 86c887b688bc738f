"""Adopting commits the server did not make: verify, validate, reload the changed files only.

A commit from elsewhere (an admin's merged pull request, another API server) is adopted only
when:

1. its signature verifies against the server's trusted signers (`DIR/allowed_signers`:
   the server keys of the fleet and the admins' keys), with real `git verify-commit`;
2. it descends from the commit the server last validated (no rollback, no rewrite);
3. every state file it changed validates (schema and invariants), and the rendered files
   of every domain it touched equal `render_domain()` of that domain. When mailstate.yaml
   changed, everything is recompiled and compared.

The check walks only the paths that differ between the two trees (pygit2 skips identical
subtrees by id), so adopting a one-mailbox change costs the same at 100 or 100k mailboxes.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pygit2

from mailstate.compiler.render import (
    FRAGMENTS,
    MOVES_FILE,
    NODES_FILE,
    NODES_PEM,
    REPLICAS_FILE,
    SETTINGS_FILES,
    compile_state,
    diff_rendered,
    domain_dir,
    render_domain,
    render_moves,
    render_nodes,
    render_replicas,
    render_settings,
)
from mailstate.state import aliases, files, placement
from mailstate.state import limits as lim
from mailstate.state.errors import CompileError, StateInvalid
from mailstate.state.gitrepo import GitRepo, name_key
from mailstate.state.load import ParseCache, problem_lines
from mailstate.state.models import DomainFile, NodesFile
from mailstate.state.senders import alias_domains_of
from mailstate.state.snapshot import Change, Snapshot

_KNOWN_TOP = {files.SETTINGS_PATH, files.NODES_PATH, files.DOMAINS_DIR, files.RENDERED_DIR, files.PROJECTS_DIR}


@dataclass
class Incoming:
    """The verdict on a commit from elsewhere."""

    commit: str
    snapshot: Snapshot | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.snapshot is not None


def verify_signature(repo_path: Path, commit: str, allowed_signers: Path) -> str | None:
    """None when `commit` carries a good signature by a trusted key, else the reason."""
    proc = subprocess.run(
        # Absolute: git resolves a relative allowedSignersFile from inside the repo (-C).
        [
            "git",
            "-C",
            str(repo_path),
            "-c",
            f"gpg.ssh.allowedSignersFile={os.path.abspath(allowed_signers)}",
            "verify-commit",
            commit,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return None
    detail = (proc.stderr or proc.stdout).strip().splitlines()
    reason = detail[-1] if detail else "no signature"
    return f"commit {commit[:12]} is not signed by a trusted key ({reason})"


def changed_paths(repo: GitRepo, old: str, new: str) -> set[str]:
    """Every file path that differs between two commits."""
    diff = repo.tree(old).diff_to_tree(repo.tree(new))
    paths: set[str] = set()
    for delta in diff.deltas:
        for path in (delta.old_file.path, delta.new_file.path):
            if path:
                paths.add(path)
    return paths


def _rendered_owner(path: str) -> str | None:
    # rendered/domains/<bb>/<domain>/<fragment>, in the domain's own bucket: a copy under another
    # bucket would never be compared with render_domain() (it reads the domain's own folder).
    parts = path.split("/")
    if (
        len(parts) == 5
        and parts[0] == files.RENDERED_DIR
        and parts[1] == "domains"
        and parts[4] in FRAGMENTS
        and parts[2] == files.bucket(parts[3])
    ):
        return parts[3]
    return None


class Kind(Enum):
    """What a changed path is, for validate_incoming."""

    SETTINGS = "settings"  # mailstate.yaml
    NODES = "nodes"  # nodes.yaml
    DOMAIN = "domain"  # domains/<bb>/<domain>.yaml
    PROJECT = "project"  # projects/<pp>/<id>.yaml
    RENDERED = "rendered"  # a domain's fragment under rendered/domains/
    COMPILED = "compiled"  # a whole-state rendered file (settings, nodes, moves): compared in full
    UNEXPECTED = "unexpected"  # a file no state or compiler makes
    OTHER = "other"  # a dotfile, README.md, LICENSE: not state


@dataclass(frozen=True)
class PathClass:
    kind: Kind
    domain: str | None = None  # DOMAIN: the domain; RENDERED: the domain whose fragment it is
    project: int | None = None  # PROJECT: its id
    problem: str | None = None  # UNEXPECTED: why


@dataclass
class Parsed:
    """The change a commit makes, read from the paths it changed."""

    change: Change = field(default_factory=Change)
    touched: set[str] = field(default_factory=set)  # domains whose rendered files must be compared
    problems: list[str] = field(default_factory=list)


def classify(path: str) -> PathClass:
    """Step 1: what a changed path is, from its name alone."""
    top = path.split("/", 1)[0]
    if path == files.SETTINGS_PATH:
        return PathClass(Kind.SETTINGS)
    if path == files.NODES_PATH:
        return PathClass(Kind.NODES)
    if top == files.DOMAINS_DIR:
        name = files.domain_from_path(path)
        if name is None:
            return _unexpected(f"{path}: unexpected file (domain files live at domains/<bb>/<domain>.yaml)")
        return PathClass(Kind.DOMAIN, domain=name)
    if top == files.PROJECTS_DIR:
        project_id = files.project_from_path(path)
        if project_id is None:
            return _unexpected(f"{path}: unexpected file (project files live at projects/<pp>/<project_id>.yaml)")
        return PathClass(Kind.PROJECT, project=project_id)
    if top == files.RENDERED_DIR:
        if path in (*SETTINGS_FILES, NODES_FILE, NODES_PEM, MOVES_FILE, REPLICAS_FILE):
            return PathClass(Kind.COMPILED)  # compared with render_settings() / render_nodes() / render_moves()
        owner = _rendered_owner(path)
        return (
            _unexpected(f"{path}: not a file the compiler produces")
            if owner is None
            else PathClass(Kind.RENDERED, owner)
        )
    if top not in _KNOWN_TOP and not top.startswith(".") and top not in ("README.md", "LICENSE"):
        return _unexpected(f"{path}: unexpected file at the top of the repo")
    return PathClass(Kind.OTHER)


def _unexpected(problem: str) -> PathClass:
    return PathClass(Kind.UNEXPECTED, problem=problem)


def parse_changes(repo: GitRepo, base: Snapshot, commit: str, paths: set[str]) -> Parsed:
    """Step 2: parse every changed state file of `commit` into one Change (problems kept in path order)."""
    out = Parsed()
    try:
        if files.SETTINGS_PATH in paths:
            raw = repo.read(commit, files.SETTINGS_PATH)
            if raw is None:
                raise StateInvalid(f"{files.SETTINGS_PATH}: deleted")
            out.change.settings = files.parse_settings(raw)
        if files.NODES_PATH in paths:
            raw = repo.read(commit, files.NODES_PATH)
            out.change.nodes = files.parse_nodes(raw) if raw is not None else NodesFile()
    except StateInvalid as exc:
        out.problems.extend(exc.problems)
    # Mailbox ids must follow the (possibly new) format of mailstate.yaml.
    fmt = (out.change.settings or base.settings).format
    for path in sorted(paths):
        found = classify(path)
        try:
            if found.kind is Kind.UNEXPECTED:
                out.problems.append(str(found.problem))
            elif found.kind is Kind.DOMAIN and found.domain is not None:
                raw = repo.read(commit, path)
                dom = None if raw is None else files.parse_domain(raw, path, fmt)
                out.change.domains[found.domain if dom is None else dom.domain] = dom
                out.touched.add(found.domain)
            elif found.kind is Kind.PROJECT and found.project is not None:
                raw = repo.read(commit, path)
                out.change.projects[found.project] = None if raw is None else files.parse_project(raw, path)
            elif found.kind is Kind.RENDERED and found.domain is not None:
                out.touched.add(found.domain)
        except StateInvalid as exc:
            out.problems.extend(exc.problems)
    return out


def validate_incoming(repo: GitRepo, base: Snapshot, commit: str) -> Incoming:
    """Validate `commit` against the last validated snapshot `base` (its descendant): classify
    and parse what it changed, check the rules across domains, then check what it rendered."""
    result = Incoming(commit=commit)
    assert base.commit is not None
    if not repo.is_ancestor(base.commit, commit):
        result.problems.append(
            f"commit {commit[:12]} does not descend from the last validated commit {base.commit[:12]} (rollback or rewritten history)"
        )
        return result
    paths = changed_paths(repo, base.commit, commit)
    parsed = parse_changes(repo, base, commit, paths)
    if parsed.problems:
        result.problems = parsed.problems
        return result
    new = base.with_change(commit, parsed.change)
    result.problems = rule_problems(base, new, parsed.change)
    if parsed.change.settings is not None:
        if not result.problems:
            result.problems = full_render_problems(repo, commit, new)
    else:
        result.problems.extend(render_problems(repo, commit, base, new, parsed, paths))
    if not result.problems:
        result.snapshot = new
    return result


def rule_problems(base: Snapshot, new: Snapshot, change: Change) -> list[str]:
    """Step 3a: the rules a write follows too, on what the commit changed."""
    changed = set(change.domains)
    # Across domains: the same rule, on the same domains, as a write (change_problems).
    problems = problem_lines(change_problems(base, new, change))
    # The plan limits (state.limits), by the rule every write follows.
    before = lim.State(base.domains, base.by_project, base.projects)
    problems.extend(found.text() for found in lim.change_violations(before, change.domains, change.projects))
    problems.extend(placement.problems(new.domains, new.nodes, changed))
    if change.nodes is not None:
        problems.extend(placement.nodes_problems(new.nodes, new.homes, new.moves, new.replicas))
    if any(new.domains[n].home for n in changed if n in new.domains) and new.settings.format < 2:
        problems.append(f"{files.SETTINGS_PATH}: format: placing domains on nodes (home:) needs state format 2")
    if change.settings is not None:
        # A new format applies to every domain, the unchanged ones too (e.g. the format upgrade).
        problems.extend(files.format_problems(new.settings.format, new.domains.values()))
    return problems


def full_render_problems(repo: GitRepo, commit: str, new: Snapshot) -> list[str]:
    """Step 3b, when mailstate.yaml changed: everything is recompiled and compared."""
    actual = {p: repo.blob(oid) for p, oid in repo.walk_blobs(commit, files.RENDERED_DIR)}
    return diff_rendered(compile_state(new.settings, new.domains.values(), new.projects, new.nodes), actual)


def render_problems(
    repo: GitRepo, commit: str, base: Snapshot, new: Snapshot, parsed: Parsed, paths: set[str]
) -> list[str]:
    """Step 3b otherwise: the rendered files of every domain the change can alter, and the
    whole-state files it touched, equal what the compiler renders."""
    change = parsed.change
    touched = set(parsed.touched)
    # A project's send limits are rendered into each of its domains' sending fragment.
    for project_id in change.projects:
        touched.update(new.by_project.get(project_id, ()))
    # An alias domain's addresses are in its target's sender_login_maps (state.senders): a
    # changed alias domain (or one that stopped being one) means its targets are checked too.
    for name in change.domains:
        for side in (base.domains.get(name), new.domains.get(name)):
            if side is not None and side.alias_of is not None:
                touched.add(side.alias_of)
    if change.nodes is not None:
        # A node's address is in the passwd lines and home fragments of the domains it is home to.
        for name in _readdressed(base, new):
            touched.update(new.homes.get(name, ()))
    problems: list[str] = []
    for name in sorted(touched):
        problems.extend(_check_domain_render(repo, commit, new, name))
    if change.nodes is not None or NODES_FILE in paths or NODES_PEM in paths:
        expected = {k: data for k, data in render_nodes(new.nodes).items() if data is not None}
        found = {p: repo.read(commit, p) for p in (NODES_FILE, NODES_PEM)}
        problems.extend(diff_rendered(expected, {p: data for p, data in found.items() if data is not None}))
    if dict(new.moves) != dict(base.moves) or MOVES_FILE in paths:
        expected = {k: data for k, data in render_moves(new.moves).items() if data is not None}
        raw_moves = repo.read(commit, MOVES_FILE)
        problems.extend(diff_rendered(expected, {MOVES_FILE: raw_moves} if raw_moves is not None else {}))
    if dict(new.replicas) != dict(base.replicas) or REPLICAS_FILE in paths:
        expected = {k: data for k, data in render_replicas(new.replicas).items() if data is not None}
        raw = repo.read(commit, REPLICAS_FILE)
        problems.extend(diff_rendered(expected, {REPLICAS_FILE: raw} if raw is not None else {}))
    if paths & set(SETTINGS_FILES):
        expected = {k: data for k, data in render_settings(new.settings).items() if data is not None}
        actual_files = {name: repo.read(commit, name) for name in SETTINGS_FILES}
        problems.extend(diff_rendered(expected, {k: data for k, data in actual_files.items() if data is not None}))
    return problems


def change_problems(base: Snapshot, new: Snapshot, change: Change) -> list[aliases.Problem]:
    """What `change` (from `base` to `new`) breaks across domains: state.aliases.domain_problems
    of every domain whose verdict it can alter. The store runs this on every write before it
    commits, and validate_incoming on every commit from elsewhere: one rule, one set of
    domains. On a valid `base` it finds a problem exactly when a full check of `new` would
    (state.aliases.affected says why).

    Beside the chains (state.aliases.affected), the alias_of rule of each alias domain of a
    changed domain's project (old or new) that points at it: the target's state decides it."""
    changed = set(change.domains)
    names = aliases.affected(new.domains, new.referrers, changed)
    for name in changed:
        scopes = {aliases.project_of(side, name) for side in (base.domains, new.domains)}
        users = new.alias_users.get(name, frozenset()) | base.alias_users.get(name, frozenset())
        names.update(u for u in users if aliases.project_of(new.domains, u) in scopes)
    return aliases.problems(new.domains, names)


def _readdressed(old: Snapshot, new: Snapshot) -> set[str]:
    """The nodes whose address differs between two snapshots."""
    names = set(old.nodes.nodes) | set(new.nodes.nodes)
    return {
        n
        for n in names
        if getattr(old.nodes.nodes.get(n), "address", None) != getattr(new.nodes.nodes.get(n), "address", None)
    }


def _check_domain_render(repo: GitRepo, commit: str, snap: Snapshot, name: str) -> list[str]:
    dom: DomainFile | None = snap.domains.get(name)
    users = {u: snap.domains[u] for u in snap.alias_users.get(name, ()) if u in snap.domains}
    project = snap.projects.get(dom.project_id) if dom is not None and dom.project_id is not None else None
    try:
        expected = (
            render_domain(dom, snap.settings, alias_domains_of(users, name), project, snap.nodes)
            if dom is not None
            else {}
        )
    except CompileError as exc:
        return [f"{domain_dir(name)}: {exc.message}"]
    actual: dict[str, bytes] = {}
    base = domain_dir(name)
    try:
        entry = repo.tree(commit)[name_key(base)]
    except KeyError:
        entry = None
    if entry is not None:
        tree = repo.repo[entry.id]
        if isinstance(tree, pygit2.Tree):
            for item in tree:
                actual[f"{base}/{item.name}"] = repo.blob(str(item.id)) if item.type_str == "blob" else b""
    return diff_rendered(expected, actual)


def full_check(repo: GitRepo, commit: str, cache: ParseCache | None = None) -> Incoming:
    """Validate a whole commit from scratch (used when joining an existing upstream)."""
    from mailstate.state.load import check_commit, load_commit

    cache = cache or ParseCache()
    result = Incoming(commit=commit)
    result.problems.extend(check_commit(repo, commit, cache))
    if not result.problems:
        result.snapshot = load_commit(repo, commit, cache)  # parses nothing twice: the cache is warm
    return result
