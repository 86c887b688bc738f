"""Sending limits in a fleet, end to end: one count per mailbox, kept by its home.

Three nodes in network namespaces (tests/helpers/fleetworld.py), each with its own Postfix,
Dovecot and the bundle's policy service (`pi_pull.py policy`). A submission is authenticated and
sent by the node the client reached; that node's policy service asks the home's (mutual TLS on
the fleet policy port, the home pinned by its published fingerprint) and answers Postfix with the
home's verdict (pi-pull/pipull/policyfleet.py). Nothing is faked: real submissions on 587 with
STARTTLS and SASL, real TLS between the namespaces.

Homes: alpha.test on n1 (limited: 3 recipients an hour), beta.test on n2.
"""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fleetworld import PASSWORD, World, fleet_world
from tests.helpers.netns import FleetNode, make_node_certificate

pytestmark = pytest.mark.e2e

INFO, CAROL, DAVE, BOB = "info@alpha.test", "carol@alpha.test", "dave@alpha.test", "bob@beta.test"
LIMIT = 3
POLICY_PORT = 10041  # the bundle's default [fleet] policy_port


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with fleet_world(["n1", "n2", "n3"], tmp_path_factory.mktemp("fleet-sending")) as w:
        for domain, node in (("alpha.test", "n1"), ("beta.test", "n2")):
            w.call("link-domain", {"domain": domain, "project_id": 42}, 201)
            assert w.call("enable-email", {"domain": domain, "node": node})["home"] == node
        for email in (INFO, CAROL, DAVE, BOB):
            w.call("add-user", {"email": email, "password": PASSWORD}, 201)
        # The default auto_suspend_factor (3) applies: past 9 recipients tried in the hour, suspended.
        w.call("set-limits", {"domain": "alpha.test", "send_per_hour": LIMIT})
        w.settle()
        for node in w.nodes.values():
            node.wait_ports(POLICY_PORT)  # the listener opens once the fleet's certificates are in
        yield w


def restart_policy(node: FleetNode) -> None:
    node.start_policy()
    node.wait_ports(POLICY_PORT)


def rcpts(node: FleetNode, user: str, to: list[str], subject: str = "burst") -> list[tuple[int, str]]:
    """A submission on 587 (STARTTLS, SASL): each RCPT TO's answer, then the message if one was taken."""
    with contextlib.closing(smtplib.SMTP(node.address, 587, timeout=30)) as s:
        s.ehlo("client.test")
        s.starttls(context=node.tls_context())
        s.ehlo("client.test")
        s.login(user, PASSWORD)
        code, msg = s.mail(user)
        assert code == 250, (code, msg)
        answers = []
        for address in to:
            code, msg = s.rcpt(address)
            answers.append((code, msg.decode(errors="replace")))
        if any(code == 250 for code, _ in answers):
            code, msg = s.data(f"From: {user}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
            assert code == 250, (code, msg)
        else:
            s.rset()
        s.quit()
    return answers


def sent_row(world: World, email: str) -> dict[str, object]:
    users = world.call("list-users", {"domain": email.split("@")[1]})["users"]
    return next(u for u in users if u["email"] == email)


def test_the_limit_holds_across_the_fleet_wherever_the_mailbox_submits(world: World) -> None:
    n1, n2, n3 = (world.nodes[n] for n in ("n1", "n2", "n3"))
    # One recipient on each node: n2 and n3 are not alpha.test's home, n1 is. 3 of 3.
    for node in (n2, n3, n1):
        assert rcpts(node, INFO, [DAVE], f"one-via-{node.name}") == [(250, "2.1.5 Ok")]
    # The fourth recipient is refused wherever it is submitted: the home holds the one count.
    for node in (n2, n3, n1):
        ((code, msg),) = rcpts(node, INFO, ["someone@internet.test"])
        assert code == 450 and "4.7.1" in msg and f"{LIMIT} recipient(s) an hour" in msg, (node.name, code, msg)
    # The non-home nodes asked the home and counted nothing themselves.
    for node in (n2, n3):
        log = node.policy_log()
        assert f"{INFO}: 450 4.7.1" in log and f"(the home {n1.address})" in log, log[-2000:]
        assert "counted on this node" not in log, log[-2000:]
    # The home's figures are what list-users shows (every node reports; the server sums them).
    world.tick()
    sent = sent_row(world, INFO)["sent"]
    assert isinstance(sent, dict), sent
    assert (sent["recipients_hour"], sent["messages_hour"], sent["refused_hour"]) == (LIMIT, LIMIT, 3), sent
    assert sent_row(world, INFO)["sending"] == "limited"
    # Another mailbox of the domain has its own count, on every node.
    assert rcpts(n3, CAROL, [DAVE]) == [(250, "2.1.5 Ok")]


def test_a_suspension_by_the_home_reaches_every_node(world: World) -> None:
    n1, n2, n3 = (world.nodes[n] for n in ("n1", "n2", "n3"))
    # dave keeps trying on n2 and n3: the home counts every try, and past 3 x 3 it suspends him
    # by itself (the state does not know yet), so the other nodes answer 554 from the home.
    codes = [code for code, _ in rcpts(n2, DAVE, [f"x{i}@internet.test" for i in range(5)])]
    codes += [code for code, _ in rcpts(n3, DAVE, [f"y{i}@internet.test" for i in range(5)])]
    assert codes == [250] * 3 + [450] * 6 + [554], codes
    code, msg = rcpts(n2, DAVE, ["z@internet.test"])[0]
    assert code == 554 and "5.7.1" in msg and "suspended" in msg.lower(), (code, msg)
    # The home reports it; the server records the suspension in the state.
    world.settle()
    row = sent_row(world, DAVE)
    assert row["sending"] == "suspended" and str(row["sending_reason"]).startswith("automatic:"), row
    assert rcpts(n1, DAVE, ["z@internet.test"])[0][0] == 554
    assert "counted on this node" not in n2.policy_log() + n3.policy_log()


def test_a_suspended_mailbox_gets_a_5xx_on_a_non_home_node(world: World) -> None:
    n3 = world.nodes["n3"]
    world.call("suspend-sending", {"email": BOB, "reason": "password leaked"})
    world.settle()
    code, msg = rcpts(n3, BOB, ["someone@internet.test"])[0]  # beta.test's home is n2
    assert code == 554 and "5.7.1" in msg and "suspended" in msg.lower(), (code, msg)
    world.call("resume-sending", {"email": BOB})
    world.settle()
    assert rcpts(n3, BOB, [INFO], "bob-after-resume") == [(250, "2.1.5 Ok")]


def _client(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _ask(node: FleetNode, ctx: ssl.SSLContext, login: str) -> bytes:
    """One policy request to the node's fleet listener; what comes back (b"" when it closed)."""
    request = f"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username={login}\ninstance=h.1\n\n"
    with socket.create_connection((node.address, POLICY_PORT), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(request.encode())
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def test_hostile_and_unknown_peers_are_refused(world: World, tmp_path: Path) -> None:
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    # A node of the fleet (n2's own certificate and key) gets an answer: the listener is there.
    assert _ask(n1, _client(n2.tls_cert, n2.tls_key), CAROL) == b"action=DUNNO\n\n"
    # No client certificate, or one the signed state does not list: no answer at all.
    intruder, intruder_key = tmp_path / "intruder.pem", tmp_path / "intruder.key"
    make_node_certificate(intruder, intruder_key, "intruder", "10.0.0.99")
    assert _ask(n1, _client(), CAROL) == b""
    assert _ask(n1, _client(intruder, intruder_key), INFO) == b""
    refused = [
        line for line in n1.policy_log().splitlines() if f"refused a fleet connection from {world.net.gateway}:" in line
    ]
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in line for line in refused), refused
    assert any("CERTIFICATE_VERIFY_FAILED" in line for line in refused), refused
    # A stand-in on n1's address and port with a certificate the state does not publish for n1
    # is not believed: n2 pins n1's published fingerprint, and counts on its own.
    n1.stop_policy()
    cert, key = tmp_path / "fake.pem", tmp_path / "fake.key"
    make_node_certificate(cert, key, "fake", n1.address)
    script = (
        "import socket, ssl\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        f"ctx.load_cert_chain({str(cert)!r}, {str(key)!r})\n"
        f"s = socket.create_server(('0.0.0.0', {POLICY_PORT}))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    try:\n"
        "        t = ctx.wrap_socket(c, server_side=True)\n"
        "        t.recv(4096)\n"
        "        t.sendall(b'action=DUNNO\\n\\n')\n"
        "    except Exception:\n"
        "        pass\n"
    )
    assert n1.holder is not None
    proc = subprocess.Popen(
        ["nsenter", "-t", str(n1.holder.pid), "-n", "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        before = len(n2.policy_log())
        started = time.monotonic()
        assert rcpts(n2, CAROL, [DAVE], "while-n1-is-impersonated")[0][0] == 250
        assert time.monotonic() - started < 10
        log = n2.policy_log()[before:]
        assert "not the one the signed state publishes" in log and "counted on this node" in log, log
    finally:
        proc.terminate()
        proc.wait()
        restart_policy(n1)


def test_an_unreachable_home_is_counted_locally_and_logged(world: World) -> None:
    n1, n3 = world.nodes["n1"], world.nodes["n3"]
    n1.stop_policy()
    try:
        before = len(n3.policy_log())
        started = time.monotonic()
        assert rcpts(n3, CAROL, [DAVE], "while-n1-policy-is-down") == [(250, "2.1.5 Ok")]
        assert time.monotonic() - started < 10  # Postfix is never held up by a dead home
        log = n3.policy_log()[before:]
        assert f"{CAROL}: the home {n1.address} did not answer" in log and "counted on this node" in log, log
    finally:
        restart_policy(n1)
    # What n2 and n3 counted on their own is in their reports; the server adds it to the home's:
    # one recipient at the home, one on n2 (the stand-in), one on n3.
    world.tick()
    sent = sent_row(world, CAROL)["sent"]
    assert isinstance(sent, dict) and (sent["recipients_hour"], sent["messages_hour"]) == (3, 3), sent


def test_a_stalled_home_never_holds_postfix_up(world: World) -> None:
    # n2 (beta.test's home) takes connections but answers nothing: its policy service is stopped
    # (SIGSTOP), as a hung process or a black hole would. n3 waits [fleet] policy_timeout (1 s)
    # at most, then counts bob itself.
    n2, n3 = world.nodes["n2"], world.nodes["n3"]
    assert n2.policy is not None
    n2.policy.send_signal(signal.SIGSTOP)
    try:
        before = len(n3.policy_log())
        started = time.monotonic()
        assert rcpts(n3, BOB, [INFO], "while-n2-policy-hangs") == [(250, "2.1.5 Ok")]
        took = time.monotonic() - started
        log = n3.policy_log()[before:]
        assert f"{BOB}: the home {n2.address} did not answer" in log and "counted on this node" in log, log
        assert "timed out" in log, log
        assert took < 8, took  # one timeout, then the home is not asked again for a while
    finally:
        n2.policy.send_signal(signal.SIGCONT)
