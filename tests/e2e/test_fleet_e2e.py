"""One fleet, one mail service, end to end: one `mailstate serve` and three nodes on one machine,
each in its own network namespace at its own address, each with its own Postfix and Dovecot from
its own bundle (tests/netns.py, tests/fleetworld.py). Nothing is faked: mail goes over SMTP between
the namespaces, logins over IMAP and submission with TLS, mail moves with doveadm sync.

Homes: alpha.test on n1, beta.test on n2 (enable-email names them); gamma.test is moved.
"""

from __future__ import annotations

import imaplib
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.fleetworld import PASSWORD, World, fleet_world, wait
from tests.helpers.mailnode import MailNode, run_pi_pull
from tests.helpers.netns import FleetNode, subjects

pytestmark = pytest.mark.e2e

ALPHA, BETA, GAMMA = "info@alpha.test", "bob@beta.test", "carol@gamma.test"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with fleet_world(["n1", "n2", "n3"], tmp_path_factory.mktemp("fleet")) as w:
        for domain, node in (("alpha.test", "n1"), ("beta.test", "n2"), ("gamma.test", "n1")):
            w.call("link-domain", {"domain": domain, "project_id": 42}, 201)
            assert w.call("enable-email", {"domain": domain, "node": node})["home"] == node
        for email in (ALPHA, BETA, GAMMA):
            w.call("add-user", {"email": email, "password": PASSWORD}, 201)
        w.settle()
        yield w


def inbox(world: World, node: str, user: str) -> list[str]:
    return subjects(world.nodes[node], user, PASSWORD)


def arrived(world: World, node: str, user: str, subject: str, timeout: float = 30) -> list[str]:
    return wait(
        f"{subject} for {user} on {node}", lambda: (s := inbox(world, node, user)) and subject in s and s, timeout
    )


def test_placement_is_listed(world: World) -> None:
    homes = {d["domain"]: (d["home"], d["moving_to"]) for d in world.call("list-domains")["domains"]}
    assert homes == {"alpha.test": ("n1", None), "beta.test": ("n2", None), "gamma.test": ("n1", None)}
    nodes = {n["name"]: n for n in world.call("list-nodes")["nodes"]}
    assert {name: (n["address"], n["domains"], n["mailboxes"]) for name, n in nodes.items()} == {
        "n1": (world.nodes["n1"].address, 2, 2),
        "n2": (world.nodes["n2"].address, 1, 1),
        "n3": (world.nodes["n3"].address, 0, 0),
    }
    # A new domain goes to the addressed node with the fewest mailboxes.
    world.call("link-domain", {"domain": "delta.test", "project_id": 42}, 201)
    assert world.call("enable-email", {"domain": "delta.test"}, admin=False)["home"] == "n3"


def test_mail_sent_to_a_non_home_node_is_only_on_the_home(world: World) -> None:
    world.nodes["n2"].send(ALPHA, "alpha-via-n2")
    world.nodes["n3"].send(ALPHA, "alpha-via-n3")
    got = arrived(world, "n1", ALPHA, "alpha-via-n3")
    assert "alpha-via-n2" in got
    for name in ("n2", "n3"):
        assert world.nodes[name].maildir_messages("alpha.test") == [], name
    assert len(world.nodes["n1"].maildir_messages("alpha.test")) == len(got)
    # Only the home reports the mailbox's usage (the others hold none of its mail): n1 first, then
    # the others, and the figure stays n1's.
    world.tick("n1", "n2", "n3")
    user = next(u for u in world.call("list-users", {"domain": "alpha.test"})["users"] if u["email"] == ALPHA)
    assert user["messages"] == len(got), user
    # The hop between the nodes is the fleet relay, over TLS with the peer's pinned certificate.
    log = world.nodes["n2"].postfix_log()
    assert f"relay={world.nodes['n1'].address}[{world.nodes['n1'].address}]:2525" in log
    assert "Verified TLS connection established" in log or "Trusted TLS connection established" in log


def test_imap_and_submission_work_on_a_non_home_node(world: World) -> None:
    world.nodes["n1"].send(BETA, "beta-direct")
    arrived(world, "n2", BETA, "beta-direct")
    # IMAP on n1 and n3 (neither is beta.test's home) reads the home's mailbox through the proxy.
    assert "beta-direct" in inbox(world, "n1", BETA)
    assert "beta-direct" in inbox(world, "n3", BETA)
    assert world.nodes["n1"].maildir_messages("beta.test") == []
    assert f"proxy(bob@beta.test,{world.nodes['n2'].address}:993): Started proxying" in world.nodes["n3"].dovecot_log()
    # A wrong password is refused through the proxy too.
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        world.nodes["n3"].imap(BETA, "not the password")
    # Submission on n3 as bob (home n2), to alpha (home n1): authenticated on n3, delivered on n1.
    world.nodes["n3"].submit(BETA, PASSWORD, ALPHA, "submitted-on-n3")
    arrived(world, "n1", ALPHA, "submitted-on-n3")


def _folder_subjects(node: FleetNode, user: str, password: str, folder: str) -> list[str]:
    m = node.imap(user, password)
    try:
        typ, _ = m.select(folder, readonly=True)
        if typ != "OK":
            return []
        typ, data = m.search(None, "ALL")
        out = []
        for i in data[0].split() if typ == "OK" and data and data[0] else []:
            typ, fetched = m.fetch(i, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            item = fetched[0]
            assert isinstance(item, tuple)
            out.append(bytes(item[1]).decode().split(":", 1)[1].strip())
        return out
    finally:
        m.logout()


def test_filters_and_app_passwords_are_served_by_the_home(world: World) -> None:
    """The owners' settings in a fleet: a filter runs where the mail is delivered (the home), and an
    app password's login through another node is proxied to the home, which checks it."""
    world.call(
        "set-filters",
        {"email": BETA, "filters": [
            {"name": "bills", "field": "subject", "op": "contains", "value": "invoice", "action": "fileinto",
             "target": "Invoices"},
        ]},
    )  # fmt: skip
    phone = world.call("add-app-password", {"email": BETA, "name": "phone", "scopes": ["imap"]}, 201)["password"]
    world.settle()
    world.nodes["n3"].send(BETA, "invoice-via-n3")  # n3 is not beta.test's home: relayed to n2
    wait(
        "the invoice in Invoices on n2",
        lambda: "invoice-via-n3" in _folder_subjects(world.nodes["n2"], BETA, PASSWORD, "Invoices"),
        30,
    )
    assert "invoice-via-n3" not in inbox(world, "n2", BETA)
    # The imap-only app password logs in on n1 and n3 (proxied to n2) and reads the home's folder.
    for name in ("n1", "n3"):
        assert "invoice-via-n3" in _folder_subjects(world.nodes[name], BETA, phone, "Invoices"), name
    assert f"proxy(bob@beta.test,{world.nodes['n2'].address}:993): Started proxying" in world.nodes["n1"].dovecot_log()
    with pytest.raises(smtplib.SMTPAuthenticationError):  # imap only: no submission, on any node
        world.nodes["n3"].submit(BETA, phone, ALPHA, "sent-with-an-imap-only-password")
    world.call("remove-app-password", {"email": BETA, "name": "phone"})
    world.settle()

    def refused() -> bool:
        try:
            world.nodes["n3"].imap(BETA, phone).logout()
        except imaplib.IMAP4.error as exc:
            return "AUTHENTICATIONFAILED" in str(exc)
        return False

    # Dovecot looks at a passwd-file again at most once a second (passwd_file_sync).
    wait("the removed app password refused on n3", refused, 5)
    world.call("set-filters", {"email": BETA, "filters": []})


def test_mail_waits_while_the_home_is_down_and_arrives_after(world: World) -> None:
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    n1.stop()
    try:
        n2.send(ALPHA, "while-n1-is-down")  # accepted: n2 takes mail for every domain
        queued = wait("the message in n2's queue", lambda: "info@alpha.test" in n2.postqueue() and n2.postqueue())
        assert "(connect to" in queued or "Connection refused" in queued or "deferred" in queued.lower() or queued
        n2.flush()
        wait("a deferred delivery attempt", lambda: "status=deferred" in n2.postfix_log())
        assert "status=bounced" not in n2.postfix_log()
        assert n2.maildir_messages("alpha.test") == []
    finally:
        n1.start()
    n2.flush()
    arrived(world, "n1", ALPHA, "while-n1-is-down")
    wait("n2's queue to empty", lambda: "Mail queue is empty" in n2.postqueue())


def test_move_domain_with_a_delivery_in_the_middle(world: World) -> None:
    n1, n2, n3 = (world.nodes[n] for n in ("n1", "n2", "n3"))
    for i in range(5):
        n2.send(GAMMA, f"before-{i}")
    arrived(world, "n1", GAMMA, "before-4")
    started = world.call("move-domain", {"domain": "gamma.test", "node": "n3"}, 202)
    assert (started["from"], started["to"]) == ("n1", "n3") and started["commit"]
    assert world.domain("gamma.test")["moving_to"] == "n3"
    again = world.call("move-domain", {"domain": "gamma.test", "node": "n3"}, 202)
    assert again["commit"] is None
    world.tick("n1", "n2")
    n2.send(GAMMA, "before-copy")  # to n1, the home still
    arrived(world, "n1", GAMMA, "before-copy")
    assert "before-copy" in inbox(world, "n3", GAMMA)  # IMAP through n3, the target, to the home

    # n3 copies every mailbox from n1 and reports; the server switches the home.
    world.tick("n3")
    moved = world.domain("gamma.test")
    assert (moved["home"], moved["moving_to"]) == ("n3", None)
    # n2 has not applied the switch yet: it still passes gamma's mail to n1, which has not either.
    n2.send(GAMMA, "in-the-middle")
    arrived(world, "n1", GAMMA, "in-the-middle")
    assert len(n3.maildir_messages("gamma.test")) == 6  # n3 holds the copy: it lacks that one yet
    # n1 applies the switch: it hands over what it received meanwhile and reports it did.
    world.tick("n1")
    world.settle()
    n2.send(GAMMA, "after")
    got = arrived(world, "n3", GAMMA, "after")
    expected = [f"before-{i}" for i in range(5)] + ["before-copy", "in-the-middle", "after"]
    assert sorted(got) == sorted(expected), got  # every message exactly once
    assert n1.maildir_messages("gamma.test") == []
    # Nothing of the domain is left on the old home (no home recreated by the hand-over's sync).
    assert not (n1.mail_root / "gamma.test").exists() or list((n1.mail_root / "gamma.test").iterdir()) == []
    assert len(n3.maildir_messages("gamma.test")) == len(expected)
    # IMAP on the old home works and shows the same mailbox (proxied to n3).
    assert sorted(inbox(world, "n1", GAMMA)) == sorted(expected)
    assert world.domain("gamma.test")["home"] == "n3"
    log = world.server.git("log", "--format=%s|%(trailers:key=Actor,valueonly,separator=)", "-3")
    assert "moved gamma.test|node:n1" in log and "switch-home gamma.test|node:n3" in log


def test_a_commit_that_points_a_mailbox_elsewhere_never_reaches_a_node(world: World, tmp_path: Path) -> None:
    """A signed commit pushed past the API whose passwd line proxies to a foreign host: the server
    refuses it (never states it), so no node applies it (the node's own refusal of such a line is
    in tests/test_fleet_vectors.py)."""
    before = world.head()
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(world.server.data.repo), str(work)], check=True, env=world.server.env)
    passwd = next(work.glob("rendered/domains/al/alpha.test/passwd"))
    text = passwd.read_text().replace(f"host={world.nodes['n1'].address}", "host=203.0.113.66")
    assert "host=203.0.113.66" in text
    passwd.write_text(text)
    base = ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org"]
    subprocess.run([*base, "commit", "-qam", "hostile"], check=True, env=world.server.env)
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True, env=world.server.env)
    world.tick()
    for name, node in world.nodes.items():
        current = (node.root / "current").resolve().name
        assert current == before, name
        assert (
            "203.0.113.66"
            not in (node.root / "current" / "dovecot" / "passwd.d" / "a" / "al" / "alpha.test").read_text()
        )


def test_a_one_node_fleet_without_addresses_works_as_before(mailnode: MailNode, tmp_path: Path) -> None:
    """No address anywhere: no home, no proxy fields, no fleet files; delivery and logins as always."""
    server, admin, project = start_server_for(mailnode, tmp_path / "server")
    try:
        cfg = provision_node(mailnode, server, admin, tmp_path / "etc")
        assert (
            admin.post("/v1/email-account/link-domain", json={"domain": "solo.test", "project_id": 42}).status_code
            == 201
        )
        enabled = project.post("/v1/email-account/enable-email", json={"domain": "solo.test"}).json()
        assert enabled["home"] is None
        r = project.post("/v1/email-account/add-user", json={"email": "me@solo.test", "password": PASSWORD})
        assert r.status_code == 201, r.text
        tick = run_pi_pull(cfg)
        assert tick.returncode == 0, tick.stderr
        listed = project.get("/v1/email-account/list-domains").json()["domains"]
        assert [(d["home"], d["moving_to"]) for d in listed] == [(None, None)]
        node = admin.get("/v1/email-account/list-nodes").json()["nodes"][0]
        assert (node["address"], node["domains"], node["mailboxes"], node["status"]) == (None, 0, 0, "ok")
        passwd = server.git("show", "main:rendered/domains/so/solo.test/passwd")
        assert passwd.rstrip("\n").endswith("::userdb_quota_rule=*:storage=1024M") and "proxy" not in passwd
        assert server.git("ls-tree", "--name-only", "main", "rendered/").split() == [
            "rendered/domains",
            "rendered/settings",
        ]
        mailnode.send("me@solo.test", "solo-mail")
        assert b"solo-mail" in mailnode.wait_for_message("me@solo.test", PASSWORD, "solo-mail")
        assert not (mailnode.root / "fleet" / "dovecot.conf").exists()
        assert "fleet" not in mailnode.postfix_log().replace("fleet-relay", "")  # nothing was relayed
    finally:
        admin.close()
        project.close()
        server.stop()
