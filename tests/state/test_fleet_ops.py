"""The fleet on the server: placement, move-domain, the commits nodes' reports make, node-to-node
credentials, dns-records' MX, and the rules across domain files and nodes.yaml. Through a real
store (and, for the node endpoints, a real server over HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailstate.api.cli import main
from mailstate.compiler.render import compile_state
from mailstate.state import fleet, placement
from mailstate.state.datadir import DataDir, open_store
from mailstate.state.errors import MailstateError
from mailstate.state.load import check_commit
from mailstate.state.nodes import parse_report
from mailstate.state.place import place_store
from mailstate.state.store import Store
from mailstate.state.validate import certificate_fingerprint
from tests.helpers.certs import certificate
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, commit_count, commit_message
from tests.helpers.store import err, show

A = PROJECT_A.project_id


def nodes(store: Store, *names: str, addressed: bool = True) -> None:
    for i, name in enumerate(names, 1):
        body = {"name": name, "address": f"mx{i}.fleet.example"} if addressed else {"name": name}
        store.execute("add-node", ADMIN, body)


def domain(store: Store, name: str, **enable: Any) -> dict[str, Any]:
    store.execute("link-domain", ADMIN, {"domain": name, "project_id": A})
    return store.execute("enable-email", ADMIN if enable else PROJECT_A, {"domain": name, **enable}).result


def listed(store: Store, name: str) -> dict[str, Any]:
    return next(d for d in store.execute("list-domains", ADMIN, {}).result["domains"] if d["domain"] == name)


def report(store: Store, node: str, *steps: tuple[str, str]) -> list[str]:
    body = {"status": "ok", "moves": [{"domain": d, "step": s} for d, s in steps]}
    return fleet.apply_report(store, node, parse_report(body))


# --- without addresses: as before ------------------------------------------------------------


def test_a_fleet_without_addresses_places_nothing_and_renders_as_before(store: Store) -> None:
    nodes(store, "a", "b", addressed=False)
    assert domain(store, "example.com")["home"] is None
    store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    store.execute("add-user", PROJECT_A, {"email": "old@example.com", "password": PASSWORD})
    store.execute("remove-user", PROJECT_A, {"email": "old@example.com"})
    assert listed(store, "example.com")["home"] is None and listed(store, "example.com")["moving_to"] is None
    text = show(store, "rendered/domains/ex/example.com/passwd") or ""
    assert text.count("\n") == 1 and text.endswith("::userdb_quota_rule=*:storage=1024M\n")  # no proxy, no nologin
    for path in ("rendered/nodes", "rendered/nodes.pem", "rendered/moves", "rendered/domains/ex/example.com/home"):
        assert show(store, path) is None, path
    assert "home" not in (show(store, "domains/ex/example.com.yaml") or "")
    assert "\n    address:" not in (show(store, "nodes.yaml") or "") and "tls_certificate" not in (
        show(store, "nodes.yaml") or ""
    )
    err_ = err(store, "move-domain", ADMIN, {"domain": "example.com", "node": "a"})
    assert err_.code == "node_not_usable"


# --- placement ---------------------------------------------------------------------------------


def test_enable_email_places_on_the_addressed_node_with_the_fewest_mailboxes(store: Store) -> None:
    nodes(store, "n1", "n2")
    nodes(store, "relay", addressed=False)
    assert domain(store, "one.example")["home"] == "n1"  # a tie: the first name
    for local in ("a", "b"):
        store.execute("add-user", PROJECT_A, {"email": f"{local}@one.example", "password": PASSWORD})
    assert domain(store, "two.example")["home"] == "n2"
    store.execute("add-user", PROJECT_A, {"email": "c@two.example", "password": PASSWORD})
    assert domain(store, "three.example")["home"] == "n2"  # 1 mailbox against 2
    assert domain(store, "four.example", node="n1")["home"] == "n1"  # an admin names it
    rows = {
        n["name"]: (n["address"], n["domains"], n["mailboxes"])
        for n in store.execute("list-nodes", ADMIN, {}).result["nodes"]
    }
    assert rows == {"n1": ("mx1.fleet.example", 2, 2), "n2": ("mx2.fleet.example", 2, 1), "relay": (None, 0, 0)}
    home = show(store, "rendered/domains/on/one.example/home")
    assert home == "home n1 mx1.fleet.example\n"
    assert "proxy_maybe=y host=mx1.fleet.example\n" in (show(store, "rendered/domains/on/one.example/passwd") or "")
    assert show(store, "rendered/nodes") == "n1 mx1.fleet.example -\nn2 mx2.fleet.example -\n"
    # Errors: a project token may not choose, an unknown or address-less node is no home.
    store.execute("link-domain", ADMIN, {"domain": "five.example", "project_id": A})
    assert err(store, "enable-email", PROJECT_A, {"domain": "five.example", "node": "n1"}).code == "admin_required"
    assert err(store, "enable-email", ADMIN, {"domain": "five.example", "node": "relay"}).code == "node_not_usable"
    assert err(store, "enable-email", ADMIN, {"domain": "five.example", "node": "nope"}).code == "node_not_usable"
    # add-domain (admin) places too; disable-email lets go of the home.
    assert store.execute("add-domain", ADMIN, {"domain": "six.example", "project_id": A}).result["home"] == "n2"
    assert store.execute("disable-email", ADMIN, {"domain": "six.example"}).result["home"] is None
    assert show(store, "rendered/domains/si/six.example/home") is None


def test_node_addresses_are_checked_and_unique(store: Store) -> None:
    added = store.execute("add-node", ADMIN, {"name": "v6", "address": "2001:DB8::0:1"}).result
    assert added["address"] == "2001:db8::1"
    store.execute("add-node", ADMIN, {"name": "host", "address": "MX.Example.NET"})
    assert store.snapshot.nodes.nodes["host"].address == "mx.example.net"
    assert err(store, "add-node", ADMIN, {"name": "dup", "address": "mx.example.net"}).code == "address_in_use"
    for bad in ("mx..example", "-mx.example.net", "10.0.0.999", "fe80::1%eth0", "mx.example.net:25", "a b.example"):
        assert err(store, "add-node", ADMIN, {"name": "bad", "address": bad}).code == "invalid_address", bad
    domain(store, "v6.example", node="v6")
    store.execute("add-user", PROJECT_A, {"email": "info@v6.example", "password": PASSWORD})
    assert "host=2001:db8::1\n" in (show(store, "rendered/domains/v6/v6.example/passwd") or "x\n")


def test_set_node_address_renders_the_homed_domains_again(store: Store) -> None:
    nodes(store, "n1", "n2", addressed=False)
    assert err(store, "move-domain", ADMIN, {"domain": "x.example", "node": "n1"}).code == "domain_not_found"
    store.execute("set-node-address", ADMIN, {"name": "n1", "address": "old.fleet.example"})
    domain(store, "x.example")
    store.execute("add-user", PROJECT_A, {"email": "info@x.example", "password": PASSWORD})
    out = store.execute("set-node-address", ADMIN, {"name": "n1", "address": "new.fleet.example"}).result
    assert out["commit"] and out["address"] == "new.fleet.example"
    assert show(store, "rendered/domains/x./x.example/home") == "home n1 new.fleet.example\n"
    assert "host=new.fleet.example\n" in (show(store, "rendered/domains/x./x.example/passwd") or "")
    assert (
        store.execute("set-node-address", ADMIN, {"name": "n1", "address": "new.fleet.example"}).result["commit"]
        is None
    )
    assert err(store, "set-node-address", ADMIN, {"name": "n1", "address": None}).code == "node_in_use"
    assert err(store, "remove-node", ADMIN, {"name": "n1"}).code == "node_in_use"
    assert (
        err(store, "set-node-address", ADMIN, {"name": "n2", "address": "new.fleet.example"}).code == "address_in_use"
    )
    assert err(store, "set-node-address", ADMIN, {"name": "zz", "address": "z.fleet.example"}).code == "node_not_found"
    assert (
        err(store, "set-node-address", PROJECT_A, {"name": "n2", "address": "z.fleet.example"}).code == "admin_required"
    )
    store.execute("remove-node", ADMIN, {"name": "n2"})  # home to nothing: it may go


# --- move-domain -------------------------------------------------------------------------------


def test_move_domain_switches_on_the_targets_report_and_ends_on_the_old_homes(store: Store) -> None:
    nodes(store, "n1", "n2", "n3")
    domain(store, "m.example", node="n1")
    store.execute("add-user", PROJECT_A, {"email": "info@m.example", "password": PASSWORD})
    out = store.execute("move-domain", ADMIN, {"domain": "m.example", "node": "n2"}).result
    assert (out["domain"], out["from"], out["to"]) == ("m.example", "n1", "n2") and out["commit"]
    assert (listed(store, "m.example")["home"], listed(store, "m.example")["moving_to"]) == ("n1", "n2")
    assert show(store, "rendered/moves") == "m.example n1 n2 -\n"
    assert show(store, "rendered/domains/m./m.example/home") == "home n1 mx1.fleet.example\nmoving_to n2\n"
    # Again: nothing; elsewhere: refused while it runs; the home: called off.
    assert store.execute("move-domain", ADMIN, {"domain": "m.example", "node": "n2"}).result["commit"] is None
    assert err(store, "move-domain", ADMIN, {"domain": "m.example", "node": "n3"}).code == "move_in_progress"
    assert err(store, "remove-node", ADMIN, {"name": "n2"}).code == "node_in_use"
    # A report from a node the move does not name changes nothing; the target's switches the home.
    assert report(store, "n3", ("m.example", "copied")) == []
    assert report(store, "n1", ("m.example", "drained")) == []
    switched = report(store, "n2", ("m.example", "copied"))
    assert len(switched) == 1
    assert (listed(store, "m.example")["home"], listed(store, "m.example")["moving_to"]) == ("n2", None)
    assert show(store, "rendered/moves") == "m.example n2 - n1\n"
    assert "host=mx2.fleet.example\n" in (show(store, "rendered/domains/m./m.example/passwd") or "")
    message = commit_message(store.git.path)
    assert message.startswith("switch-home m.example\n") and "\nActor: node:n2\n" in message
    assert report(store, "n2", ("m.example", "copied")) == []  # said again: nothing more
    # The old home reports it handed over what it held: the move is over.
    assert len(report(store, "n1", ("m.example", "drained"))) == 1
    assert show(store, "rendered/moves") is None
    assert store.snapshot.moves == {}
    # To the current home: commit null; unknown or address-less nodes: node_not_usable.
    assert store.execute("move-domain", ADMIN, {"domain": "m.example", "node": "n2"}).result["commit"] is None
    nodes(store, "relay", addressed=False)
    for node in ("relay", "nope"):
        assert err(store, "move-domain", ADMIN, {"domain": "m.example", "node": node}).code == "node_not_usable"
    assert err(store, "move-domain", PROJECT_A, {"domain": "m.example", "node": "n1"}).code == "admin_required"


def test_a_move_called_off_and_a_domain_placed_before_the_fleet(store: Store) -> None:
    nodes(store, "old", addressed=False)
    domain(store, "early.example")  # no addressed node yet: no home
    store.execute("set-node-address", ADMIN, {"name": "old", "address": "mx0.fleet.example"})
    nodes(store, "n1", "n2")
    assert listed(store, "early.example")["home"] is None
    placed = store.execute("move-domain", ADMIN, {"domain": "early.example", "node": "old"}).result
    assert placed["from"] is None and placed["commit"]
    assert listed(store, "early.example")["home"] == "old"  # at once: its mail is where it always was
    store.execute("move-domain", ADMIN, {"domain": "early.example", "node": "n1"})
    back = store.execute("move-domain", ADMIN, {"domain": "early.example", "node": "old"}).result
    assert back["commit"] and listed(store, "early.example")["moving_to"] is None  # called off


# --- the nodes' certificates and credentials ------------------------------------------------------


def test_a_reported_certificate_is_committed_once_and_published(store: Store) -> None:
    nodes(store, "n1")
    pem = certificate("n1", "10.0.0.1")
    body = parse_report({"status": "ok", "tls_certificate": pem.replace("\n", "\r\n")})
    made = fleet.apply_report(store, "n1", body)
    assert len(made) == 1 and fleet.apply_report(store, "n1", body) == []
    fp = certificate_fingerprint(pem)
    assert show(store, "rendered/nodes") == f"n1 mx1.fleet.example {fp}\n"
    assert show(store, "rendered/nodes.pem") == pem
    assert store.execute("list-nodes", ADMIN, {}).result["nodes"][0]["tls_fingerprint"] == fp
    with pytest.raises(MailstateError) as info:
        parse_report(
            {"status": "ok", "tls_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}
        )
    assert info.value.code == "invalid_certificate"


def test_doveadm_passwords_are_per_node_granted_by_moves_and_rotate(store: Store, tmp_path: Path) -> None:
    nodes(store, "n1", "n2", "n3")
    key = fleet.fleet_key(tmp_path)
    assert key == fleet.fleet_key(tmp_path) and (tmp_path / "fleet_key").stat().st_mode & 0o077 == 0
    snap = store.snapshot
    own = {n: fleet.credentials(key, snap, n) for n in ("n1", "n2", "n3")}
    assert len({c["doveadm_password"] for c in own.values()}) == 3
    assert all(c["peers"] == {} for c in own.values())  # no move: no peer's password
    domain(store, "g.example", node="n1")
    store.execute("move-domain", ADMIN, {"domain": "g.example", "node": "n3"})
    during = fleet.credentials(key, store.snapshot, "n3")
    assert during["peers"] == {
        "n1": {"address": "mx1.fleet.example", "doveadm_password": own["n1"]["doveadm_password"]}
    }
    assert fleet.credentials(key, store.snapshot, "n2")["peers"] == {}
    report(store, "n3", ("g.example", "copied"))
    assert set(fleet.credentials(key, store.snapshot, "n1")["peers"]) == {"n3"}  # the old home hands over
    # A new sync key, or a node that goes, gives new passwords.
    store.execute("rotate-node-key", ADMIN, {"name": "n2"})
    assert fleet.credentials(key, store.snapshot, "n2")["doveadm_password"] != own["n2"]["doveadm_password"]
    store.execute("add-node", ADMIN, {"name": "n9", "address": "mx9.fleet.example"})
    store.execute("remove-node", ADMIN, {"name": "n9"})
    store.execute("add-node", ADMIN, {"name": "n4", "address": "mx4.fleet.example"})
    assert fleet.credentials(key, store.snapshot, "n1")["doveadm_password"] != own["n1"]["doveadm_password"]


# --- dns-records --------------------------------------------------------------------------------


def test_dns_records_list_an_mx_for_every_addressed_node_without_mx_hosts(store: Store) -> None:
    domain(store, "d.example")
    assert err(store, "dns-records", PROJECT_A, {"domain": "d.example"}).code == "dns_not_configured"
    nodes(store, "b", "a")
    store.execute("add-node", ADMIN, {"name": "ip", "address": "192.0.2.7"})
    records = store.execute("dns-records", PROJECT_A, {"domain": "d.example"}).result["records"]
    mx = [r["value"] for r in records if r["type"] == "MX"]
    assert mx == ["10 mx2.fleet.example", "20 mx1.fleet.example"]  # by node name (a, b); an IP gets no MX


# --- rules across files, loading -----------------------------------------------------------------


@pytest.mark.e2e  # reopening the store verifies its statement with ssh-keygen
def test_placement_survives_a_restart_and_checks_pass(store: Store, data_dir: Any) -> None:
    nodes(store, "n1", "n2")
    domain(store, "r.example", node="n2")
    store.execute("add-user", PROJECT_A, {"email": "info@r.example", "password": PASSWORD})
    again = open_store(data_dir.root)  # a cold start from git, then one from the parse cache
    assert dict(again.snapshot.home_boxes) == {"n2": 1} and dict(again.snapshot.homes) == {
        "n2": frozenset({"r.example"})
    }
    again = open_store(data_dir.root)
    assert dict(again.snapshot.home_boxes) == {"n2": 1}
    assert check_commit(again.git, again.head) == []
    snap = again.snapshot
    assert compile_state(snap.settings, snap.domains.values(), nodes=snap.nodes)[
        "rendered/domains/r./r.example/home"
    ] == (b"home n2 mx2.fleet.example\n")
    missing = placement.nodes_problems(snap.nodes.model_copy(update={"nodes": {}}), snap.homes, snap.moves)
    assert missing == ["nodes.yaml: node n2 is missing but it is home of r.example"]


# --- placing a state made before its nodes had addresses ---------------------------------------


def test_place_gives_every_unplaced_domain_a_home_in_one_signed_commit(store: Store, data_dir: DataDir) -> None:
    nodes(store, "n1", "n2", addressed=False)
    for name, users in (("big.example", 3), ("mid.example", 2), ("small.example", 1), ("off.example", 0)):
        domain(store, name)
        for i in range(users):
            store.execute("add-user", PROJECT_A, {"email": f"u{i}@{name}", "password": PASSWORD})
    store.execute("disable-email", PROJECT_A, {"domain": "off.example"})
    with pytest.raises(MailstateError) as exc:  # no node can be a home yet: nothing is committed
        place_store(store)
    assert exc.value.code == "node_not_usable"
    before = commit_count(data_dir.repo)
    for i, name in enumerate(("n1", "n2"), 1):
        store.execute("set-node-address", ADMIN, {"name": name, "address": f"mx{i}.fleet.example"})
    with pytest.raises(MailstateError) as exc:
        place_store(store, "nope")
    assert exc.value.code == "node_not_found" or exc.value.code == "node_not_usable"
    assert commit_count(data_dir.repo) == before + 2

    result = place_store(store)
    # Each on the node with the fewest mailboxes so far: 3 on n1, then 2 and 1 on n2.
    assert result["placed"] == {"big.example": "n1", "mid.example": "n2", "small.example": "n2"}
    assert commit_count(data_dir.repo) == before + 3 and result["commit"] == store.snapshot.commit
    assert store.snapshot.domains["off.example"].home is None  # no email, no home
    assert {n: listed(store, n)["home"] for n in ("big.example", "mid.example")} == {
        "big.example": "n1",
        "mid.example": "n2",
    }
    assert check_commit(store.git, store.snapshot.commit) == []
    assert show(store, "rendered/domains/bi/big.example/home") == "home n1 mx1.fleet.example\n"
    assert place_store(store) == {"placed": {}, "commit": None}  # idempotent
    assert commit_count(data_dir.repo) == before + 3


@pytest.mark.e2e  # the command opens the data dir's store: ssh-keygen checks its signing key
def test_mailstate_place_on_the_command_line(data_dir: DataDir, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(data_dir.root)
    store.execute("add-node", ADMIN, {"name": "n1", "address": "mx1.fleet.example"})
    store.execute("add-domain", ADMIN, {"domain": "a.example"})  # placed at once: n1 is addressed
    assert main(["place", "--data", str(data_dir.root)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["place", "--data", str(data_dir.root), "--node", "ghost"]) != 0
    assert "ghost" in capsys.readouterr().err
