"""Spam policy at the store (state/spam.py): set-spam-policy and list-spam-policy, inheritance,
what lands in git (the domain's `spam_policy` fragment), and hostile values refused with no commit.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailstate.state.errors import Conflict, InvalidInput, NotFound
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PROJECT_A, PROJECT_B, commit_count, read_file

BOX = "info@example.com"
FRAGMENT = "rendered/domains/ex/example.com/spam_policy"


def run(store: Store, op: str, body: dict[str, Any], actor: Any = PROJECT_A) -> dict[str, Any]:
    return dict(store.execute(op, actor, body).result)


def test_a_mailbox_overrides_its_domain_which_overrides_the_default(mail_store: Store) -> None:
    assert read_file(mail_store.git.path, FRAGMENT) is None  # no policy: no fragment
    listed = run(mail_store, "list-spam-policy", {})
    assert listed == {"default": {"action": "junk", "junk_score": 6.0, "reject_score": 15.0}, "policies": []}

    out = run(mail_store, "set-spam-policy", {"domain": "example.com", "action": "reject", "reject_score": 12})
    assert out["commit"] and out["policy"] == {"action": "reject", "junk_score": None, "reject_score": 12.0}
    assert out["effective"] == {"action": "reject", "junk_score": 6.0, "reject_score": 12.0}
    out = run(mail_store, "set-spam-policy", {"email": BOX, "action": "junk", "junk_score": 3.5})
    assert out["effective"] == {"action": "junk", "junk_score": 3.5, "reject_score": 12.0}
    assert read_file(mail_store.git.path, FRAGMENT) == "@domain reject - 12\ninfo junk 3.5 -\n"

    again = mail_store.execute("set-spam-policy", PROJECT_A, {"email": BOX, "action": "junk", "junk_score": 3.5})
    assert again.result["commit"] is None  # the same policy: no commit
    rounded = mail_store.execute("set-spam-policy", PROJECT_A, {"email": BOX, "action": "junk", "junk_score": 3.54})
    assert rounded.result["commit"] is None and rounded.result["policy"]["junk_score"] == 3.5  # kept to 0.1

    listed = run(mail_store, "list-spam-policy", {"domain": "example.com"})
    assert [(p["email"], p["effective"]["action"]) for p in listed["policies"]] == [(None, "reject"), (BOX, "junk")]

    # action null removes the override: the mailbox inherits again, and the fragment loses its line
    out = run(mail_store, "set-spam-policy", {"email": BOX, "action": None})
    assert out["policy"] is None and out["effective"] == {"action": "reject", "junk_score": 6.0, "reject_score": 12.0}
    run(mail_store, "set-spam-policy", {"domain": "example.com", "action": None})
    assert read_file(mail_store.git.path, FRAGMENT) is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"email": BOX, "action": "quarantine"}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": 0}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": -3}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": 101}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": 0.09}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": 100.01}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": "6"}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": True}, "invalid_spam_policy"),
        ({"email": BOX, "action": "junk", "junk_score": float("nan")}, "invalid_spam_policy"),
        ({"email": BOX, "action": "reject", "junk_score": 9, "reject_score": 9}, "invalid_spam_policy"),
        ({"email": BOX, "action": None, "junk_score": 4}, "invalid_spam_policy"),
        ({"email": BOX}, "missing_field"),
        ({"action": "junk"}, "invalid_scope"),
        ({"email": BOX, "domain": "example.com", "action": "junk"}, "invalid_scope"),
        ({"email": BOX, "action": "junk", "note": "x"}, "unknown_field"),
        ({"email": "info@example.com\n", "action": "junk"}, "invalid_email"),
    ],
)
def test_hostile_policy_values_are_refused_with_no_commit(mail_store: Store, body: dict[str, Any], code: str) -> None:
    before = commit_count(mail_store.git.path)
    with pytest.raises(InvalidInput) as err:
        mail_store.execute("set-spam-policy", PROJECT_A, body)
    assert err.value.code == code, err.value.message
    assert commit_count(mail_store.git.path) == before


def test_other_projects_and_missing_mailboxes(mail_store: Store) -> None:
    with pytest.raises(NotFound):
        mail_store.execute("set-spam-policy", PROJECT_B, {"domain": "example.com", "action": "off"})
    with pytest.raises(NotFound):
        mail_store.execute("set-spam-policy", PROJECT_A, {"email": "nobody@example.com", "action": "off"})
    assert run(mail_store, "list-spam-policy", {}, PROJECT_B)["policies"] == []
    with pytest.raises(NotFound):
        mail_store.execute("list-spam-policy", PROJECT_B, {"domain": "example.com"})
    run(mail_store, "set-spam-policy", {"email": BOX, "action": "off"})
    assert run(mail_store, "list-spam-policy", {}, ADMIN)["policies"][0]["email"] == BOX
    mail_store.execute("remove-user", PROJECT_A, {"email": BOX})
    with pytest.raises(Conflict) as err:
        mail_store.execute("set-spam-policy", PROJECT_A, {"email": BOX, "action": "junk"})
    assert err.value.code == "mailbox_inactive"
    # a soft-deleted mailbox gets no mail: its policy is kept in the state but not compiled
    assert read_file(mail_store.git.path, FRAGMENT) is None


def test_the_default_comes_from_mailstate_yaml(store: Store) -> None:
    from mailstate.compiler.render import render_settings
    from mailstate.state.models import Settings

    settings = Settings(format=2, spam={"action": "reject", "reject_score": 10})
    assert render_settings(settings)["rendered/spam"] == b"action reject\njunk_score 6\nreject_score 10\n"
    assert render_settings(Settings(format=2))["rendered/spam"] is None
    with pytest.raises(ValueError, match="junk_score"):
        Settings(format=2, spam={"action": "junk", "junk_score": 20, "reject_score": 10})


RULES = "rendered/domains/ex/example.com/sender_rules"


def test_sender_rules_add_list_remove(mail_store: Store) -> None:
    out = mail_store.execute(
        "add-sender-rule", PROJECT_A, {"email": BOX, "sender": "Boss@Partner.TEST", "action": "allow"}
    )
    assert out.created and out.result["sender"] == "boss@partner.test" and out.result["commit"]
    again = mail_store.execute(
        "add-sender-rule", PROJECT_A, {"email": BOX, "sender": "boss@partner.test", "action": "allow"}
    )
    assert again.result["commit"] is None and not again.created
    run(mail_store, "add-sender-rule", {"domain": "example.com", "sender": "@spam.test", "action": "block"})
    assert read_file(mail_store.git.path, RULES) == "@domain block @spam.test\ninfo allow boss@partner.test\n"
    listed = run(mail_store, "list-sender-rules", {})
    assert listed["rules"] == [
        {"domain": "example.com", "email": None, "sender": "@spam.test", "action": "block"},
        {"domain": "example.com", "email": BOX, "sender": "boss@partner.test", "action": "allow"},
    ]
    assert run(mail_store, "list-sender-rules", {"email": BOX})["rules"][0]["sender"] == "boss@partner.test"
    assert run(mail_store, "list-sender-rules", {}, PROJECT_B)["rules"] == []
    # switching the action of a listed sender is one write
    run(mail_store, "add-sender-rule", {"email": BOX, "sender": "boss@partner.test", "action": "block"})
    assert run(mail_store, "list-sender-rules", {"email": BOX})["rules"][0]["action"] == "block"
    gone = run(mail_store, "remove-sender-rule", {"email": BOX, "sender": "boss@partner.test"})
    assert gone["action"] == "block" and gone["commit"]
    with pytest.raises(NotFound) as err:
        mail_store.execute("remove-sender-rule", PROJECT_A, {"email": BOX, "sender": "boss@partner.test"})
    assert err.value.code == "sender_rule_not_found"
    run(mail_store, "remove-sender-rule", {"domain": "example.com", "sender": "@spam.test"})
    assert read_file(mail_store.git.path, RULES) is None


@pytest.mark.parametrize(
    "sender",
    ["", "@", "bob", "bob@", "@@x.test", "*@x.test", "/.*/", "bob@x.test\n", 'a"b@x.test', "bob @x.test", 42, None],
)
def test_hostile_senders_are_refused_with_no_commit(mail_store: Store, sender: Any) -> None:
    before = commit_count(mail_store.git.path)
    with pytest.raises(InvalidInput) as err:
        mail_store.execute("add-sender-rule", PROJECT_A, {"email": BOX, "sender": sender, "action": "block"})
    assert err.value.code in ("invalid_sender_rule", "missing_field"), err.value.code
    assert commit_count(mail_store.git.path) == before


def test_at_most_100_sender_rules_a_scope(mail_store: Store) -> None:
    from mailstate.state.models import DomainFile

    dom = mail_store.snapshot.domains["example.com"]
    full = {f"s{i:03d}@x.test": "block" for i in range(100)}
    DomainFile.model_validate({**dom.model_dump(), "sender_rules": full})  # 100 is the limit, allowed
    with pytest.raises(ValueError, match="1-100"):
        DomainFile.model_validate({**dom.model_dump(), "sender_rules": {**full, "one@more.test": "allow"}})
    for i in range(100):
        mail_store.execute(
            "add-sender-rule", PROJECT_A, {"email": BOX, "sender": f"s{i:03d}@x.test", "action": "block"}
        )
    with pytest.raises(Conflict) as err:
        mail_store.execute("add-sender-rule", PROJECT_A, {"email": BOX, "sender": "one@more.test", "action": "block"})
    assert err.value.code == "too_many_sender_rules"


def test_a_bad_rule_action_names_the_sender_rule(mail_store: Store) -> None:
    for action in ("quarantine", None, 1, "Allow"):
        with pytest.raises(InvalidInput) as err:
            mail_store.execute("add-sender-rule", PROJECT_A, {"email": BOX, "sender": "@x.test", "action": action})
        assert err.value.code == "invalid_sender_rule" and err.value.field == "action"


@pytest.mark.e2e  # open_store verifies the head's signature with ssh-keygen
def test_policies_and_rules_survive_a_restart_through_the_parse_cache(data_dir: Any, mail_store: Store) -> None:
    from mailstate.state.datadir import open_store

    run(mail_store, "set-spam-policy", {"domain": "example.com", "action": "reject", "reject_score": 9})
    run(mail_store, "set-spam-policy", {"email": BOX, "action": "junk", "junk_score": 2.5})
    run(mail_store, "add-sender-rule", {"domain": "example.com", "sender": "@spam.test", "action": "block"})
    run(mail_store, "add-sender-rule", {"email": BOX, "sender": "b@c.test", "action": "allow"})
    want = mail_store.snapshot.domains["example.com"]
    open_store(data_dir.root)  # loads the commit: writes the cache
    warm = open_store(data_dir.root)  # reads the domain from the cache
    got = warm.snapshot.domains["example.com"]
    assert got == want and got.mailboxes["info"].spam_policy == want.mailboxes["info"].spam_policy
    assert got.spam_policy is not None and got.spam_policy.reject_score == 9.0
    assert got.sender_rules == {"@spam.test": "block"} and got.mailboxes["info"].sender_rules == {"b@c.test": "allow"}
