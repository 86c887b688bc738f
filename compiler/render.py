"""State → Postfix and Dovecot files. Pure and deterministic: the same state, the same bytes.

For every email-enabled domain the compiler writes one folder:

    rendered/domains/<bb>/<domain>/passwd                    Dovecot passwd-file
    rendered/domains/<bb>/<domain>/virtual_mailbox_maps      Postfix map fragment
    rendered/domains/<bb>/<domain>/virtual_mailbox_domains   Postfix map fragment

A node concatenates the Postfix fragments (sorted by domain) into its two maps and runs
postmap; the passwd-files are used as they are through Dovecot's `%d`. Per-domain fragments
keep a commit's git work proportional to the domains it touches, not to the whole state.

Disabled domains get no folder (Postfix then refuses them as not local) and inactive
mailboxes get no line (no login, and a 550 "user unknown" on delivery).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import jinja2

from mailstate.state.errors import CompileError
from mailstate.state.files import RENDERED_DIR, bucket
from mailstate.state.models import DomainFile, Settings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "rendered"
FRAGMENTS = ("passwd", "virtual_mailbox_domains", "virtual_mailbox_maps")

_FORBIDDEN = set(":\n\r\t \x00")


def _field(value: object) -> str:
    """Jinja filter for one field of a passwd line or map entry.

    Dovecot splits passwd-file lines on `:` and Postfix map lines on whitespace; a stray
    `:` would shift uid/home into the wrong columns and a newline would add a line of the
    attacker's choosing. Validation keeps such values out; this is the last guard.
    """
    text = str(value)
    if not text or _FORBIDDEN.intersection(text):
        raise CompileError("A value would break a compiled file; refusing to render it.")
    return text


def _path(value: object) -> str:
    """Jinja filter for a path field (a home or a Maildir): `_field`, and no `..` segment.

    Only paths get this check: a bcrypt hash's alphabet includes `.` and `/`, so a valid
    hash may well contain `/../`.
    """
    text = _field(value)
    if "/../" in f"/{text}/":
        raise CompileError("A path would climb out of the mail root; refusing to render it.")
    return text


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
    )
    env.filters["field"] = _field
    env.filters["path"] = _path
    return env


def domain_dir(domain: str) -> str:
    """Repo path of a domain's rendered folder."""
    return f"{RENDERED_DIR}/domains/{bucket(domain)}/{domain}"


def render_domain(domain: DomainFile, settings: Settings) -> dict[str, bytes]:
    """The rendered files of one domain, keyed by repo path; empty when email is disabled."""
    if not domain.email_enabled:
        return {}
    mailboxes = [
        {
            "email": f"{local}@{domain.domain}",
            "password": box.password,
            "quota_mb": box.quota_mb,
            "home": f"{settings.mail_root.rstrip('/')}/{domain.domain}/{local}",
            "maildir": f"{domain.domain}/{local}/",
        }
        for local, box in sorted(domain.mailboxes.items())
        if box.active
    ]
    context = {"domain": domain.domain, "mailboxes": mailboxes, "settings": settings}
    base = domain_dir(domain.domain)
    out: dict[str, bytes] = {}
    try:
        for name in FRAGMENTS:
            out[f"{base}/{name}"] = _env().get_template(f"{name}.j2").render(context).encode("utf-8")
    except CompileError:
        raise
    except jinja2.TemplateError as exc:
        raise CompileError(f"Template {name}.j2 failed: {exc}") from exc
    return out


def compile_state(settings: Settings, domains: Iterable[DomainFile]) -> dict[str, bytes]:
    """The whole `rendered/` tree of a state, keyed by repo path."""
    out: dict[str, bytes] = {}
    for domain in sorted(domains, key=lambda d: d.domain):
        out.update(render_domain(domain, settings))
    return out


def diff_rendered(expected: Mapping[str, bytes], actual: Mapping[str, bytes]) -> list[str]:
    """Human lines naming every rendered file that is missing, extra or different."""
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"{path}: missing (run `mailstate compile`)")
        elif path not in expected:
            problems.append(f"{path}: not produced by compile() (stale or hand-made)")
        elif expected[path] != actual[path]:
            problems.append(f"{path}: differs from compile() (stale or edited by hand)")
    return problems
