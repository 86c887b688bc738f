"""Plan limits: what a project or a domain may use, what it uses, and the one rule between them.

A limit lives in the signed state: a project's in `projects/<pp>/<id>.yaml`, a domain's under
`limits:` in its domain file (set-limits writes both; an admin's pull request may too).

    max_mailboxes   active mailboxes of the scope's email-enabled domains (soft-deleted ones do not count)
    max_aliases     their aliases, the catch-all included
    max_quota_mb    the largest quota one of those mailboxes has
    storage_mb      the sum of those mailboxes' quotas
    send_per_hour   recipients EACH mailbox may send to in an hour (the nodes count and enforce it)
    send_per_day    the same over 24 hours

A domain's limits and its project's both apply to the domain's mailboxes: add-user must pass
both. For the send limits the most specific one wins (the domain's, else the project's, else
mailstate.yaml's `sending:` default), because they are per mailbox, not per scope.

The rule (`violations`), used by every path: the store on every write (409 `limit_reached`
when a change makes a scope use more than a limit allows; 409 `limit_below_use` when it sets a
limit below what the scope uses already; nothing is committed either way), `validate_incoming`
for commits made elsewhere, and `mailstate check` (a state in which any scope uses more than
its limit). A change that leaves a scope's use and limits as they were is never refused, so an
old state that is over a limit can still shrink.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mailstate.state.errors import LimitReached
from mailstate.state.models import LIMIT_NAMES, SEND_LIMITS, USE_LIMITS, DomainFile, Limits, ProjectFile, Settings


@dataclass(frozen=True)
class Use:
    """What a scope uses, in the units of the limits of the same names."""

    max_mailboxes: int = 0
    max_aliases: int = 0
    max_quota_mb: int = 0
    storage_mb: int = 0

    def __add__(self, other: Use) -> Use:
        return Use(
            self.max_mailboxes + other.max_mailboxes,
            self.max_aliases + other.max_aliases,
            max(self.max_quota_mb, other.max_quota_mb),
            self.storage_mb + other.storage_mb,
        )

    def get(self, name: str) -> int:
        value: int = getattr(self, name)
        return value


NOTHING = Use()


def domain_use(dom: DomainFile | None) -> Use:
    """What one domain uses: nothing unless its email is enabled (a disabled domain holds no
    mailbox a node serves), so enable-email can pass a limit too."""
    if dom is None or not dom.email_enabled:
        return NOTHING
    count = storage = largest = 0
    for box in dom.mailboxes.values():
        if box.active:
            count += 1
            storage += box.quota_mb
            largest = max(largest, box.quota_mb)
    return Use(count, len(dom.aliases), largest, storage)


def total_use(doms: Iterable[DomainFile | None]) -> Use:
    out = NOTHING
    for dom in doms:
        out = out + domain_use(dom)
    return out


def limits_of(limits: Limits | None) -> dict[str, int]:
    return limits.values() if limits else {}


def project_limits(projects: Mapping[int, ProjectFile], project_id: int | None) -> dict[str, int]:
    found = projects.get(project_id) if project_id is not None else None
    return limits_of(found.limits) if found is not None else {}


@dataclass(frozen=True)
class Violation:
    """A scope over one of its limits; `grew`: the change raised the use (else it lowered the limit)."""

    scope: str  # "project 42" or "domain mycompany.nl"
    limit: str
    value: int
    use: int
    grew: bool = True

    @property
    def code(self) -> str:
        return "limit_reached" if self.grew else "limit_below_use"

    def message(self) -> str:
        what = _WHAT[self.limit]
        if self.grew:
            return (
                f"{self.scope.capitalize()} has reached its {self.limit} limit: {self.value} {what} allowed, "
                f"and this change would make {self.use}."
            )
        return (
            f"{self.scope.capitalize()} already uses {self.use} {what}: its {self.limit} cannot go down to "
            f"{self.value} until it uses no more than that."
        )

    def text(self) -> str:
        """One line for `mailstate check` and refused commits."""
        return f"{self.scope}: {self.limit} {self.value}, but {self.use} in use"

    def error(self) -> LimitReached:
        return LimitReached(
            self.message(), code=self.code, limit=self.limit, value=self.value, use=self.use, scope=self.scope
        )


_WHAT = {
    "max_mailboxes": "active mailbox(es)",
    "max_aliases": "alias(es)",
    "max_quota_mb": "MB as the largest mailbox quota",
    "storage_mb": "MB of mailbox quota in all",
}


def violations(
    scope: str,
    after_use: Use,
    after_limits: Mapping[str, int],
    before_use: Use | None = None,
    before_limits: Mapping[str, int] | None = None,
) -> list[Violation]:
    """THE rule. A scope is over a limit when it uses more than the limit allows. Against a
    `before` (a write, an incoming commit) that counts only when the change raised the use or
    set the limit lower (or new); without one (`mailstate check`) it always counts."""
    out = []
    for name in USE_LIMITS:
        value = after_limits.get(name)
        use = after_use.get(name)
        if value is None or use <= value:
            continue
        if before_use is None:
            out.append(Violation(scope, name, value, use))
            continue
        old_value = (before_limits or {}).get(name)
        grew = use > before_use.get(name)
        if grew or old_value is None or value < old_value:
            out.append(Violation(scope, name, value, use, grew=grew))
    return out


class State:
    """The parts of a state the rule reads (a Snapshot, or a checkout's files)."""

    def __init__(
        self,
        domains: Mapping[str, DomainFile],
        by_project: Mapping[int, Iterable[str]],
        projects: Mapping[int, ProjectFile],
    ) -> None:
        self.domains = domains
        self.by_project = by_project
        self.projects = projects

    def project_domains(self, project_id: int) -> list[str]:
        return sorted(self.by_project.get(project_id, ()))

    def project_use(self, project_id: int) -> Use:
        return total_use(self.domains.get(name) for name in self.project_domains(project_id))


def state_problems(state: State) -> list[str]:
    """Every scope over a limit (`mailstate check`, a commit checked whole)."""
    problems = []
    for project_id in sorted(state.projects):
        limits = project_limits(state.projects, project_id)
        if any(name in limits for name in USE_LIMITS):
            for found in violations(f"project {project_id}", state.project_use(project_id), limits):
                problems.append(f"{found.text()} (projects/{project_id})")
    for name in sorted(state.domains):
        dom = state.domains[name]
        limits = limits_of(dom.limits)
        if limits:
            problems.extend(found.text() for found in violations(f"domain {name}", domain_use(dom), limits))
    return problems


def change_violations(
    before: State,
    domains: Mapping[str, DomainFile | None],
    projects: Mapping[int, ProjectFile | None],
) -> list[Violation]:
    """What a change (new domain files, None deleting; new project files) does to the limits of
    the scopes it touches. Costs the changed domains, plus every domain of a changed domain's
    project when that project has a limit on use."""
    out: list[Violation] = []
    for name, new in domains.items():
        old = before.domains.get(name)
        after_limits = limits_of(new.limits) if new is not None else {}
        if after_limits:
            before_limits = limits_of(old.limits) if old is not None else {}
            out.extend(violations(f"domain {name}", domain_use(new), after_limits, domain_use(old), before_limits))
    touched: set[int] = set(projects)
    for name, new in domains.items():
        old = before.domains.get(name)
        touched.update(d.project_id for d in (old, new) if d is not None and d.project_id is not None)
    for project_id in sorted(touched):
        if project_id in projects:
            changed = projects[project_id]
            after_limits = limits_of(changed.limits) if changed is not None else {}
        else:
            after_limits = project_limits(before.projects, project_id)
        if not any(name in after_limits for name in USE_LIMITS):
            continue
        members = set(before.project_domains(project_id))
        after_names = (members - set(domains)) | {
            n for n, d in domains.items() if d is not None and d.project_id == project_id
        }
        after = total_use(domains[n] if n in domains else before.domains.get(n) for n in sorted(after_names))
        out.extend(
            violations(
                f"project {project_id}",
                after,
                after_limits,
                before.project_use(project_id),
                project_limits(before.projects, project_id),
            )
        )
    return out


def enforce(
    before: State, domains: Mapping[str, DomainFile | None], projects: Mapping[int, ProjectFile | None]
) -> None:
    """Raise the first violation of a write (state.store, before anything is committed)."""
    found = change_violations(before, domains, projects)
    if found:
        raise found[0].error()


# --- outbound (send_*) limits -------------------------------------------------------------------


@dataclass(frozen=True)
class SendLimits:
    """A mailbox's outbound limits (recipients; None: no limit) and where each comes from."""

    per_hour: int | None
    per_day: int | None
    hour_source: str | None = None  # "domain", "project", "default" or None
    day_source: str | None = None


def domain_send_override(dom: DomainFile, project: ProjectFile | None) -> tuple[int | None, int | None]:
    """The send limits a domain's mailboxes get from the domain or its project (None: the
    node-wide default of mailstate.yaml applies). What the compiler renders for the nodes."""
    own = limits_of(dom.limits)
    theirs = limits_of(project.limits) if project is not None else {}
    hour = own.get("send_per_hour", theirs.get("send_per_hour"))
    day = own.get("send_per_day", theirs.get("send_per_day"))
    return hour, day


def effective_send_limits(settings: Settings, dom: DomainFile, project: ProjectFile | None) -> SendLimits:
    """What each mailbox of `dom` may send: the domain's limit, else its project's, else the default."""
    own = limits_of(dom.limits)
    theirs = limits_of(project.limits) if project is not None else {}
    default = settings.sending
    found: list[tuple[int | None, str | None]] = []
    for name in SEND_LIMITS:
        if name in own:
            found.append((own[name], "domain"))
        elif name in theirs:
            found.append((theirs[name], "project"))
        elif default is not None and getattr(default, name) is not None:
            found.append((getattr(default, name), "default"))
        else:
            found.append((None, None))
    return SendLimits(found[0][0], found[1][0], found[0][1], found[1][1])


def scope_limits(limits: Limits | None) -> dict[str, int | None]:
    """Every limit name with its value (None: not set), for answers."""
    values = limits_of(limits)
    return {name: values.get(name) for name in LIMIT_NAMES}
