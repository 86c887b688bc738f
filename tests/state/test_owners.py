"""Vacation, filters and app passwords at the store: the rules, the limits, what lands in git.

A real data dir (git repo, SSH-signed commits, SQLite); each bad input is checked to be a 4xx
error in the one shape that names its limit, with no commit.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime
from typing import Any

import bcrypt
import pytest
import yaml

from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.errors import Conflict, InvalidInput, MailstateError, NotFound
from mailstate.state.localdb import LocalDB
from mailstate.state.models import Settings
from mailstate.state.nodes import record_report
from mailstate.state.ops import OPERATIONS
from mailstate.state.store import Store
from tests.helpers.common import (
    ADMIN,
    PASSWORD,
    PROJECT_A,
    PROJECT_B,
    FakeClock,
    commit_count,
    history_text,
    make_key,
    read_file,
)

BOX = "info@example.com"
SIEVE = "rendered/domains/ex/example.com/sieve_scripts"
APP = "rendered/domains/ex/example.com/app_passwords"


def show(store: Store, path: str) -> str | None:
    return read_file(store.git.path, path)


def box_yaml(store: Store, local: str = "info") -> dict[str, Any]:
    raw = show(store, "domains/ex/example.com.yaml")
    assert raw is not None
    return dict(yaml.safe_load(raw)["mailboxes"][local])


def refused(
    store: Store, data_dir: DataDir, op: str, body: dict[str, Any], cls: type[MailstateError], code: str
) -> str:
    """The operation fails with `cls`/`code` and makes no commit; its message."""
    before = commit_count(data_dir.repo)
    with pytest.raises(cls) as exc:
        store.execute(op, PROJECT_A, body)
    assert exc.value.code == code, exc.value
    assert commit_count(data_dir.repo) == before
    return exc.value.message


def vacation(**more: Any) -> dict[str, Any]:
    return {"email": BOX, "enabled": True, "body": "I am away.\n", **more}


def rule(**more: Any) -> dict[str, Any]:
    return {"name": "r", "field": "subject", "op": "contains", "value": "x", "action": "mark_read", **more}


# --- vacation -----------------------------------------------------------------------------------


def test_set_vacation_compiles_a_script_and_list_users_shows_it(mail_store: Store) -> None:
    out = mail_store.execute(
        "set-vacation",
        PROJECT_A,
        vacation(subject='Away "now"', body="Back on Monday.\r\n.\r\nAnna\r\n", start="2026-07-01", end="2026-07-14"),
    ).result
    assert out["commit"] and out["vacation"]["interval_days"] == 7
    users = mail_store.execute("list-users", PROJECT_A, {}).result["users"]
    assert users[0]["vacation"] == {"enabled": True, "start": "2026-07-01", "end": "2026-07-14"}
    assert box_yaml(mail_store)["vacation"]["body"] == "Back on Monday.\n.\nAnna\n"  # CRLF made LF
    script = show(mail_store, SIEVE)
    assert script is not None
    assert ':subject "Away \\"now\\"" text:\nBack on Monday.\n..\nAnna\n.\n;\n' in script  # escaped, dot-stuffed
    assert 'currentdate :zone "+0000" :value "ge" "date" "2026-07-01"' in script
    assert 'not envelope :all :is "from" "info@example.com"' in script
    # The same again changes nothing.
    again = vacation(
        subject='Away "now"', body="Back on Monday.\r\n.\r\nAnna\r\n", start="2026-07-01", end="2026-07-14"
    )
    assert mail_store.execute("set-vacation", PROJECT_A, again).result["commit"] is None
    # Switched off with `enabled` alone: no script, the text and dates kept for next time.
    off = mail_store.execute("set-vacation", PROJECT_A, {"email": BOX, "enabled": False}).result
    assert off["vacation"]["body"] == "Back on Monday.\n.\nAnna\n" and off["vacation"]["enabled"] is False
    assert show(mail_store, SIEVE) is None
    summary = mail_store.execute("list-users", PROJECT_A, {}).result["users"][0]["vacation"]
    assert summary == {"enabled": False, "start": "2026-07-01", "end": "2026-07-14"}
    # And on again the same way; a field given as null is cleared.
    on = mail_store.execute("set-vacation", PROJECT_A, {"email": BOX, "enabled": True, "end": None}).result
    assert on["vacation"]["subject"] == 'Away "now"' and on["vacation"]["end"] is None
    script = show(mail_store, SIEVE) or ""
    assert '"ge" "date" "2026-07-01"' in script and '"le" "date"' not in script
    # Off with every text field null: nothing is kept.
    nothing = {"email": BOX, "enabled": False, "subject": None, "body": None, "start": None, "end": None}
    assert mail_store.execute("set-vacation", PROJECT_A, nothing).result["vacation"] is None
    assert "vacation" not in box_yaml(mail_store)
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"][0]["vacation"] is None


def test_vacation_turned_off_with_its_text_keeps_it_uncompiled(mail_store: Store) -> None:
    mail_store.execute("set-vacation", PROJECT_A, {"email": BOX, "enabled": False, "body": "Later."})
    assert box_yaml(mail_store)["vacation"] == {"enabled": False, "body": "Later.", "interval_days": 7}
    assert show(mail_store, SIEVE) is None
    assert mail_store.execute("list-users", PROJECT_A, {}).result["users"][0]["vacation"]["enabled"] is False


@pytest.mark.parametrize(
    "body, code, needle",
    [
        (vacation(body="é" * 8193), "invalid_vacation", "16384 bytes"),  # 8193 characters, 16386 bytes
        (vacation(subject="s" * 201), "invalid_vacation", "200 characters"),
        (vacation(subject="two\nlines"), "invalid_vacation", "one line"),
        (vacation(body="bell \x07"), "invalid_vacation", "control"),
        (vacation(interval_days=0), "invalid_vacation", "1-365"),
        (vacation(interval_days=366), "invalid_vacation", "1-365"),
        (vacation(start="2026-02-30"), "invalid_vacation", "not a real date"),
        (vacation(start="1 July"), "invalid_vacation", "ISO date"),
        ({"email": BOX, "enabled": "yes", "body": "x"}, "invalid_request", "true or false"),
    ],
)
def test_bad_vacations_are_a_400_naming_the_limit(
    mail_store: Store, data_dir: DataDir, body: dict[str, Any], code: str, needle: str
) -> None:
    assert needle in refused(mail_store, data_dir, "set-vacation", body, InvalidInput, code)


def test_a_vacation_ending_before_it_starts_is_a_conflict(mail_store: Store, data_dir: DataDir) -> None:
    refused(
        mail_store,
        data_dir,
        "set-vacation",
        vacation(start="2026-07-10", end="2026-07-01"),
        Conflict,
        "vacation_ends_before_start",
    )


def test_a_body_of_exactly_16_kib_is_fine(mail_store: Store) -> None:
    assert mail_store.execute("set-vacation", PROJECT_A, vacation(body="é" * 8192)).result["commit"]


# --- filters -----------------------------------------------------------------------------------


def test_set_filters_compiles_every_action_with_hostile_values_escaped(mail_store: Store) -> None:
    filters = [
        rule(name="bills", value='a "quoted" \\ value; redirect "evil@example.org";', action="fileinto", target="Work/Bills 2026"),
        rule(name="boss", field="From", op="is", value="boss@example.org", action="redirect", target="Anna@Phone.example"),
        rule(name="spam", field="header:X-Spam-Flag", op="is", value="YES", action="discard"),
        rule(name="news", field="to", stop=True),
    ]  # fmt: skip
    out = mail_store.execute("set-filters", PROJECT_A, {"email": BOX, "filters": filters}).result
    assert [f["target"] for f in out["filters"]] == ["Work/Bills 2026", "anna@phone.example", None, None]
    assert out["filters"][1]["field"] == "from" and out["filters"][2]["stop"] is True  # discard stops
    listed = mail_store.execute("list-filters", PROJECT_A, {"email": BOX}).result
    assert listed == {"filters": out["filters"]}
    script = show(mail_store, SIEVE)
    assert script is not None
    assert (
        'if header :contains "subject" "a \\"quoted\\" \\\\ value; redirect \\"evil@example.org\\";" {\n  fileinto :create "Work.Bills 2026";\n}\n'
        in script
    )
    assert 'if address :all :is "from" "boss@example.org" {\n  redirect "anna@phone.example";\n}\n' in script
    assert 'if header :is "X-Spam-Flag" "YES" {\n  discard;\n  stop;\n}\n' in script
    assert 'if header :contains "to" "x" {\n  addflag "\\\\Seen";\n  stop;\n}\n' in script
    # [] removes every rule and the script with them.
    assert mail_store.execute("set-filters", PROJECT_A, {"email": BOX, "filters": []}).result["commit"]
    assert show(mail_store, SIEVE) is None and "filters" not in box_yaml(mail_store)


@pytest.mark.parametrize(
    "filters, code, needle",
    [
        ([rule()] * 51, "too_many_filters", "At most 50"),
        ([rule(action="fileinto", target="../etc")], "invalid_folder", "'..'"),
        ([rule(action="fileinto", target="/etc/passwd")], "invalid_folder", "start with '/'"),
        ([rule(action="fileinto", target="f" * 201)], "invalid_folder", "200 characters"),
        ([rule(action="fileinto", target="a/.hidden")], "invalid_folder", "'.'"),
        ([rule(action="fileinto", target="Inbox*")], "invalid_folder", "wildcards"),
        ([rule(action="fileinto", target="two\nlines")], "invalid_folder", "one line"),
        ([rule(action="fileinto")], "invalid_filter", "needs a target folder"),
        ([rule(action="redirect", target="|/bin/sh")], "invalid_email", ""),
        ([rule(target="Junk")], "invalid_filter", "takes no target"),
        ([rule(value="line\nbreak")], "invalid_filter", "one line"),
        ([rule(value="v" * 501)], "invalid_filter", "500 characters"),
        ([rule(field="header:X Bad")], "invalid_filter", "header:<Name>"),
        ([rule(op="matches")], "invalid_filter", "contains, is"),
        ([rule(action="execute")], "invalid_filter", "fileinto, discard, redirect, mark_read"),
        ([{**rule(), "include": "x"}], "invalid_filter", "unknown field"),
        ([rule(stop="yes")], "invalid_filter", "true or false"),
    ],
)
def test_bad_filters_are_a_400_naming_the_limit(
    mail_store: Store, data_dir: DataDir, filters: list[dict[str, Any]], code: str, needle: str
) -> None:
    assert needle in refused(
        mail_store, data_dir, "set-filters", {"email": BOX, "filters": filters}, InvalidInput, code
    )


def test_redirects_obey_the_forwarding_rules(mail_store: Store, data_dir: DataDir) -> None:
    own = [rule(action="redirect", target=BOX)]
    refused(mail_store, data_dir, "set-filters", {"email": BOX, "filters": own}, Conflict, "alias_loop")
    # A loop through an alias, like forwarding: info -> back@ -> info.
    mail_store.execute("add-alias", PROJECT_A, {"address": "back@example.com", "destinations": [BOX]})
    loop = [rule(action="redirect", target="back@example.com")]
    refused(mail_store, data_dir, "set-filters", {"email": BOX, "filters": loop}, Conflict, "alias_loop")
    # Forwarding and redirects together: at most 50 addresses, whichever is set last.
    forward = [f"f{i}@example.org" for i in range(45)]
    mail_store.execute("set-forwarding", PROJECT_A, {"email": BOX, "destinations": forward})
    six = [rule(action="redirect", target=f"r{i}@example.org") for i in range(6)]
    message = refused(
        mail_store, data_dir, "set-filters", {"email": BOX, "filters": six}, InvalidInput, "too_many_destinations"
    )
    assert "at most 50" in message
    five = six[:5]
    assert mail_store.execute("set-filters", PROJECT_A, {"email": BOX, "filters": five}).result["commit"]
    more = {"email": BOX, "destinations": [*forward, "one-more@example.org"]}
    refused(mail_store, data_dir, "set-forwarding", more, InvalidInput, "too_many_destinations")


def test_owner_settings_need_an_active_mailbox_of_the_caller(mail_store: Store, data_dir: DataDir) -> None:
    mail_store.execute("add-user", PROJECT_A, {"email": "gone@example.com", "password": PASSWORD})
    mail_store.execute("remove-user", PROJECT_A, {"email": "gone@example.com"})
    gone = {"email": "gone@example.com"}
    refused(mail_store, data_dir, "set-vacation", vacation(**gone), Conflict, "mailbox_inactive")
    refused(mail_store, data_dir, "set-filters", {**gone, "filters": []}, Conflict, "mailbox_inactive")
    app = {**gone, "name": "x", "scopes": ["imap"]}
    refused(mail_store, data_dir, "add-app-password", app, Conflict, "mailbox_inactive")
    for op, body in (
        ("set-vacation", vacation()),
        ("set-filters", {"email": BOX, "filters": []}),
        ("list-filters", {"email": BOX}),
        ("add-app-password", {"email": BOX, "name": "x", "scopes": ["imap"]}),
        ("list-app-passwords", {"email": BOX}),
        ("remove-app-password", {"email": BOX, "name": "x"}),
    ):
        with pytest.raises(NotFound) as exc:
            mail_store.execute(op, PROJECT_B, body)
        assert exc.value.code == "mailbox_not_found", op


# --- app passwords -----------------------------------------------------------------------------


def test_an_app_password_is_shown_once_and_only_its_hash_is_kept(mail_store: Store, data_dir: DataDir) -> None:
    out = mail_store.execute(
        "add-app-password", PROJECT_A, {"email": BOX, "name": "iPhone Anna", "scopes": ["smtp", "imap"]}
    )
    assert out.created and set(out.result) == {"commit", "name", "scopes", "password"}
    password = out.result["password"]
    assert len(password) == 29 and password.count("-") == 5 and out.result["scopes"] == ["imap", "smtp"]
    entry = box_yaml(mail_store)["app_passwords"]["iPhone Anna"]
    assert bcrypt.checkpw(password.encode(), entry["hash"].removeprefix("{BLF-CRYPT}").encode())
    assert entry["tag"] == hashlib.sha256(password.encode()).hexdigest()[:4] and entry["slot"] == 0
    lines = show(mail_store, APP)
    assert lines == (
        f"info@example.com/imap/00/{entry['tag']}:{entry['hash']}\ninfo@example.com/smtp/00/{entry['tag']}:{entry['hash']}\n"
    )
    history = history_text(data_dir.repo)
    assert password not in history and password.replace("-", "") not in history
    listed = mail_store.execute("list-app-passwords", PROJECT_A, {"email": BOX}).result["app_passwords"]
    assert listed == [{"name": "iPhone Anna", "scopes": ["imap", "smtp"], "created_at": entry["created_at"].replace("Z", "+00:00"), "last_used_at": None}]  # fmt: skip
    # The mailbox's own password is untouched.
    assert bcrypt.checkpw(PASSWORD.encode(), box_yaml(mail_store)["password"].removeprefix("{BLF-CRYPT}").encode())


def test_app_password_limits_are_a_400_naming_them(mail_store: Store, data_dir: DataDir) -> None:
    add = {"email": BOX, "scopes": ["imap"]}
    for i in range(20):
        mail_store.execute("add-app-password", PROJECT_A, {**add, "name": f"device {i}"})
    message = refused(
        mail_store, data_dir, "add-app-password", {**add, "name": "one more"}, InvalidInput, "too_many_app_passwords"
    )
    assert "at most 20" in message
    mail_store.execute("remove-app-password", PROJECT_A, {"email": BOX, "name": "device 3"})
    taken = refused(
        mail_store, data_dir, "add-app-password", {**add, "name": "DEVICE 4"}, InvalidInput, "app_password_name_taken"
    )
    assert "unique" in taken
    again = mail_store.execute("add-app-password", PROJECT_A, {**add, "name": "phone"}).result
    assert box_yaml(mail_store)["app_passwords"]["phone"]["slot"] == 3  # the freed slot
    assert again["password"]
    for scopes in ([], ["pop3"], ["imap", "imap"], "imap"):
        refused(
            mail_store,
            data_dir,
            "add-app-password",
            {**add, "name": "x", "scopes": scopes},
            InvalidInput,
            "invalid_scopes",
        )
    refused(mail_store, data_dir, "add-app-password", {**add, "name": "bad:name"}, InvalidInput, "invalid_app_password")
    refused(
        mail_store, data_dir, "remove-app-password", {"email": BOX, "name": "nope"}, NotFound, "app_password_not_found"
    )


def test_last_used_at_comes_from_the_nodes_reports(mail_store: Store, data_dir: DataDir) -> None:
    mail_store.execute("add-node", ADMIN, {"name": "n1"})
    made = mail_store.execute("add-app-password", PROJECT_A, {"email": BOX, "name": "phone", "scopes": ["imap"]})
    created = datetime.fromisoformat(
        box_yaml(mail_store)["app_passwords"]["phone"]["created_at"].replace("Z", "+00:00")
    )
    db = LocalDB(data_dir.db)
    try:
        used = int(created.timestamp()) + 1  # the store's clock moves a second a call: before the next password
        now = datetime.fromtimestamp(used + 5, UTC)
        report = {"status": "ok", "app_passwords_used": [{"email": BOX, "slot": 0, "used_at": used}]}
        record_report(db, mail_store.snapshot, "n1", report, None, now)
        listed = mail_store.execute("list-app-passwords", PROJECT_A, {"email": BOX}).result["app_passwords"]
        assert listed[0]["last_used_at"] == datetime.fromtimestamp(used, UTC).isoformat()
        # A use before the password was made (an old one in the same slot) is not its use.
        mail_store.execute("remove-app-password", PROJECT_A, {"email": BOX, "name": "phone"})
        mail_store.execute("add-app-password", PROJECT_A, {"email": BOX, "name": "phone", "scopes": ["imap"]})
        record_report(db, mail_store.snapshot, "n1", report, None, now)
        assert (
            mail_store.execute("list-app-passwords", PROJECT_A, {"email": BOX}).result["app_passwords"][0][
                "last_used_at"
            ]
            is None
        )
    finally:
        db.close()
    assert made.result["password"]


def test_app_passwords_are_hashed_outside_the_write_lock(tmp_path: Any) -> None:
    """An app password at bcrypt cost 12 (a quarter second) and a write that starts after it: the
    write lands first, because the hash is made in the operation's prepare step, before the lock."""
    assert OPERATIONS["add-app-password"].prepare is not None
    data = init_data_dir(tmp_path / "data", Settings(bcrypt_cost=12), clock=FakeClock(), keygen=make_key)
    store = open_store(data.root, clock=FakeClock())
    store.execute("add-domain", ADMIN, {"domain": "example.com", "project_id": 101})
    store.execute("add-user", PROJECT_A, {"email": BOX, "password": PASSWORD})
    done: list[str] = []
    started = threading.Event()

    def app() -> None:
        started.set()
        store.execute("add-app-password", PROJECT_A, {"email": BOX, "name": "slow", "scopes": ["imap"]})
        done.append("app password")

    worker = threading.Thread(target=app)
    worker.start()
    started.wait()
    time.sleep(0.05)  # the app password is hashing now
    store.execute("set-filters", PROJECT_A, {"email": BOX, "filters": [rule()]})
    done.append("filters")
    worker.join()
    assert done == ["filters", "app password"]
