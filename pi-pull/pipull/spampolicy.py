"""Spam policies on the node (mailstate's docs/inbound.md): what the state says, made into rspamd's settings.

The compiler writes (the server's state/spam.py; tests/vectors/spam_lines.json holds both to one
table of verdicts):

    rendered/spam                               node-wide default (only with mailstate.yaml's `spam:`)
        action <junk|reject|off>
        junk_score <score>
        reject_score <score>
    rendered/domains/<bb>/<domain>/spam_policy  only for a domain or mailboxes with a policy of their own
        @domain <action|-> <score|-> <score|->   the domain's own, first, optional
        <local> <action|-> <score|-> <score|->   mailboxes, sorted by local part

    rendered/domains/<bb>/<domain>/sender_rules only for a domain or mailboxes with allow/block rules
        @domain <allow|block> <sender>         the domain's, first, sorted by sender
        <local> <allow|block> <sender>         mailboxes', sorted by local part, then sender

A sender is an address (``bob@example.org``) or ``@<domain>``. A score is above 0 and at most 100, in steps of 0.1 (``6``, ``6.5``); ``-`` is inherited (mailbox
from domain, domain from the default, that from rspamd's own: junk, 6, 15).

``check`` validates every such file a tick would bring live, before the swap (a bad line is
Refused like any rendered line). ``Sync.step`` copies them, after the release is live, to
``<root>/spam/`` and, when they changed, writes rspamd's files there (``actions.inc``: the
default; ``settings.inc``: one settings rule per domain and mailbox, the mailbox's first) and
reloads rspamd ([spam] reload). rspamd reads them through the bundle's local.d/actions.conf and
local.d/settings.conf. pi-pull writes every byte of them itself: nothing from the repo reaches
rspamd's configuration but the validated words above.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass

from .config import Config
from .errors import Refused
from .fsutil import atomic_write
from .mirror import Mirror
from .rules import is_domain, is_local_part
from .runner import Runner, short
from .sending import Changes, _lines
from .sending import Sync as _FileSync

SETTINGS_PATH = "rendered/spam"
FRAGMENT = "spam_policy"
DOMAIN_KEY = "@domain"
ACTIONS = ("junk", "reject", "off")
DEFAULT = ("junk", 6.0, 15.0)
_SCORE = re.compile(r"^(?:0\.[1-9]|[1-9][0-9]?(?:\.[0-9])?|100)$")
ACTIONS_FILE = "actions.inc"
SETTINGS_FILE = "settings.inc"


@dataclass(frozen=True)
class Level:
    """One policy as written (None: inherited)."""

    action: str | None = None
    junk: float | None = None
    reject: float | None = None


def _score(what: str, text: str, inherit: bool) -> float | None:
    if inherit and text == "-":
        return None
    if not _SCORE.fullmatch(text):
        raise Refused(f"{what}: {text[:20]!r} is not a score above 0 and at most 100 (steps of 0.1)")
    return float(text)


def _level(what: str, words: list[str], inherit: bool) -> Level:
    action, junk, reject = words
    if action not in ACTIONS and not (inherit and action == "-"):
        raise Refused(f"{what}: {action[:20]!r} is not junk, reject or off")
    level = Level(None if action == "-" else action, _score(what, junk, inherit), _score(what, reject, inherit))
    if level.junk is not None and level.reject is not None and level.junk >= level.reject:
        raise Refused(f"{what}: the junk score must be below the reject score")
    if level == Level():
        raise Refused(f"{what}: every field is inherited (the compiler writes no line then)")
    return level


def parse_defaults(data: bytes) -> Level:
    """rendered/spam, exactly as the compiler writes it; Refused otherwise."""
    lines = _lines(SETTINGS_PATH, data)
    keys = ["action", "junk_score", "reject_score"]
    if len(lines) != 3 or [line.split(" ")[0] for line in lines] != keys or any(line.count(" ") != 1 for line in lines):
        raise Refused(f"{SETTINGS_PATH}: expected the lines action, junk_score and reject_score, in that order")
    return _level(SETTINGS_PATH, [line.split(" ")[1] for line in lines], inherit=False)


def parse_domain(domain: str, data: bytes) -> dict[str, Level]:
    """A domain's `spam_policy` fragment, exactly as the compiler writes it ({"@domain"|local: level}); Refused otherwise."""
    if not is_domain(domain):
        raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
    what = f"{FRAGMENT} of {domain}"
    lines = _lines(what, data)
    if not lines:
        raise Refused(f"{what}: empty (the compiler writes no fragment then)")
    out: dict[str, Level] = {}
    last = ""
    for n, line in enumerate(lines, 1):
        words = line.split(" ")
        if len(words) != 4:
            raise Refused(f"{what}, line {n}: expected '<@domain|local> <action|-> <junk_score|-> <reject_score|->'")
        key = words[0]
        if key == DOMAIN_KEY:
            if n != 1:
                raise Refused(f"{what}, line {n}: the domain's own line comes first")
        elif not is_local_part(key) or key <= last:
            raise Refused(f"{what}, line {n}: {key[:64]!r} is not a local part in order (listed once, sorted)")
        else:
            last = key
        out[key] = _level(f"{what}, line {n}", words[1:], inherit=True)
    return out


SENDER_FRAGMENT = "sender_rules"
MAX_SENDER_RULES = 100


def _is_sender(text: str) -> bool:
    if text.startswith("@"):
        return is_domain(text[1:])
    local, at, domain = text.rpartition("@")
    return bool(at) and is_local_part(local) and is_domain(domain)


def parse_senders(domain: str, data: bytes) -> list[tuple[str, str, str]]:
    """A domain's `sender_rules` fragment, exactly as the compiler writes it ([(key, action, sender)]); Refused otherwise."""
    if not is_domain(domain):
        raise Refused(f"unsafe domain name {domain[:80]!r} in rendered/")
    what = f"{SENDER_FRAGMENT} of {domain}"
    lines = _lines(what, data)
    if not lines:
        raise Refused(f"{what}: empty (the compiler writes no fragment then)")
    out: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}
    last: tuple[int, str, str] = (-1, "", "")
    for n, line in enumerate(lines, 1):
        words = line.split(" ")
        if len(words) != 3 or words[1] not in ("allow", "block") or not _is_sender(words[2]):
            raise Refused(f"{what}, line {n}: expected '<@domain|local> <allow|block> <address|@domain>'")
        key = words[0]
        if key != DOMAIN_KEY and not is_local_part(key):
            raise Refused(f"{what}, line {n}: {key[:64]!r} is not @domain or a local part")
        order = (0 if key == DOMAIN_KEY else 1, key, words[2])
        if order <= last:
            raise Refused(f"{what}, line {n}: out of order or listed twice (the compiler sorts them)")
        last = order
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > MAX_SENDER_RULES:
            raise Refused(f"{what}: more than {MAX_SENDER_RULES} rules for {key}")
        out.append((key, words[1], words[2]))
    return out


def resolve(*levels: Level | None) -> tuple[str, float, float]:
    """Each field from the first level that sets it, then rspamd's own (junk, 6, 15)."""
    action, junk, reject = DEFAULT
    for value, pick in (("action", 0), ("junk", 1), ("reject", 2)):
        for level in levels:
            got = getattr(level, value) if level is not None else None
            if got is not None:
                if pick == 0:
                    action = got
                elif pick == 1:
                    junk = got
                else:
                    reject = got
                break
    return action, junk, reject


def _actions(policy: tuple[str, float, float]) -> str:
    """rspamd's actions for a policy: junk never rejects; off neither rejects nor junks."""
    action, junk, reject = policy
    reject_value = f"{reject:g}" if action == "reject" else "null"
    junk_value = f"{junk:g}" if action != "off" else "null"
    return f'reject = {reject_value}; "add header" = {junk_value}; greylist = null; "rewrite subject" = null;'


def actions_text(default: Level | None) -> bytes:
    """``actions.inc`` (included by the bundle's local.d/actions.conf): the state's default."""
    policy = resolve(default)
    body = _actions(policy).replace('"add header"', "add_header").replace('"rewrite subject"', "rewrite_subject")
    return f"# mailstate / pi-pull: the state's default spam policy ({policy[0]}); do not edit\n{body}\n".encode()


def _sender_rule(n: int, domain: str, key: str, action: str, sender: str) -> str:
    """A sender rule as a settings rule: the recipient AND the envelope sender match. allow: rspamd
    scans but takes no action (want_spam); block: any score rejects."""
    rcpt, priority = (f"@{domain}", 9) if key == DOMAIN_KEY else (f"{key}@{domain}", 10)
    if action == "allow":
        body = "  want_spam = yes;\n"
    else:
        body = '  apply {\n    actions { reject = -1000; "add header" = null; greylist = null; "rewrite subject" = null; }\n  }\n'
    return f'mailstate_{n} {{\n  priority = {priority};\n  rcpt = "{rcpt}";\n  from = "{sender}";\n{body}}}\n'


def settings_text(
    default: Level | None,
    domains: dict[str, dict[str, Level]],
    senders: dict[str, list[tuple[str, str, str]]] | None = None,
) -> bytes:
    """``settings.inc`` (included by the bundle's local.d/settings.conf): a rule per sender rule
    (a mailbox's, priority 10, then a domain's, 9), then per mailbox (priority high) and per domain
    (medium) with a policy of its own, each with every field resolved. rspamd applies the first
    rule that matches (one of a message's recipients), the most specific first."""
    out = ["# mailstate / pi-pull: the state's spam policies per domain and mailbox; do not edit\n"]
    n = 0
    for domain in sorted(senders or {}):
        for key, action, sender in (senders or {})[domain]:
            n += 1
            out.append(_sender_rule(n, domain, key, action, sender))
    for domain in sorted(domains):
        levels = domains[domain]
        own = levels.get(DOMAIN_KEY)
        for key in sorted(levels):
            n += 1
            rcpt, priority = (f"@{domain}", "medium") if key == DOMAIN_KEY else (f"{key}@{domain}", "high")
            policy = resolve(levels[key], own, default) if key != DOMAIN_KEY else resolve(own, default)
            out.append(
                f'mailstate_{n} {{\n  priority = {priority};\n  rcpt = "{rcpt}";\n'
                f"  apply {{\n    actions {{ {_actions(policy)} }}\n  }}\n}}\n"
            )
    return "".join(out).encode()


class SenderSync(_FileSync):
    """The `sender_rules` fragments, checked and copied to ``<root>/spam/senders`` (no node-wide file)."""

    settings_path = "rendered/-"  # no such file: the sender rules have no node-wide default
    fragment = SENDER_FRAGMENT
    label = "sender rules"

    def __init__(self, cfg: Config, mirror: Mirror, log: logging.Logger) -> None:
        super().__init__(cfg, mirror, log)
        self.dir = os.path.join(cfg.root, "spam", "senders")

    def check(self, old: str | None, new: str) -> Changes:
        found = self.changes(old, new)
        for domain, oid in found.domains.items():
            if oid:
                parse_senders(domain, self._blob(oid))
        return found


class Sync(_FileSync):
    """Check (before the swap) and copy (after it) the spam policy files, then rspamd's; see the module docstring.

    The sender rules ride along (``senders``, a SenderSync)."""

    settings_path = SETTINGS_PATH
    fragment = FRAGMENT
    label = "spam policies"

    def __init__(self, cfg: Config, mirror: Mirror, log: logging.Logger, runner: Runner) -> None:
        super().__init__(cfg, mirror, log)
        self.dir = os.path.join(cfg.root, "spam")
        self.runner = runner
        self.senders = SenderSync(cfg, mirror, log)

    def check(self, old: str | None, new: str) -> Changes:
        self.senders.check(old, new)
        found = self.changes(old, new)
        if found.defaults:
            parse_defaults(self._blob(found.defaults))
        for domain, oid in found.domains.items():
            if oid:
                parse_domain(domain, self._blob(oid))
        return found

    def step(self, live: str | None) -> int:
        written = super().step(live) + self.senders.step(live)
        if written or not os.path.exists(os.path.join(self.dir, SETTINGS_FILE)):
            self.apply()
        return written

    def apply(self) -> bool:
        """Write rspamd's files from the copies; reload rspamd when one changed. True if reloaded."""
        try:
            default_path = os.path.join(self.dir, "defaults")
            default = parse_defaults(_read(default_path)) if os.path.exists(default_path) else None
            domains_dir = os.path.join(self.dir, "domains")
            domains = {
                name: parse_domain(name, _read(os.path.join(domains_dir, name)))
                for name in (sorted(os.listdir(domains_dir)) if os.path.isdir(domains_dir) else [])
                if is_domain(name)
            }
            senders_dir = os.path.join(self.senders.dir, "domains")
            senders = {
                name: parse_senders(name, _read(os.path.join(senders_dir, name)))
                for name in (sorted(os.listdir(senders_dir)) if os.path.isdir(senders_dir) else [])
                if is_domain(name)
            }
            changed = _put(os.path.join(self.dir, ACTIONS_FILE), actions_text(default))
            changed |= _put(os.path.join(self.dir, SETTINGS_FILE), settings_text(default, domains, senders))
        except (Refused, OSError) as e:
            self.log.error(f"spam policies not updated (rspamd keeps the last ones): {e}")
            return False
        if not changed or not self.cfg.spam_reload:
            return False
        r = self.runner.run(shlex.split(self.cfg.spam_reload), timeout=60)
        if r.returncode != 0:
            self.log.error(f"rspamd reload failed: {short(r.stderr + r.stdout) or f'rc={r.returncode}'}")
            return False
        self.log.info("spam policies changed: rspamd reloaded")
        return True


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _put(path: str, data: bytes) -> bool:
    try:
        if _read(path) == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, 0o644)
    return True
