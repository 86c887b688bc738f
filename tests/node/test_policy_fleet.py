"""The policy service in a fleet (pi-pull/pipull/policyfleet.py): a node that is not a login's
home asks the home, over real mutual TLS on loopback, with real certificates (openssl) and the
fleet's trust files as the tick writes them (tls_policy, ccerts, peers.pem) and the live
release's proxy.imap. Both nodes' policies run in this process, each with its own SQLite counts;
the clock is the seam for "a home that failed is not asked again at once". Real Postfix and
three nodes in network namespaces: tests/e2e/test_fleet_sending_e2e.py."""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.mailnode import free_ports
from tests.helpers.netns import make_node_certificate

LOGIN = "info@example.com"
REQUEST = {"request": "smtpd_access_policy", "sasl_username": LOGIN, "sasl_method": "plain"}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Node:
    cfg: Any
    policy: Any
    cert: Path
    key: Path
    fingerprint: str


def _fp(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def colon(fp: str) -> str:
    return ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fleet(pipull: ModuleType, tmp_path: Path) -> dict[str, Any]:
    """Two nodes: `home` (example.com's home, listening) and `other` (its proxy.imap names the home)."""
    port = free_ports(1)[0]
    handler = Records()
    log = logging.getLogger("test-policy-fleet")
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    nodes: dict[str, Node] = {}
    for name in ("home", "other", "stranger"):
        d = tmp_path / name
        (d / "policy" / "domains").mkdir(parents=True)
        (d / "policy" / "domains" / "example.com").write_text("@limits 2 default\n")
        (d / "fleet").mkdir()
        cert, key = d / "tls" / "cert.pem", d / "tls" / "key.pem"
        make_node_certificate(cert, key, name, "127.0.0.1")
        cfg = pipull.config.Config(remote_url="none", root=str(d), node_name=name)
        cfg.policy_db = str(d / "policy" / "counts.sqlite")
        cfg.fleet_dir = str(d / "fleet")
        cfg.fleet_tls_cert, cfg.fleet_tls_key = str(cert), str(key)
        cfg.fleet_policy_port = port
        cfg.fleet_policy_timeout = 2.0
        nodes[name] = Node(cfg, None, cert, key, _fp(cert))
    # The fleet is home and other; stranger's certificate is in peers.pem (a CA could have issued
    # one like it) but rendered/nodes does not list it: ccerts decides.
    for name in ("home", "other"):
        fleet_dir = Path(nodes[name].cfg.fleet_dir)
        (fleet_dir / "ccerts").write_text("".join(f"{colon(nodes[n].fingerprint)} OK\n" for n in ("home", "other")))
        (fleet_dir / "peers.pem").write_text("".join(nodes[n].cert.read_text() for n in ("home", "other", "stranger")))
    other = Path(nodes["other"].cfg.root)
    (other / "current" / "dovecot").mkdir(parents=True)
    (other / "current" / "dovecot" / "proxy.imap").write_text(
        "example.com:::::::nopassword=y proxy=y host=127.0.0.1\nzzz.org:::::::nopassword=y proxy=y host=10.9.9.9\n"
    )
    (other / "fleet" / "tls_policy").write_text(
        f"[127.0.0.1]:2525 fingerprint match={colon(nodes['home'].fingerprint)}\n"
    )
    p = pipull.policy
    clock = Clock()
    for node in nodes.values():
        view = pipull.policyfleet.FleetView(node.cfg)
        node.policy = p.open_policy(node.cfg, log, view)
        node.policy.fleet.clock = clock
    home = nodes["home"]
    listener = pipull.policyfleet.FleetListener(
        home.cfg,
        pipull.policyfleet.FleetView(home.cfg),
        lambda rfile, wfile: p.serve_requests(home.policy, rfile, wfile, True),
        log,
    )
    listener.refresh()
    assert listener.server is not None
    yield {"nodes": nodes, "log": handler.lines, "clock": clock, "listener": listener, "port": port}
    listener.close()
    for node in nodes.values():
        node.policy.counter.close()


def rcpt(policy: Any, conn: dict[str, Any], instance: str) -> str:
    return str(policy.answer({**REQUEST, "protocol_state": "RCPT", "instance": instance}, conn))


def end(policy: Any, conn: dict[str, Any], instance: str, count: int) -> str:
    attrs = {**REQUEST, "protocol_state": "END-OF-MESSAGE", "instance": instance, "recipient_count": str(count)}
    return str(policy.answer(attrs, conn))


@pytest.mark.e2e  # a TLS listener and openssl
def test_the_home_holds_the_one_count(fleet: dict[str, Any]) -> None:
    home, other = fleet["nodes"]["home"].policy, fleet["nodes"]["other"].policy
    conn: dict[str, Any] = {}
    # Two messages through the other node: the home counts them.
    for i in range(2):
        assert rcpt(other, conn, f"o.{i}") == "DUNNO"
        assert end(other, conn, f"o.{i}", 1) == "DUNNO"
    # The limit (2 an hour) is reached at the home, whichever node asks.
    local: dict[str, Any] = {}
    assert rcpt(home, local, "h.1").startswith("450 4.7.1")
    answer = rcpt(other, conn, "o.3")
    assert answer.startswith("450 4.7.1") and "2 recipient(s) an hour" in answer
    # The other node counted nothing of its own; the home has it all.
    assert fleet["nodes"]["other"].policy.counter.report_entries(other.files) == []
    (entry,) = home.counter.report_entries(home.files)
    assert (entry["recipients_hour"], entry["messages_hour"], entry["refused_hour"]) == (2, 2, 2)
    assert not [line for line in fleet["log"] if "counted on this node" in line]
    other.done(conn)
    assert "homes" not in conn  # the connection to the home is closed with Postfix's


@pytest.mark.e2e  # a TLS listener and openssl
def test_a_domain_homed_here_or_nowhere_is_counted_here(fleet: dict[str, Any]) -> None:
    other = fleet["nodes"]["other"].policy
    conn: dict[str, Any] = {}
    attrs = {**REQUEST, "sasl_username": "a@local.org", "protocol_state": "RCPT", "instance": "x"}
    assert other.answer(attrs, conn) == "DUNNO"
    assert "homes" not in conn


@pytest.mark.e2e  # a TLS listener and openssl
def test_a_home_with_another_certificate_is_not_believed(fleet: dict[str, Any]) -> None:
    other_node = fleet["nodes"]["other"]
    tls_policy = Path(other_node.cfg.fleet_dir) / "tls_policy"
    tls_policy.write_text(f"[127.0.0.1]:2525 fingerprint match={colon(fleet['nodes']['stranger'].fingerprint)}\n")
    conn: dict[str, Any] = {}
    assert rcpt(other_node.policy, conn, "o.1") == "DUNNO"
    assert end(other_node.policy, conn, "o.1", 1) == "DUNNO"
    (warning, *_) = [line for line in fleet["log"] if "did not answer" in line]
    assert "not the one the signed state publishes" in warning and "counted on this node" in warning
    (entry,) = other_node.policy.counter.report_entries(other_node.policy.files)
    assert entry["recipients_hour"] == 1  # counted here, and reported: the server sums the nodes
    assert fleet["nodes"]["home"].policy.counter.report_entries(fleet["nodes"]["home"].policy.files) == []


@pytest.mark.e2e  # a TLS listener and openssl
def test_a_dead_home_is_counted_here_and_not_asked_again_at_once(fleet: dict[str, Any]) -> None:
    fleet["listener"].close()
    other = fleet["nodes"]["other"].policy
    conn: dict[str, Any] = {}
    for i in range(3):
        rcpt(other, conn, f"o.{i}")
        end(other, conn, f"o.{i}", 1)
    refused = rcpt(other, conn, "o.9")
    assert refused.startswith("450 4.7.1"), refused  # the limit still holds, on this node's count
    warnings = [line for line in fleet["log"] if "did not answer" in line]
    assert "refused" in warnings[0].lower() and all("counted on this node" in w for w in warnings), warnings
    assert all("less than 30 s ago" in w for w in warnings[1:]) and len(warnings) == 7, warnings
    # Once RETRY_AFTER passed, the home is asked again (and answers: it is back).
    fleet["listener"].refresh()
    fleet["clock"].t += 31
    assert rcpt(other, conn, "o.10") == "DUNNO"  # the home's count is empty
    assert len([line for line in fleet["log"] if "did not answer" in line]) == 7


def _raw_ask(port: int, cert: Path | None, key: Path | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    request = "".join(f"{k}={v}\n" for k, v in {**REQUEST, "protocol_state": "RCPT", "instance": "r"}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall((request + "\n").encode())
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.e2e  # a TLS listener and openssl
def test_only_the_fleets_nodes_are_answered(fleet: dict[str, Any]) -> None:
    nodes, port = fleet["nodes"], fleet["port"]
    assert _raw_ask(port, nodes["other"].cert, nodes["other"].key) == b"action=DUNNO\n\n"
    # A certificate that verifies (it is in peers.pem) but is not a node of rendered/nodes.
    assert _raw_ask(port, nodes["stranger"].cert, nodes["stranger"].key) == b""
    assert any("its certificate is not a node's" in line for line in fleet["log"])
    # No certificate at all.
    assert _raw_ask(port, None, None) == b""
    assert len([line for line in fleet["log"] if "refused a fleet connection from 127.0.0.1" in line]) == 2


@pytest.mark.e2e  # a TLS listener and openssl
def test_a_forwarded_request_is_answered_where_it_arrived(fleet: dict[str, Any]) -> None:
    # The home, too, believes another node is example.com's home (a move under way, applied a
    # moment apart): a request it got from a node is still answered there, never passed on.
    home = fleet["nodes"]["home"]
    (Path(home.cfg.root) / "current" / "dovecot").mkdir(parents=True)
    (Path(home.cfg.root) / "current" / "dovecot" / "proxy.imap").write_text(
        "example.com:::::::nopassword=y proxy=y host=127.0.0.1\n"
    )
    other = fleet["nodes"]["other"].policy
    conn: dict[str, Any] = {}
    assert rcpt(other, conn, "o.1") == "DUNNO"
    assert end(other, conn, "o.1", 1) == "DUNNO"
    (entry,) = home.policy.counter.report_entries(home.policy.files)
    assert entry["recipients_hour"] == 1


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        ("parse_proxy_passdb", b"a.org:::::::nopassword=y proxy=y host=10.0.0.1\njunk\n", {"a.org": "10.0.0.1"}),
        (
            "parse_tls_policy",
            b"[10.0.0.1]:2525 fingerprint match=" + b"AB:" * 31 + b"AB\nx y\n",
            {"10.0.0.1": "ab" * 32},
        ),
        ("parse_tls_policy", b"[10.0.0.1]:2525 fingerprint match=AB:CD\n", {}),
        ("parse_ccerts", b"AB:" * 31 + b"AB OK\nAB:CD OK\n" + b"CD:" * 31 + b"CD REJECT\n", frozenset({"ab" * 32})),
    ],
)
def test_the_trust_files_are_read_strictly(pipull: ModuleType, parse: str, text: bytes, expected: object) -> None:
    assert getattr(pipull.policyfleet, parse)(text) == expected


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("policy_port = 0", "policy_port must be a port number"),
        ("policy_port = 65536", "policy_port must be a port number"),
        ("policy_timeout = 0", "policy_timeout must be 0.1 to 30 seconds"),
        ("policy_timeout = 120", "policy_timeout must be 0.1 to 30 seconds"),
    ],
)
def test_bad_fleet_policy_settings_are_refused(pipull: ModuleType, tmp_path: Path, line: str, words: str) -> None:
    ini = tmp_path / "c.ini"
    mail = "mail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    ini.write_text(f"[remote]\nurl = /x\n[node]\nallowed_signers = s\n[paths]\n{mail}[fleet]\n{line}\n")
    with pytest.raises(pipull.errors.ConfigError, match=words):
        pipull.config.load_config(str(ini))


@pytest.mark.e2e  # openssl and a TLS listener
def test_the_listener_runs_only_while_another_node_could_ask(pipull: ModuleType, fleet: dict[str, Any]) -> None:
    home = fleet["nodes"]["home"]
    fleet["listener"].close()
    ccerts = Path(home.cfg.fleet_dir) / "ccerts"
    ccerts.write_text(f"{colon(home.fingerprint)} OK\n")  # a fleet of this node alone

    def listener() -> Any:
        view = pipull.policyfleet.FleetView(home.cfg)
        return pipull.policyfleet.FleetListener(
            home.cfg, view, lambda r, w: None, logging.getLogger("test-policy-fleet")
        )

    alone = listener()
    alone.refresh()
    assert alone.server is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fleet["port"]), timeout=2).close()
    # Another node joins, but this node's key is unreadable: said once, not every refresh.
    ccerts.write_text(f"{colon(home.fingerprint)} OK\n{colon(fleet['nodes']['other'].fingerprint)} OK\n")
    home.cfg.fleet_tls_key = str(Path(home.cfg.root) / "missing.key")
    broken = listener()
    for _ in range(3):
        broken.refresh()
    assert broken.server is None
    assert len([line for line in fleet["log"] if "cannot listen for the fleet" in line]) == 1
    home.cfg.fleet_tls_key = str(home.key)
    fixed = listener()
    fixed.refresh()
    try:
        assert fixed.server is not None
    finally:
        fixed.close()


@pytest.mark.e2e  # openssl
def test_own_fingerprint_is_the_leafs(pipull: ModuleType, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    make_node_certificate(cert, key, "n", "127.0.0.1")
    other, other_key = tmp_path / "o.pem", tmp_path / "ok.pem"
    make_node_certificate(other, other_key, "o", "127.0.0.1")
    chain = b"junk before\n" + cert.read_bytes() + other.read_bytes()
    assert pipull.policyfleet.own_fingerprint(chain) == _fp(cert)
    assert pipull.policyfleet.own_fingerprint(b"no certificate") is None
