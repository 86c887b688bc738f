"""Spam policy (docs/inbound.md): what rspamd does with a message, per mailbox, domain and default.

A policy is an action and two scores:

- ``junk``: over ``junk_score`` the message gets ``X-Spam: Yes`` and the node's Sieve files it
  into ``Junk``; it is never refused for its score;
- ``reject``: over ``reject_score`` it is refused at SMTP time (5xx); over ``junk_score`` and
  below ``reject_score``, junked;
- ``off``: neither (the headers are still added).

A mailbox's policy overrides its domain's, and the domain's the default (mailstate.yaml's
``spam:`` block; without one, ``junk`` at 6 and 15, rspamd's own thresholds). Each field is
inherited on its own: a mailbox that sets only ``action`` keeps its domain's scores.

This module is the one place for the rules: the models, the operations and the compiler call
it; the node (pi-pull/pipull/spampolicy.py) mirrors the fragment's grammar, and
tests/vectors/spam_lines.json holds the two to the same verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from mailstate.state import validate as v
from mailstate.state.errors import InvalidInput

ACTIONS = ("junk", "reject", "off")
DEFAULT_ACTION = "junk"
DEFAULT_JUNK_SCORE = 6.0
DEFAULT_REJECT_SCORE = 15.0
MIN_SCORE = 0.1
MAX_SCORE = 100.0
# The per-domain fragment (rendered/domains/<bb>/<domain>/spam_policy) and the node-wide default.
SPAM_FRAGMENT = "spam_policy"
SPAM_FILE = "rendered/spam"
DOMAIN_KEY = "@domain"


def check_score(value: object, field: str) -> float:
    """A threshold: a number from 0.1 to 100, rounded to one decimal place (so every node renders
    it alike). Rounded rather than refused off the 0.1 grid: JSON Schema's `multipleOf: 0.1` is
    float division in most validators, which call 0.3 no multiple of 0.1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{field} must be a number.", code="invalid_spam_policy", field=field)
    if not MIN_SCORE <= float(value) <= MAX_SCORE:
        raise InvalidInput(
            f"{field} must be from {MIN_SCORE:g} to {MAX_SCORE:g} (rounded to one decimal place).",
            code="invalid_spam_policy",
            field=field,
        )
    return round(float(value), 1)


def check_scores(junk: float | None, reject: float | None) -> None:
    """Both given: junk_score must be below reject_score (a message over both is refused)."""
    if junk is not None and reject is not None and junk >= reject:
        raise InvalidInput(
            f"junk_score ({junk:g}) must be below reject_score ({reject:g}).",
            code="invalid_spam_policy",
            field="junk_score",
        )


def score_text(value: float | None) -> str:
    """A score as the fragment writes it: `6`, `6.5`, or `-` for inherited."""
    return "-" if value is None else f"{value:g}"


@dataclass(frozen=True)
class Policy:
    """A policy as it applies (every field resolved)."""

    action: str
    junk_score: float
    reject_score: float

    def as_dict(self) -> dict[str, object]:
        return {"action": self.action, "junk_score": self.junk_score, "reject_score": self.reject_score}


def effective(*levels: Mapping[str, object] | None) -> Policy:
    """The policy that applies: each field from the first level (most specific first) that sets it,
    then the built-in default."""
    out: dict[str, object] = {
        "action": DEFAULT_ACTION,
        "junk_score": DEFAULT_JUNK_SCORE,
        "reject_score": DEFAULT_REJECT_SCORE,
    }
    for key in out:
        for level in levels:
            if level is not None and level.get(key) is not None:
                out[key] = level[key]
                break
    return Policy(str(out["action"]), float(out["junk_score"]), float(out["reject_score"]))  # type: ignore[arg-type]


def policy_line(key: str, policy: Mapping[str, object]) -> str:
    """One line of the `spam_policy` fragment: `<key> <action|-> <junk_score|-> <reject_score|->`."""
    action = policy.get("action")
    junk, reject = policy.get("junk_score"), policy.get("reject_score")
    return " ".join(
        (
            key,
            str(action) if action is not None else "-",
            score_text(float(junk) if isinstance(junk, (int, float)) else None),
            score_text(float(reject) if isinstance(reject, (int, float)) else None),
        )
    )


def settings_text(default: Mapping[str, object] | None) -> bytes | None:
    """`rendered/spam`: mailstate.yaml's `spam:` block, every field resolved (None: no block, no file)."""
    if default is None:
        return None
    policy = effective(default)
    return (
        f"action {policy.action}\njunk_score {score_text(policy.junk_score)}\n"
        f"reject_score {score_text(policy.reject_score)}\n"
    ).encode("ascii")


def domain_lines(
    domain_policy: Mapping[str, object] | None, mailboxes: Mapping[str, Mapping[str, object] | None]
) -> list[str]:
    """The domain's `spam_policy` fragment, a line each: `@domain ...` first (the domain's own
    policy, if it has one), then `<local> ...` per mailbox with its own, sorted by local part.
    Empty: the domain writes no fragment."""
    lines = [policy_line(DOMAIN_KEY, domain_policy)] if domain_policy is not None else []
    lines += [policy_line(local, policy) for local, policy in sorted(mailboxes.items()) if policy is not None]
    return lines


# --- sender rules: allow and block lists per domain and per mailbox --------------------------------

SENDER_ACTIONS = ("allow", "block")
MAX_SENDER_RULES = 100  # per domain and per mailbox
SENDER_FRAGMENT = "sender_rules"


def normalize_sender(value: object, field: str = "sender") -> str:
    """A rule's sender: an address (`bob@example.org`) or a whole domain (`@example.org`), lowercased;
    the envelope sender (MAIL FROM) is what it matches."""
    why = ""
    try:
        if isinstance(value, str) and value.startswith("@"):
            return "@" + v.normalize_domain(value[1:], field=field)
        local, domain = v.normalize_email(value, field=field)
        return f"{local}@{domain}"
    except InvalidInput as exc:
        # Say why an internationalised name was refused (the rule's own sentence, never the value).
        why = f" {exc.message}" if "internationalised" in exc.message else ""
    raise InvalidInput(
        f"sender must be an address (bob@example.org) or a domain with its @ (@example.org).{why}",
        code="invalid_sender_rule",
        field=field,
    )


def sender_lines(
    domain_rules: Mapping[str, str] | None, mailbox_rules: Mapping[str, Mapping[str, str] | None]
) -> list[str]:
    """The domain's `sender_rules` fragment, a line per rule: `@domain <allow|block> <sender>` for the
    domain's, then `<local> <allow|block> <sender>` per mailbox, sorted (key, then sender)."""
    lines = [f"{DOMAIN_KEY} {action} {sender}" for sender, action in sorted((domain_rules or {}).items())]
    for local, rules in sorted(mailbox_rules.items()):
        lines += [f"{local} {action} {sender}" for sender, action in sorted((rules or {}).items())]
    return lines
