"""`mailstate plan`: what a change does to the state and to the compiled files.

`plan(old, new)` compares two states (anything with `settings`, `domains` and `nodes`, such as a
`Snapshot` or a valid `CheckoutState`) and returns a `Plan`: the domains, mailboxes, nodes and
settings that were added, removed or changed, plus the effect on `rendered/`. Password changes
are named, never shown: no hash (and no sync-key digest) ever reaches a plan.

Cost follows the size of the change, not of the state:

* only domains whose `DomainFile` differs are rendered (all of them only when the settings
  changed, because settings reach every compiled line);
* `plan_revisions` asks git which files differ between two commits and parses only those;
* `plan_worktree` parses the working tree (it must validate it anyway) and, on the revision's
  side, parses only the blobs whose content differs from the working tree's file.

Sides are named by revision (`HEAD`, `HEAD~1`, `origin/main`, a branch, a sha) of a repository,
bare or not, or by a working tree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pygit2

from mailstate.compiler.render import render_domain, render_nodes, render_settings
from mailstate.state import files, worktree
from mailstate.state.errors import InvalidInput, NotFound, StateInvalid
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import ParseCache, load_checkout, load_checkout_projects, load_commit, load_projects
from mailstate.state.models import LIMIT_NAMES, DomainFile, Limits, Mailbox, Node, NodesFile, ProjectFile, Settings
from mailstate.state.senders import alias_index

WORKTREE = "working tree"
# Lines a rendered section shows before it says "... and N more" (as_dict keeps everything).
DEFAULT_LIMIT = 200


class StateLike(Protocol):
    """What `plan` reads from each side: a Snapshot, a CheckoutState, or a `Side`."""

    @property
    def settings(self) -> Settings | None: ...

    @property
    def domains(self) -> Mapping[str, DomainFile]: ...

    @property
    def nodes(self) -> NodesFile | None: ...


@dataclass(frozen=True)
class Side:
    """One loaded side of a plan: its state and a label such as `HEAD (1a2b3c4d5e6f)`."""

    label: str
    settings: Settings
    domains: Mapping[str, DomainFile]
    nodes: NodesFile
    commit: str | None = None
    projects: Mapping[int, ProjectFile] = field(default_factory=dict)


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Entry:
    """One line of a plan: `op` is `+`, `-` or `~`; `name` the domain, address, node, key or path."""

    name: str
    op: str
    what: str = ""
    detail: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "change": self.what, **self.detail}

    def line(self) -> str:
        text = f"{self.op} {self.name}"
        if not self.what:
            return text
        # `~ info@example.com: password changed`, `+ bob@example.com (quota 1024 MB)`
        return f"{text}: {self.what}" if self.op == "~" else f"{text} ({self.what})"


SECTIONS = (
    ("domains", "Domains"),
    ("mailboxes", "Mailboxes"),
    ("aliases", "Aliases, catch-alls, forwarding and alias domains"),
    ("nodes", "Nodes"),
    ("settings", "Settings (mailstate.yaml)"),
    ("rendered", "Compiled files (rendered/)"),
)
_OP_ORDER = {"+": 0, "-": 1, "~": 2}


@dataclass
class Plan:
    """The structured difference between two states. Never holds a hash or a key digest."""

    base: str = "base"
    head: str = "head"
    domains: list[Entry] = field(default_factory=list)
    mailboxes: list[Entry] = field(default_factory=list)
    aliases: list[Entry] = field(default_factory=list)
    nodes: list[Entry] = field(default_factory=list)
    settings: list[Entry] = field(default_factory=list)
    rendered: list[Entry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.section(key) for key, _ in SECTIONS)

    @property
    def empty(self) -> bool:
        return not self

    def section(self, key: str) -> list[Entry]:
        entries: list[Entry] = getattr(self, key)
        return entries

    def sort(self) -> None:
        for key, _ in SECTIONS:
            self.section(key).sort(key=lambda e: (e.name, _OP_ORDER[e.op], e.what))

    # Convenience views (used by tests and scripts): which names took which change.
    def names(self, section: str, change: str) -> list[str]:
        return [e.name for e in self.section(section) if e.detail.get("kind") == change]

    def summary(self) -> dict[str, int]:
        """Counts by change kind, e.g. {"mailbox_added": 2, "rendered_changed": 3}."""
        counts: Counter[str] = Counter()
        for key, _ in SECTIONS:
            for e in self.section(key):
                counts[str(e.detail.get("kind"))] += 1
        return dict(sorted(counts.items()))

    def summary_line(self) -> str:
        if not self:
            return "no changes"
        parts = []
        for key, title in SECTIONS:
            entries = self.section(key)
            if not entries:
                continue
            ops = Counter(e.op for e in entries)
            noun = title.split(" (")[0].lower()
            bits = [f"{ops[op]} {word}" for op, word in (("+", "added"), ("-", "removed"), ("~", "changed")) if ops[op]]
            parts.append(f"{noun}: {', '.join(bits)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "head": self.head,
            "changed": bool(self),
            "summary": self.summary(),
            **{key: [e.as_dict() for e in self.section(key)] for key, _ in SECTIONS},
        }

    def render_text(self, limit: int | None = DEFAULT_LIMIT) -> str:
        """Readable, grouped plan; `+` added, `-` removed, `~` changed."""
        lines = [f"mailstate plan: {self.base} -> {self.head}"]
        if not self:
            lines.append("no changes")
            return "\n".join(lines) + "\n"
        for key, title in SECTIONS:
            entries = self.section(key)
            if not entries:
                continue
            lines.append("")
            lines.append(f"{title}:")
            lines.extend(f"  {e.line()}" for e in _cap(entries, limit))
            if limit is not None and len(entries) > limit:
                lines.append(f"  ... and {len(entries) - limit} more")
        lines.append("")
        lines.append(f"Summary: {self.summary_line()}")
        return "\n".join(lines) + "\n"

    def render_markdown(self, limit: int | None = DEFAULT_LIMIT) -> str:
        """The plan for a GitHub job summary: one heading, a summary, a diff block per section."""
        lines = [f"### mailstate plan: `{self.base}` → `{self.head}`", ""]
        if not self:
            lines.append("**No changes** to the state or to the compiled files.")
            return "\n".join(lines) + "\n"
        lines.append(f"**Summary:** {self.summary_line()}")
        for key, title in SECTIONS:
            entries = self.section(key)
            if not entries:
                continue
            lines.extend(["", f"#### {title}", "", "```diff"])
            lines.extend(e.line() for e in _cap(entries, limit))
            if limit is not None and len(entries) > limit:
                lines.append(f"# ... and {len(entries) - limit} more")
            lines.append("```")
        lines.append("")
        lines.append("_`+` added · `-` removed · `~` changed. Passwords are named, never shown._")
        return "\n".join(lines) + "\n"


def _cap(entries: list[Entry], limit: int | None) -> list[Entry]:
    return entries if limit is None else entries[:limit]


# --- computing a plan -------------------------------------------------------------------


def plan(old: StateLike, new: StateLike, *, base: str = "base", head: str = "head") -> Plan:
    """The difference between two states, including the effect on the compiled files."""
    old_settings, new_settings = _require(old, base), _require(new, head)
    result = Plan(base=base, head=head)
    old_domains, new_domains = old.domains, new.domains

    changed: list[str] = []
    for name in sorted(set(old_domains) | set(new_domains)):
        a, b = old_domains.get(name), new_domains.get(name)
        if a is b or a == b:
            continue
        changed.append(name)
        _domain_changes(result, name, a, b)

    _node_changes(result, old.nodes or NodesFile(), new.nodes or NodesFile())
    _project_changes(result, getattr(old, "projects", None) or {}, getattr(new, "projects", None) or {})

    settings_changed = old_settings != new_settings
    if settings_changed:
        for key in Settings.model_fields:
            was, now = getattr(old_settings, key), getattr(new_settings, key)
            if key == "purge_after_days" and old_settings.format < 2:
                was = None  # format 1 does not have the setting (it is not in its mailstate.yaml)
            if was == now:
                continue
            if key == "format":
                what = f"{was} -> {now} (state format upgrade: every mailbox gets an id, homes move to <local>~<id>)"
                result.settings.append(
                    Entry(
                        key,
                        "~",
                        what,
                        {"kind": "format_upgraded" if now > was else "format_changed", "old": was, "new": now},
                    )
                )
            else:
                result.settings.append(
                    Entry(key, "~", f"{was} -> {now}", {"kind": "setting_changed", "old": was, "new": now})
                )
        _rendered_changes(result, _present(render_settings(old_settings)), _present(render_settings(new_settings)))

    # Settings reach every compiled line (uid, gid, mail root), so a settings change means
    # rendering everything; otherwise only the domains that differ.
    # An alias domain's sender lines are in its target's fragment (state.senders).
    targets = {
        d.alias_of for n in changed for d in (old_domains.get(n), new_domains.get(n)) if d is not None and d.alias_of
    }
    old_nodes, new_nodes = _nodes(old), _nodes(new)
    _rendered_changes(result, _present(render_nodes(old_nodes)), _present(render_nodes(new_nodes)))
    # A node's address is in the passwd lines of the domains it is home to.
    readdressed = {
        n
        for n in set(old_nodes.nodes) | set(new_nodes.nodes)
        if getattr(old_nodes.nodes.get(n), "address", None) != getattr(new_nodes.nodes.get(n), "address", None)
    }
    homed = {name for name, dom in new_domains.items() if dom.home in readdressed} if readdressed else set()
    render_names = (
        sorted(set(old_domains) | set(new_domains)) if settings_changed else sorted(set(changed) | targets | homed)
    )
    old_users, new_users = alias_index(old_domains.values()), alias_index(new_domains.values())
    old_projects: Mapping[int, ProjectFile] = getattr(old, "projects", None) or {}
    new_projects: Mapping[int, ProjectFile] = getattr(new, "projects", None) or {}
    for name in render_names:
        a, b = old_domains.get(name), new_domains.get(name)
        pa = old_projects.get(a.project_id) if a is not None and a.project_id is not None else None
        pb = new_projects.get(b.project_id) if b is not None and b.project_id is not None else None
        before = render_domain(a, old_settings, old_users.get(name, ()), pa, _nodes(old)) if a is not None else {}
        after = render_domain(b, new_settings, new_users.get(name, ()), pb, _nodes(new)) if b is not None else {}
        _rendered_changes(result, before, after)

    result.sort()
    return result


def _nodes(side: StateLike) -> NodesFile:
    return side.nodes or NodesFile()


def _present(rendered: Mapping[str, bytes | None]) -> dict[str, bytes]:
    return {path: data for path, data in rendered.items() if data is not None}


def _require(side: StateLike, label: str) -> Settings:
    problems = list(getattr(side, "problems", None) or [])
    if problems or side.settings is None:
        problems = problems or [f"{files.SETTINGS_PATH}: missing"]
        raise StateInvalid(
            f"{label} is not a valid state ({len(problems)} problem(s)); fix it first (see `mailstate check`).",
            problems=problems,
        )
    return side.settings


def _alias_changes(result: Plan, name: str, a: DomainFile | None, b: DomainFile | None) -> None:
    """Aliases (the catch-all as @domain), alias_of and mailbox forwarding, each named."""
    old_aliases, new_aliases = (a.aliases if a else {}), (b.aliases if b else {})
    for key in sorted(set(old_aliases) | set(new_aliases)):
        address = f"@{name}" if key == "@" else f"{key}@{name}"
        label = "catch-all" if key == "@" else "alias"
        before, after = old_aliases.get(key), new_aliases.get(key)
        if before == after:
            continue
        if before is None:
            result.aliases.append(
                Entry(
                    address, "+", f"{label} -> {', '.join(after or [])}", {"kind": "alias_added", "destinations": after}
                )
            )
        elif after is None:
            result.aliases.append(Entry(address, "-", label, {"kind": "alias_removed"}))
        else:
            what = f"{label} -> {', '.join(after)} (was {', '.join(before)})"
            result.aliases.append(Entry(address, "~", what, {"kind": "alias_changed", "old": before, "new": after}))
    old_of, new_of = (a.alias_of if a else None), (b.alias_of if b else None)
    if old_of != new_of:
        what = f"alias domain of {new_of}" if new_of else f"no longer an alias domain of {old_of}"
        result.aliases.append(
            Entry(
                f"@{name}",
                "+" if new_of and not old_of else "-" if old_of and not new_of else "~",
                what,
                {"kind": "alias_domain_changed", "old": old_of, "new": new_of},
            )
        )
    for local in sorted(set(a.mailboxes if a else {}) | set(b.mailboxes if b else {})):
        x = a.mailboxes.get(local) if a else None
        y = b.mailboxes.get(local) if b else None
        fx = (x.forward_to, x.keep_copy) if x and x.forward_to else None
        fy = (y.forward_to, y.keep_copy) if y and y.forward_to else None
        if fx == fy:
            continue
        if fy is None:
            what = "forwarding off"
        else:
            what = f"forwards to {', '.join(fy[0] or [])}" + (" (keeps a copy)" if fy[1] else " (no copy kept)")
        result.aliases.append(
            Entry(f"{local}@{name}", "~", what, {"kind": "forwarding_changed", "forward_to": fy[0] if fy else None})
        )


def _domain_changes(result: Plan, name: str, a: DomainFile | None, b: DomainFile | None) -> None:
    _alias_changes(result, name, a, b)
    if a is None and b is not None:
        bits = [_project(b.project_id), "email enabled" if b.email_enabled else "email disabled", _count(b)]
        result.domains.append(Entry(name, "+", ", ".join(bits), {"kind": "domain_added", "project_id": b.project_id}))
        for local, box in b.mailboxes.items():
            _mailbox_added(result, f"{local}@{name}", box)
        return
    if b is None and a is not None:
        bits = [_project(a.project_id), "email was enabled" if a.email_enabled else "email was disabled", _count(a)]
        result.domains.append(Entry(name, "-", ", ".join(bits), {"kind": "domain_removed", "project_id": a.project_id}))
        for local in a.mailboxes:
            result.mailboxes.append(Entry(f"{local}@{name}", "-", "", {"kind": "mailbox_removed"}))
        return
    assert a is not None and b is not None
    if a.email_enabled != b.email_enabled:
        kind = "email_enabled" if b.email_enabled else "email_disabled"
        result.domains.append(Entry(name, "~", kind.replace("_", " "), {"kind": kind}))
    if a.project_id != b.project_id:
        result.domains.append(
            Entry(
                name,
                "~",
                f"project link {_project(a.project_id)} -> {_project(b.project_id)}",
                {"kind": "project_changed", "old": a.project_id, "new": b.project_id},
            )
        )
    text = _limits_text(a.limits, b.limits)
    if text:
        result.domains.append(Entry(name, "~", f"limits: {text}", {"kind": "domain_limits_changed"}))
    for key in ("home", "moving_to", "moved_from", "replica"):
        was, now = getattr(a, key), getattr(b, key)
        if was != now:
            result.domains.append(
                Entry(
                    name,
                    "~",
                    f"{key} {was or 'none'} -> {now or 'none'}",
                    {"kind": f"{key}_changed", "old": was, "new": now},
                )
            )
    for local in sorted(set(a.mailboxes) | set(b.mailboxes)):
        _mailbox_changes(result, f"{local}@{name}", a.mailboxes.get(local), b.mailboxes.get(local))


def _limits_text(a: Limits | None, b: Limits | None) -> str:
    was, now = (a.values() if a else {}), (b.values() if b else {})
    return ", ".join(
        f"{name} {was.get(name, 'none')} -> {now.get(name, 'none')}"
        for name in LIMIT_NAMES
        if was.get(name) != now.get(name)
    )


def _project_changes(result: Plan, old: Mapping[int, ProjectFile], new: Mapping[int, ProjectFile]) -> None:
    """A project's plan limits (projects/<pp>/<id>.yaml) that changed, in the domains section."""
    for pid in sorted(set(old) | set(new)):
        a, b = old.get(pid), new.get(pid)
        text = _limits_text(a.limits if a else None, b.limits if b else None)
        if text:
            result.domains.append(Entry(f"project {pid}", "~", f"limits: {text}", {"kind": "project_limits_changed"}))


def _project(project_id: int | None) -> str:
    return "unlinked" if project_id is None else f"project {project_id}"


def _count(dom: DomainFile) -> str:
    total, active = len(dom.mailboxes), dom.active_count()
    return f"{total} mailbox{'es' if total != 1 else ''}" + (f" ({active} active)" if active != total else "")


def _mailbox_added(result: Plan, email: str, box: Mailbox) -> None:
    what = f"quota {box.quota_mb} MB" + ("" if box.active else ", inactive") + (f", id {box.id}" if box.id else "")
    result.mailboxes.append(
        Entry(email, "+", what, {"kind": "mailbox_added", "quota_mb": box.quota_mb, "active": box.active, "id": box.id})
    )


def _mailbox_changes(result: Plan, email: str, a: Mailbox | None, b: Mailbox | None) -> None:
    if a == b:
        return
    if a is None:
        assert b is not None
        _mailbox_added(result, email, b)
        return
    if b is None:
        result.mailboxes.append(Entry(email, "-", "", {"kind": "mailbox_removed"}))
        return
    if a.id != b.id:
        # An id is immutable: it appears once (the format upgrade) and otherwise only changes
        # when the mailbox was removed and made again, which a plan shows as a new mailbox.
        if a.id is None:
            result.mailboxes.append(
                Entry(
                    email,
                    "~",
                    f"id {b.id} assigned (home moves to ~{b.id})",
                    {"kind": "mailbox_id_assigned", "new": b.id},
                )
            )
        else:
            what = f"id {a.id} -> {b.id} (a new mailbox: the old Maildir goes to the graveyard)"
            result.mailboxes.append(Entry(email, "~", what, {"kind": "mailbox_id_changed", "old": a.id, "new": b.id}))
    if a.active != b.active:
        kind = "mailbox_reactivated" if b.active else "mailbox_deactivated"
        result.mailboxes.append(
            Entry(email, "~", "reactivated" if b.active else "deactivated (soft-deleted)", {"kind": kind})
        )
    if a.quota_mb != b.quota_mb:
        result.mailboxes.append(
            Entry(
                email,
                "~",
                f"quota {a.quota_mb} -> {b.quota_mb} MB",
                {"kind": "quota_changed", "old": a.quota_mb, "new": b.quota_mb},
            )
        )
    if a.password != b.password:
        result.mailboxes.append(Entry(email, "~", "password changed", {"kind": "password_changed"}))
    was = a.sending is not None and a.sending.suspended
    now = b.sending is not None and b.sending.suspended
    if was != now and b.sending is not None:
        what = f"sending suspended: {b.sending.reason}" if now else "sending resumed"
        result.mailboxes.append(Entry(email, "~", what, {"kind": "sending_suspended" if now else "sending_resumed"}))
    _owner_changes(result, email, a, b)


def _owner_changes(result: Plan, email: str, a: Mailbox, b: Mailbox) -> None:
    """Vacation, filters and app passwords (state/owners.py): what changed, never a hash."""
    if a.vacation != b.vacation:
        state = "removed" if b.vacation is None else "on" if b.vacation.enabled else "off"
        what = f"vacation reply {state}"
        result.mailboxes.append(Entry(email, "~", what, {"kind": "vacation_changed", "state": state}))
    if a.filters != b.filters:
        n = len(b.filters or [])
        what = f"filters: {n} rule{'s' if n != 1 else ''}"
        result.mailboxes.append(Entry(email, "~", what, {"kind": "filters_changed", "rules": n}))
    old, new = a.app_passwords or {}, b.app_passwords or {}
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        change = "added" if name not in old else "removed" if name not in new else "changed"
        result.mailboxes.append(
            Entry(email, "~", f"app password {name!r} {change}", {"kind": f"app_password_{change}", "name": name})
        )


def _node_changes(result: Plan, old: NodesFile, new: NodesFile) -> None:
    for name in sorted(set(old.nodes) | set(new.nodes)):
        a, b = old.nodes.get(name), new.nodes.get(name)
        if a == b:
            continue
        if a is None:
            assert b is not None
            result.nodes.append(
                Entry(name, "+", f"ip {b.ip_address or 'any'}", {"kind": "node_added", "ip_address": b.ip_address})
            )
        elif b is None:
            result.nodes.append(Entry(name, "-", "", {"kind": "node_removed"}))
        else:
            _node_fields(result, name, a, b)


def _node_fields(result: Plan, name: str, a: Node, b: Node) -> None:
    if a.sync_key_sha256 != b.sync_key_sha256:
        result.nodes.append(Entry(name, "~", "sync key rotated", {"kind": "node_key_rotated"}))
    if a.ip_address != b.ip_address:
        result.nodes.append(
            Entry(
                name,
                "~",
                f"ip {a.ip_address or 'any'} -> {b.ip_address or 'any'}",
                {"kind": "node_ip_changed", "old": a.ip_address, "new": b.ip_address},
            )
        )
    if a.created_at != b.created_at:
        result.nodes.append(Entry(name, "~", "created_at changed", {"kind": "node_created_at_changed"}))
    if a.address != b.address:
        result.nodes.append(
            Entry(
                name,
                "~",
                f"address {a.address or 'none'} -> {b.address or 'none'}",
                {"kind": "node_address_changed", "old": a.address, "new": b.address},
            )
        )
    if a.tls_certificate != b.tls_certificate:
        result.nodes.append(Entry(name, "~", "TLS certificate changed", {"kind": "node_certificate_changed"}))


def _rendered_changes(result: Plan, before: Mapping[str, bytes], after: Mapping[str, bytes]) -> None:
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        if a is None:
            assert b is not None
            n = _lines(b)
            result.rendered.append(
                Entry(path, "+", f"{n} line{'s' if n != 1 else ''}", {"kind": "rendered_added", "lines": n})
            )
        elif b is None:
            result.rendered.append(Entry(path, "-", "", {"kind": "rendered_removed"}))
        else:
            # Line counts only: a passwd line carries a hash, so content is never shown.
            old_lines, new_lines = Counter(a.splitlines()), Counter(b.splitlines())
            plus, minus = sum((new_lines - old_lines).values()), sum((old_lines - new_lines).values())
            result.rendered.append(
                Entry(
                    path,
                    "~",
                    f"+{plus} -{minus} lines",
                    {"kind": "rendered_changed", "lines_added": plus, "lines_removed": minus},
                )
            )


def _lines(data: bytes) -> int:
    return len(data.splitlines())


# --- loading sides ----------------------------------------------------------------------


def open_repo(path: Path) -> GitRepo:
    """The repository at or above `path` (bare or not)."""
    found = pygit2.discover_repository(str(path))
    if found is None:
        raise NotFound(f"{path} is not inside a git repository.", code="repository_not_found")
    return GitRepo(found)


def resolve(repo: GitRepo, rev: str) -> str:
    """A revision (`HEAD`, `HEAD~1`, `origin/main`, a branch, a tag, a sha) → commit sha."""
    try:
        obj = repo.repo.revparse_single(rev)
        commit = obj.peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError) as exc:
        raise NotFound(
            f"Unknown revision {rev!r} in {repo.repo.workdir or repo.path}.", code="revision_not_found"
        ) from exc
    return str(commit.id)


def _label(rev: str, sha: str) -> str:
    return rev if rev == sha else f"{rev} ({sha[:12]})"


def _load_commit_side(repo: GitRepo, rev: str, sha: str, cache: ParseCache) -> Side:
    try:
        snap = load_commit(repo, sha, cache)
    except StateInvalid as exc:
        raise _side_invalid(f"revision {_label(rev, sha)}", exc.problems) from None
    return Side(_label(rev, sha), snap.settings, snap.domains, snap.nodes, sha, snap.projects)


def _side_invalid(label: str, problems: list[str]) -> StateInvalid:
    return StateInvalid(
        f"The {label} is not a valid state ({len(problems)} problem(s)); fix it first (see `mailstate check`).",
        problems=problems,
    )


def load_revision(path: Path, rev: str) -> Side:
    """One revision of the repository at `path`, fully loaded."""
    repo = open_repo(path)
    return _load_commit_side(repo, rev, resolve(repo, rev), ParseCache())


def load_worktree(root: Path) -> Side:
    """The state in a working tree; its problems are reported as one StateInvalid."""
    loaded = load_checkout(root)
    if loaded.problems or loaded.settings is None:
        raise _side_invalid(f"{WORKTREE} at {root}", loaded.problems or [f"{files.SETTINGS_PATH}: missing"])
    return Side(WORKTREE, loaded.settings, loaded.domains, loaded.nodes or NodesFile(), None, loaded.projects)


def plan_revisions(path: Path, base: str, head: str) -> Plan:
    """The plan from revision `base` to revision `head` of the repository at `path`.

    Only the domain files git reports as different are parsed (plus mailstate.yaml and
    nodes.yaml); when the settings differ both sides are loaded in full.
    """
    repo = open_repo(path)
    base_sha, head_sha = resolve(repo, base), resolve(repo, head)
    base_label, head_label = _label(base, base_sha), _label(head, head_sha)
    cache = ParseCache()
    settings = [_read_settings(repo, base_sha, base_label), _read_settings(repo, head_sha, head_label)]
    # A project's send limits are in each of its domains' fragment: a changed project file (like
    # changed settings) means loading both sides whole.
    projects_changed = any(p.startswith(files.PROJECTS_DIR + "/") for p in _changed_paths(repo, base_sha, head_sha))
    if settings[0] != settings[1] or projects_changed:
        old, new = _load_commit_side(repo, base, base_sha, cache), _load_commit_side(repo, head, head_sha, cache)
        return plan(old, new, base=old.label, head=new.label)
    changed = _changed_domain_paths(repo, base_sha, head_sha)
    old = _partial_side(repo, base_sha, base_label, settings[0], changed)
    new = _partial_side(repo, head_sha, head_label, settings[1], changed)
    return plan(old, new, base=base_label, head=head_label)


def _read_settings(repo: GitRepo, sha: str, label: str) -> Settings:
    raw = repo.read(sha, files.SETTINGS_PATH)
    try:
        if raw is None:
            raise StateInvalid(f"{files.SETTINGS_PATH}: missing")
        return files.parse_settings(raw)
    except StateInvalid as exc:
        raise _side_invalid(f"revision {label}", exc.problems) from None


def _changed_paths(repo: GitRepo, a: str, b: str) -> set[str]:
    diff = repo.tree(a).diff_to_tree(repo.tree(b))
    return {path for delta in diff.deltas for path in (delta.old_file.path, delta.new_file.path) if path}


def _changed_domain_paths(repo: GitRepo, a: str, b: str) -> list[str]:
    return sorted(p for p in _changed_paths(repo, a, b) if p.startswith(files.DOMAINS_DIR + "/"))


def _partial_side(repo: GitRepo, sha: str, label: str, settings: Settings, paths: Iterable[str]) -> Side:
    problems: list[str] = []
    domains: dict[str, DomainFile] = {}
    nodes = NodesFile()
    raw_nodes = repo.read(sha, files.NODES_PATH)
    try:
        if raw_nodes is not None:
            nodes = files.parse_nodes(raw_nodes)
    except StateInvalid as exc:
        problems.extend(exc.problems)
    for path in paths:
        raw = repo.read(sha, path)
        if raw is None:
            continue
        try:
            dom = files.parse_domain(raw, path, settings.format)
        except StateInvalid as exc:
            problems.extend(exc.problems)
            continue
        domains[dom.domain] = dom
    if problems:
        raise _side_invalid(f"revision {label}", problems)
    try:
        projects = load_projects(repo, sha)
    except StateInvalid as exc:
        raise _side_invalid(f"revision {label}", exc.problems) from None
    return Side(label, settings, domains, nodes, sha, projects)


def plan_worktree(root: Path, base: str = "HEAD") -> Plan:
    """The plan from revision `base` of the repository holding `root` to the working tree at `root`.

    The state must sit at the top of the repository. When the settings are unchanged, only
    the domain files whose content differs from the revision's blobs (state.worktree) are
    parsed, on both sides, so the parse follows the change; otherwise the whole working tree
    is read, and on the revision's side only blobs that differ from its files are parsed.
    """
    repo = open_repo(root)
    if repo.repo.is_bare or repo.repo.workdir is None:
        raise InvalidInput(
            f"{root} is a bare repository and has no working tree; give --head REV to compare two revisions.",
            code="no_working_tree",
        )
    workdir = Path(repo.repo.workdir).resolve()
    if workdir != root.resolve():
        raise InvalidInput(
            f"The state must sit at the top of its repository: run plan on {workdir}, not {root}.",
            code="not_repository_root",
        )
    base_sha = resolve(repo, base)
    base_label = _label(base, base_sha)
    settings = _read_settings(repo, base_sha, base_label)
    sides = _changed_worktree_sides(repo, root, base_sha, base_label, settings)
    if sides is not None:
        return plan(sides[0], sides[1], base=base_label, head=sides[1].label)
    new = load_worktree(root)
    if settings != new.settings:
        old = _load_commit_side(repo, base, base_sha, ParseCache())
        return plan(old, new, base=old.label, head=new.label)
    # Domains whose file is byte-identical in the working tree reuse the working tree's parse.
    by_path = {files.domain_path(name): dom for name, dom in new.domains.items()}
    domains: dict[str, DomainFile] = {}
    changed: list[str] = []
    for path, oid in repo.walk_blobs(base_sha, files.DOMAINS_DIR):
        dom = by_path.get(path)
        if dom is not None and _same_blob(root / path, oid):
            domains[dom.domain] = dom
        else:
            changed.append(path)
    old_partial = _partial_side(repo, base_sha, base_label, settings, changed)
    domains.update(old_partial.domains)
    old = Side(base_label, settings, domains, old_partial.nodes, base_sha, old_partial.projects)
    return plan(old, new, base=base_label, head=new.label)


def _changed_worktree_sides(
    repo: GitRepo, root: Path, base_sha: str, base_label: str, settings: Settings
) -> tuple[Side, Side] | None:
    """(revision side, working-tree side), each holding only the domains whose files differ
    (state.worktree; plus their alias targets, which carry their sender lines); None when the
    settings differ or cannot be read: then everything is read."""
    try:
        if files.parse_settings((root / files.SETTINGS_PATH).read_bytes()) != settings:
            return None
    except (OSError, StateInvalid):
        return None  # the full read reports it
    paths = worktree.changed_domain_paths(repo, root, base_sha)
    problems: list[str] = []
    nodes = NodesFile()
    if (root / files.NODES_PATH).exists():
        try:
            nodes = files.parse_nodes((root / files.NODES_PATH).read_bytes())
        except StateInvalid as exc:
            problems.extend(exc.problems)
    domains: dict[str, DomainFile] = {}
    for rel in paths:
        path = root / rel
        if not path.is_file():
            continue  # deleted
        if files.domain_from_path(rel) is None:
            problems.append(f"{rel}: unexpected file (domain files live at domains/<bb>/<domain>.yaml)")
            continue
        try:
            dom = files.parse_domain(path.read_bytes(), rel, settings.format)
        except StateInvalid as exc:
            problems.extend(exc.problems)
            continue
        domains[dom.domain] = dom
    if problems:
        raise _side_invalid(f"{WORKTREE} at {root}", problems)
    old = _partial_side(repo, base_sha, base_label, settings, paths)
    if load_checkout_projects(root) != dict(old.projects):
        return None  # a project's limits reach its every domain: everything is read
    targets = (
        {d.alias_of for side in (old.domains, domains) for d in side.values() if d.alias_of}
        - set(old.domains)
        - set(domains)
    )
    if targets:
        # Unchanged files (git says so): the revision's parse serves both sides.
        extra = _partial_side(repo, base_sha, base_label, settings, sorted(files.domain_path(t) for t in targets if t))
        old = Side(old.label, settings, {**old.domains, **extra.domains}, old.nodes, base_sha, old.projects)
        domains.update(extra.domains)
    return old, Side(WORKTREE, settings, domains, nodes, None, old.projects)


def _same_blob(path: Path, oid: str) -> bool:
    try:
        return str(pygit2.hash(path.read_bytes())) == oid
    except OSError:
        return False
