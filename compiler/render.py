"""State → Postfix and Dovecot files. Pure and deterministic: the same state, the same bytes.

For every email-enabled domain the compiler writes one folder:

    rendered/domains/<bb>/<domain>/passwd                    Dovecot passwd-file
    rendered/domains/<bb>/<domain>/virtual_mailbox_maps      Postfix map fragment
    rendered/domains/<bb>/<domain>/virtual_mailbox_domains   Postfix map fragment
    rendered/domains/<bb>/<domain>/mailboxes                 format 2: `<local> <id> <active|inactive>`
    rendered/domains/<bb>/<domain>/virtual_alias_maps        only with aliases, forwarding or alias_of:
                                                             `<key> <result>[,<result>...]` (compiler.maplines)
    rendered/domains/<bb>/<domain>/sender_login_maps         `<address> <login>[,<login>...]`: who may send
                                                             as the address (compiler.maplines), alias domains'
                                                             addresses included; absent when no address has
                                                             one, and in format 1
    rendered/domains/<bb>/<domain>/sieve_scripts             one Sieve script per mailbox with filters or a
                                                             vacation reply (compiler/sieve.py); absent without
    rendered/domains/<bb>/<domain>/app_passwords             the app passwords' passdb lines (compiler/sieve.py);
                                                             absent without
    rendered/domains/<bb>/<domain>/sending                   format 2, only with something to say: the domain's
                                                             (or its project's) send limits and its mailboxes'
                                                             sending states (state.sending)
    rendered/domains/<bb>/<domain>/spam_policy               only for a domain or mailboxes with a spam policy
                                                             of their own: `@domain|<local> <action|-> <junk|->
                                                             <reject|->` (state/spam.py)
    rendered/domains/<bb>/<domain>/sender_rules              only for a domain or mailboxes with allow/block
                                                             rules: `@domain|<local> <allow|block> <sender>`
    rendered/domains/<bb>/<domain>/home                      only for a domain with a home (a fleet with
                                                             addressed nodes): `home <node> <address>`, then
                                                             `moving_to <node>` / `moved_from <node>` during a move
    rendered/settings                                        format 2: node-wide `key value` lines
    rendered/spam                                            format 2, with mailstate.yaml's `spam:` block: the
                                                             default spam policy (state/spam.py)
    rendered/sending                                         format 2, with mailstate.yaml's `sending:` block:
                                                             every mailbox's default send limits (state.sending)
    rendered/nodes                                           only in a fleet with addressed nodes: one line
                                                             `<node> <address> <sha256 of its certificate|->`
    rendered/nodes.pem                                       their reported certificates, in the same order
    rendered/moves                                           only while domains move: one line
                                                             `<domain> <home> <moving_to|-> <moved_from|->`
    rendered/replicas                                        only with replicas: one line per domain that has
                                                             one, `<domain> <home> <replica>`

A node concatenates the Postfix fragments (sorted by domain) into its two maps and runs
postmap; the passwd-files are used as they are through Dovecot's `%d`. Per-domain fragments
keep a commit's git work proportional to the domains it touches, not to the whole state.

Disabled domains get no folder (Postfix then refuses them as not local) and inactive
mailboxes get no line in passwd or the map (no login, and a 550 "user unknown" on delivery).

State format 2 puts the mailbox id into the home, `<mail_root>/<domain>/<local>~<id>`, so
that an address re-created after a hard delete never finds the old owner's Maildir. The
`mailboxes` fragment lists every mailbox, active and inactive: it tells a node which
Maildirs are owned (a soft-deleted mailbox keeps its mail; a Maildir no listed mailbox owns
goes to the node's graveyard). `rendered/settings` carries what the node needs from
mailstate.yaml (`purge_after_days`). Format 1 renders exactly as it always did: homes
without ids, no `mailboxes` fragment and no `rendered/settings`.

A domain with a home (docs/fleet.md, "Running a fleet") renders each active mailbox's passwd
line with the Dovecot proxy fields `proxy_maybe=y host=<the home's address>` (a node that is not
the home proxies the login there, over TLS: the bundle's `default_fields` add the port and
`ssl=yes`), and each soft-deleted mailbox with `nologin=y` (no login, and no map line, so no
delivery: the line only lets `doveadm sync` find the mailbox when the domain moves). A domain
without a home renders exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import jinja2

from mailstate.compiler import sieve
from mailstate.compiler.maplines import alias_lines, sender_lines
from mailstate.state import spam
from mailstate.state import validate as v
from mailstate.state.errors import CompileError, InvalidInput
from mailstate.state.files import RENDERED_DIR, bucket
from mailstate.state.models import DomainFile, Mailbox, NodesFile, ProjectFile, Settings, SpamPolicy
from mailstate.state.senders import SENDER_FRAGMENT, alias_index
from mailstate.state.sending import SENDING_FILE, SENDING_FRAGMENT, domain_lines, settings_text

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "rendered"
# Every per-domain file the compiler may write (format 1 writes all but `mailboxes`;
# virtual_alias_maps only for a domain with aliases, forwarding or alias_of: state.aliases).
FRAGMENTS = (
    sieve.APP_FRAGMENT,
    "home",
    "mailboxes",
    "passwd",
    SENDER_FRAGMENT,
    sieve.SIEVE_FRAGMENT,
    SENDING_FRAGMENT,
    spam.SPAM_FRAGMENT,
    spam.SENDER_FRAGMENT,
    "virtual_alias_maps",
    "virtual_mailbox_domains",
    "virtual_mailbox_maps",
)
ALIAS_FRAGMENT = "virtual_alias_maps"
SETTINGS_FILE = f"{RENDERED_DIR}/settings"
NODES_FILE = f"{RENDERED_DIR}/nodes"
NODES_PEM = f"{RENDERED_DIR}/nodes.pem"
MOVES_FILE = f"{RENDERED_DIR}/moves"
REPLICAS_FILE = f"{RENDERED_DIR}/replicas"
HOME_FRAGMENT = "home"
# A `~` never occurs in a local part (state.validate), so `<local>~<id>` splits unambiguously.
ID_SEPARATOR = "~"

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


def _host(value: object) -> str:
    """A node's address in a compiled line: exactly a host name or an IP address (an IPv6
    address holds `:`, which only the passwd-file's extra fields, after the seventh, may carry)."""
    try:
        ok = isinstance(value, str) and v.normalize_node_address(value) == value
    except InvalidInput:
        ok = False
    if not ok:
        raise CompileError("A node address would break a compiled file; refusing to render it.")
    return str(value)


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
        auto_reload=False,  # the templates ship with the code: no stat of each one per render
    )
    env.filters["field"] = _field
    env.filters["path"] = _path
    env.filters["host"] = _host
    return env


@lru_cache(maxsize=1)
def _sieve_env() -> jinja2.Environment:
    """The Sieve script's environment: its own filters, and block tags that leave no blank lines."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["sieve"] = sieve.sieve_string
    env.filters["sieve_text"] = sieve.sieve_text
    return env


def mailbox_script(address: str, box: Mailbox) -> bytes | None:
    """The Sieve script of one mailbox (compiler/sieve.py), or None when it has none."""
    context = sieve.script_context(address, box)
    if context is None:
        return None
    try:
        return _sieve_env().get_template("sieve_script.j2").render(context).encode("utf-8")
    except CompileError:
        raise
    except jinja2.TemplateError as exc:
        raise CompileError(f"Template sieve_script.j2 failed: {exc}") from exc


def sieve_fragment(domain: DomainFile) -> bytes:
    """The domain's `sieve_scripts` fragment (b"" when no mailbox has a script)."""
    parts: list[bytes] = []
    for local, box in sorted(domain.mailboxes.items()):
        script = mailbox_script(f"{local}@{domain.domain}", box)
        if script is not None:
            parts.append(sieve.container_header(local, script) + script)
    return b"".join(parts)


def domain_dir(domain: str) -> str:
    """Repo path of a domain's rendered folder."""
    return f"{RENDERED_DIR}/domains/{bucket(domain)}/{domain}"


def mailbox_dir(domain: str, local: str, box: Mailbox, settings: Settings) -> str:
    """A mailbox's directory relative to the mail root: `<domain>/<local>~<id>` in format 2,
    `<domain>/<local>` in format 1. Refuses a value that could leave its domain's folder."""
    if not v.is_local_part(local) or "/" in domain or domain.startswith("."):
        raise CompileError("A mailbox name would make an unsafe path; refusing to render it.")
    if settings.format < 2:
        return f"{domain}/{local}"
    if box.id is None or not v.is_mailbox_id(box.id):
        raise CompileError(f"Mailbox {local}@{domain} has no valid id, which state format {settings.format} requires.")
    return f"{domain}/{local}{ID_SEPARATOR}{box.id}"


def _passwd_entries(
    domain: DomainFile, boxes: list[tuple[str, Mailbox]], settings: Settings, home: str | None
) -> list[dict[str, object]]:
    """The passwd-file's mailboxes: the active ones, and with a home (a proxy) the others too."""
    root = settings.mail_root.rstrip("/")
    out: list[dict[str, object]] = []
    for local, box in boxes:
        if not box.active and home is None:
            continue
        where = mailbox_dir(domain.domain, local, box, settings)
        out.append(
            {
                "email": f"{local}@{domain.domain}",
                "password": box.password,
                "quota_mb": box.quota_mb,
                "home": f"{root}/{where}",
                "maildir": f"{where}/",
                "active": box.active,
                "extra": "" if home is None else (f" proxy_maybe=y host={home}" if box.active else " nologin=y"),
            }
        )
    return out


def render_domain(
    domain: DomainFile,
    settings: Settings,
    alias_domains: Iterable[DomainFile] = (),
    project: ProjectFile | None = None,
    nodes: NodesFile | None = None,
) -> dict[str, bytes]:
    """The rendered files of one domain, keyed by repo path; empty when email is disabled.

    ``alias_domains``: the email-enabled domains whose ``alias_of`` is this one
    (``state.senders.alias_domains_of``): their addresses' sender lines are in this domain's
    sender_login_maps (maplines.sender_lines). ``project``: the domain's project file, whose send limits
    the domain's ``sending`` fragment carries unless the domain has its own (state.sending).
    ``nodes``: nodes.yaml, for the home's address (a domain with a home needs it)."""
    if not domain.email_enabled:
        return {}
    boxes = sorted(domain.mailboxes.items())
    home = _home_address(domain, nodes)
    mailboxes = _passwd_entries(domain, boxes, settings, home)
    aliases = [{"key": key, "results": results} for key, results in alias_lines(domain)]
    senders = [{"key": key, "owners": owners} for key, owners in sender_lines(domain, alias_domains)]
    app_lines = sieve.app_password_lines(domain)
    scripts = sieve_fragment(domain)
    sending = [line.split(" ") for line in domain_lines(domain, project)]
    spam_lines, sender_rules = _spam_fragments(domain, boxes)
    # These six are written only for a domain that has any (absent: none).
    present = {
        ALIAS_FRAGMENT: bool(aliases),
        SENDER_FRAGMENT: bool(senders),
        sieve.APP_FRAGMENT: bool(app_lines),
        sieve.SIEVE_FRAGMENT: bool(scripts),
        SENDING_FRAGMENT: bool(sending),
        HOME_FRAGMENT: bool(home),
        spam.SPAM_FRAGMENT: bool(spam_lines),
        spam.SENDER_FRAGMENT: bool(sender_rules),
    }
    fragments: tuple[str, ...] = tuple(name for name in FRAGMENTS if present.get(name, True))
    all_mailboxes: list[dict[str, object]] = []
    if settings.format < 2:
        # Format 1 renders exactly as it always did (the upgrade to 2 adds these).
        fragments = tuple(name for name in fragments if name not in ("mailboxes", SENDER_FRAGMENT, SENDING_FRAGMENT))
    else:
        for local, box in boxes:
            mailbox_dir(domain.domain, local, box, settings)  # the same checks, for inactive ones too
            all_mailboxes.append({"local": local, "id": box.id, "active": box.active})
    context = {
        "domain": domain.domain,
        "mailboxes": mailboxes,
        "all_mailboxes": all_mailboxes,
        "aliases": aliases,
        "senders": senders,
        "lines": app_lines,
        "sending": sending,
        "spam_lines": spam_lines,
        "sender_rules": sender_rules,
        "settings": settings,
        "placement": [
            (key, getattr(domain, key)) for key in ("moving_to", "moved_from") if getattr(domain, key) is not None
        ],
        "home": (domain.home, home),
    }
    base = domain_dir(domain.domain)
    out: dict[str, bytes] = {}
    try:
        for name in fragments:
            if name == sieve.SIEVE_FRAGMENT:
                out[f"{base}/{name}"] = scripts
                continue
            out[f"{base}/{name}"] = _env().get_template(f"{name}.j2").render(context).encode("utf-8")
    except CompileError:
        raise
    except jinja2.TemplateError as exc:
        raise CompileError(f"Template {name}.j2 failed: {exc}") from exc
    return out


SETTINGS_FILES = (SETTINGS_FILE, SENDING_FILE, spam.SPAM_FILE)


def _spam_fragments(domain: DomainFile, boxes: list[tuple[str, Mailbox]]) -> tuple[list[list[str]], list[list[str]]]:
    """The domain's `spam_policy` and `sender_rules` lines (state/spam.py), split into fields."""
    active = [(local, box) for local, box in boxes if box.active]
    policies = spam.domain_lines(
        _policy(domain.spam_policy), {local: _policy(box.spam_policy) for local, box in active}
    )
    rules = spam.sender_lines(domain.sender_rules, {local: box.sender_rules for local, box in active})
    return [line.split(" ") for line in policies], [line.split(" ") for line in rules]


def _policy(policy: SpamPolicy | None) -> dict[str, object] | None:
    return None if policy is None else policy.model_dump()


def _home_address(domain: DomainFile, nodes: NodesFile | None) -> str | None:
    """The address of the domain's home, or None for a domain without one."""
    if domain.home is None:
        return None
    node = nodes.nodes.get(domain.home) if nodes is not None else None
    if node is None or node.address is None:
        raise CompileError(f"{domain.domain}'s home {domain.home} is not a node with an address.")
    return _host(node.address)


def render_nodes(nodes: NodesFile) -> dict[str, bytes | None]:
    """`rendered/nodes` and `rendered/nodes.pem`: the nodes that can be homes, with their addresses
    and certificates, which the nodes relay, proxy and sync to (and only to). Absent (None) in a
    fleet without addressed nodes."""
    lines, pems = [], []
    for name, node in sorted(nodes.nodes.items()):
        if node.address is None:
            continue
        fingerprint = v.certificate_fingerprint(node.tls_certificate) if node.tls_certificate else "-"
        lines.append(f"{_field(name)} {_host(node.address)} {fingerprint}\n")
        if node.tls_certificate:
            pems.append(node.tls_certificate)
    if not lines:
        return {NODES_FILE: None, NODES_PEM: None}
    return {NODES_FILE: "".join(lines).encode("ascii"), NODES_PEM: "".join(pems).encode("ascii") if pems else None}


def render_settings(settings: Settings) -> dict[str, bytes | None]:
    """The node-wide files made from mailstate.yaml (format 2; the value None removes a file):
    `rendered/settings`, one `key value` line each, in this order, and `rendered/sending` (only
    with a `sending:` block, state.sending). Format 1 has neither."""
    if settings.format < 2:
        return {SETTINGS_FILE: None, SENDING_FILE: None, spam.SPAM_FILE: None}
    text = f"format {settings.format}\npurge_after_days {settings.purge_after_days}\n"
    return {
        SETTINGS_FILE: text.encode("ascii"),
        SENDING_FILE: settings_text(settings),
        spam.SPAM_FILE: spam.settings_text(_policy(settings.spam)),
    }


def render_moves(moves: Mapping[str, tuple[str, str | None, str | None]]) -> dict[str, bytes | None]:
    """`rendered/moves`: the domains a move is under way for (state.snapshot's `moves`), so that a
    node finds the work a move gives it in one small file (absent, None, when nothing moves)."""
    lines = [
        f"{_field(dom)} {_field(home)} {_field(to or '-')} {_field(frm or '-')}\n"
        for dom, (home, to, frm) in sorted(moves.items())
    ]
    return {MOVES_FILE: "".join(lines).encode("ascii") if lines else None}


def render_replicas(replicas: Mapping[str, tuple[str, str]]) -> dict[str, bytes | None]:
    """`rendered/replicas`: the domains that have a replica (state.snapshot's `replicas`), so that a
    home finds the peers it keeps in sync in one small file (absent, None, without replicas)."""
    lines = [f"{_field(dom)} {_field(home)} {_field(replica)}\n" for dom, (home, replica) in sorted(replicas.items())]
    return {REPLICAS_FILE: "".join(lines).encode("ascii") if lines else None}


def compile_state(
    settings: Settings,
    domains: Iterable[DomainFile],
    projects: Mapping[int, ProjectFile] | None = None,
    nodes: NodesFile | None = None,
) -> dict[str, bytes]:
    """The whole `rendered/` tree of a state, keyed by repo path."""
    out: dict[str, bytes] = {path: data for path, data in render_settings(settings).items() if data is not None}
    if nodes is not None:
        out.update({path: data for path, data in render_nodes(nodes).items() if data is not None})
    everything = {d.domain: d for d in domains}
    moves = {
        d.domain: (d.home, d.moving_to, d.moved_from)
        for d in everything.values()
        if d.home is not None and (d.moving_to or d.moved_from)
    }
    out.update({path: data for path, data in render_moves(moves).items() if data is not None})
    replicas = {d.domain: (d.home, d.replica) for d in everything.values() if d.home is not None and d.replica}
    out.update({path: data for path, data in render_replicas(replicas).items() if data is not None})
    users = alias_index(everything.values())  # in one pass, not one scan of every domain a domain
    projects = projects or {}
    for name in sorted(everything):
        dom = everything[name]
        project = projects.get(dom.project_id) if dom.project_id is not None else None
        out.update(render_domain(dom, settings, users.get(name, ()), project, nodes))
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
