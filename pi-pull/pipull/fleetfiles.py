"""The fleet's rendered files, validated, and what a node derives from them.

What the compiler writes (compiler/render.py) and so all a node accepts:

    rendered/nodes        <name> <address> <sha256 hex|->     the nodes that can be homes, by name
    rendered/nodes.pem    their certificates, one PEM block per line that has a fingerprint, in order
    rendered/moves        <domain> <home> <moving_to|-> <moved_from|->   while domains move
    rendered/replicas     <domain> <home> <replica>           the domains that have a replica
    rendered/domains/<bb>/<domain>/home
                          home <name> <address>               the line of the home in rendered/nodes
                          [moving_to <name>]                  another node of rendered/nodes
                          [moved_from <name>]                 another node of rendered/nodes

A node relays, proxies and syncs to addresses of rendered/nodes only: every `host=` of a
passwd line must be the address of the domain's home there (verify.DomainCheck), and the
Postfix transport and defer lines are derived here from the home fragment, never read from
the repo. Names follow the server's node rule, addresses are host names by the server's domain
rule or IP addresses in canonical form (tests/vectors/fleet_lines.json holds both to one table).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field

from .errors import Refused
from .rules import NODE_NAME_RE, is_domain
from .verify import PRINTABLE_ASCII_RE

NODES_FILE = "rendered/nodes"
NODES_PEM = "rendered/nodes.pem"
MOVES_FILE = "rendered/moves"
REPLICAS_FILE = "rendered/replicas"
HOME = "home"
TRANSPORT_MAP = "fleet_transport"
DEFER_MAP = "fleet_defer"
DERIVED_MAPS = (TRANSPORT_MAP, DEFER_MAP)
# Dovecot's first passdb for IMAP (`<release>/dovecot/proxy.imap`, looked up by domain): a login
# to a domain homed on another node goes there without a check here, and the home checks the
# password, once, where the mail is. Only ever `proxy=y` to another node's address: a line that
# named this node would fail as a proxy loop, never log anyone in.
PROXY_PASSDB = "proxy.imap"
NODE_RE = NODE_NAME_RE  # state/validate.py validate_node_name (vectors: node_names.json)
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_FLEET_BYTES = 1 << 20
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n((?:[A-Za-z0-9+/=]{1,76}\n){1,120})-----END CERTIFICATE-----\n")
# Why a relayed message is refused by a node that is not the domain's home (yet): the sending node
# and this one apply a move's commits a moment apart, and a 4xx makes the sender retry instead of
# passing the message back (which could bounce it between the two).
DEFER_TEXT = "451 4.3.0 This node does not hold this domain's mail (yet); try again later"


def is_address(text: str) -> bool:
    """A node address as the server writes it: a lowercase host name, or an IP in canonical form."""
    if is_domain(text):
        return True
    try:
        return str(ipaddress.ip_address(text)) == text and "%" not in text
    except ValueError:
        return False


@dataclass
class Peer:
    name: str
    address: str
    fingerprint: str | None
    pem: str | None = None


@dataclass
class Fleet:
    """rendered/nodes and rendered/nodes.pem of one commit, validated."""

    peers: dict[str, Peer] = field(default_factory=dict)

    def address_of(self, name: str) -> str | None:
        peer = self.peers.get(name)
        return peer.address if peer else None

    def addresses(self) -> list[str]:
        """What the domains' home fragments are checked against: `<name> <address>` of every node."""
        return [f"{p.name} {p.address}" for p in self.peers.values()]

    def keeps(self, previous: object) -> bool:
        """Whether every home checked against `previous` (a release's addresses()) is still valid: no
        node went or changed its address (one that is new cannot be named by an unchanged home)."""
        return isinstance(previous, list) and set(previous) <= set(self.addresses())

    def digest(self) -> str:
        """What derived files depend on: names, addresses, fingerprints."""
        text = "".join(f"{p.name} {p.address} {p.fingerprint or '-'}\n" for p in self.peers.values())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lines(what: str, data: bytes) -> list[str]:
    if len(data) > MAX_FLEET_BYTES:
        raise Refused(f"{what} is larger than {MAX_FLEET_BYTES} bytes")
    if data and not data.endswith(b"\n"):
        raise Refused(f"{what}: the last line does not end with a newline")
    lines = data.split(b"\n")[:-1] if data else []
    for n, raw in enumerate(lines, 1):
        if not raw or not PRINTABLE_ASCII_RE.fullmatch(raw):
            raise Refused(f"{what}, line {n}: empty, or not printable ASCII")
    return [raw.decode("ascii") for raw in lines]


def parse_fleet(nodes: bytes | None, pem: bytes | None) -> Fleet:
    """Validate rendered/nodes (+ nodes.pem); an absent rendered/nodes is a fleet without homes."""
    fleet = Fleet()
    if nodes is None:
        if pem is not None:
            raise Refused(f"{NODES_PEM} without {NODES_FILE}")
        return fleet
    addresses: set[str] = set()
    for n, line in enumerate(_lines(NODES_FILE, nodes), 1):
        parts = line.split(" ")
        if len(parts) != 3:
            raise Refused(f"{NODES_FILE}, line {n}: expected '<name> <address> <sha256|->'")
        name, address, fp = parts
        if not NODE_RE.fullmatch(name):
            raise Refused(f"{NODES_FILE}, line {n}: {name[:80]!r} is not a node name")
        if fleet.peers and name <= list(fleet.peers)[-1]:
            raise Refused(f"{NODES_FILE}, line {n}: {name} is out of order or listed twice")
        if not is_address(address):
            raise Refused(f"{NODES_FILE}, line {n}: {address[:80]!r} is not a host name or an IP address")
        if address in addresses:
            raise Refused(f"{NODES_FILE}, line {n}: the address {address} is listed twice")
        if fp != "-" and not FINGERPRINT_RE.fullmatch(fp):
            raise Refused(f"{NODES_FILE}, line {n}: {fp[:80]!r} is not a SHA-256 fingerprint (64 lowercase hex) or -")
        addresses.add(address)
        fleet.peers[name] = Peer(name, address, None if fp == "-" else fp)
    _attach_pems(fleet, pem)
    return fleet


def _attach_pems(fleet: Fleet, pem: bytes | None) -> None:
    """Each PEM block of nodes.pem belongs to the next node with a fingerprint, and must hash to it."""
    wanted = [p for p in fleet.peers.values() if p.fingerprint]
    text = (pem or b"").decode("ascii", "replace")
    blocks = list(_PEM.finditer(text))
    if "".join(b.group(0) for b in blocks) != text or len(blocks) != len(wanted):
        raise Refused(f"{NODES_PEM} must hold exactly one PEM certificate per node of {NODES_FILE} with a fingerprint")
    for peer, block in zip(wanted, blocks):
        try:
            der = base64.b64decode("".join(block.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"{NODES_PEM}: the certificate of {peer.name} is not valid base64") from None
        if hashlib.sha256(der).hexdigest() != peer.fingerprint:
            raise Refused(f"{NODES_PEM}: the certificate of {peer.name} does not match its fingerprint")
        peer.pem = block.group(0)


@dataclass(frozen=True)
class Home:
    """A domain's home fragment, validated against the fleet."""

    home: str
    address: str
    moving_to: str | None = None
    moved_from: str | None = None


def parse_home(domain: str, data: bytes, fleet: Fleet) -> Home:
    """Validate `rendered/domains/<bb>/<domain>/home` (Refused naming the file and line)."""
    what = f"home of {domain}"
    lines = _lines(what, data)
    if not lines:
        raise Refused(f"{what}: empty")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "home":
        raise Refused(f"{what}, line 1: expected 'home <node> <address>'")
    name, address = parts[1], parts[2]
    if fleet.address_of(name) is None:
        raise Refused(f"{what}, line 1: {name[:80]!r} is not a node of {NODES_FILE} (only its nodes are homes)")
    if address != fleet.address_of(name):
        raise Refused(f"{what}, line 1: {address[:80]!r} is not the address of {name} in {NODES_FILE}")
    found: dict[str, str] = {}
    for n, line in enumerate(lines[1:], 2):
        parts = line.split(" ")
        order = ("moving_to", "moved_from")
        if len(parts) != 2 or parts[0] not in order or any(order.index(k) >= order.index(parts[0]) for k in found):
            raise Refused(f"{what}, line {n}: expected 'moving_to <node>' then 'moved_from <node>'")
        if parts[1] not in fleet.peers or parts[1] == name:
            raise Refused(f"{what}, line {n}: {parts[1][:80]!r} is not another node of {NODES_FILE}")
        found[parts[0]] = parts[1]
    return Home(name, address, found.get("moving_to"), found.get("moved_from"))


def parse_home_lenient(data: bytes) -> tuple[str, str] | None:
    """(home, address) of a home fragment that was validated when it went live (a live release's)."""
    first = data.split(b"\n", 1)[0].decode("ascii", "replace").split(" ")
    return (first[1], first[2]) if len(first) == 3 and first[0] == "home" else None


def derived_lines(domain: str, home: tuple[str, str] | None, self_name: str, relay_port: int) -> dict[str, bytes]:
    """The node's own transport, defer and IMAP proxy lines for `domain`: none when it is the home,
    or the domain has none; else relay and proxy to the home's address (and refuse relayed mail
    with a 4xx)."""
    if home is None or home[0] == self_name:
        return {TRANSPORT_MAP: b"", DEFER_MAP: b"", PROXY_PASSDB: b""}
    return {
        TRANSPORT_MAP: f"{domain} fleet:[{home[1]}]:{relay_port}\n".encode(),
        DEFER_MAP: f"{domain} {DEFER_TEXT}\n".encode(),
        PROXY_PASSDB: f"{domain}:::::::nopassword=y proxy=y host={home[1]}\n".encode(),
    }


@dataclass(frozen=True)
class Move:
    domain: str
    home: str
    moving_to: str | None
    moved_from: str | None


def parse_moves(data: bytes | None, fleet: Fleet) -> list[Move]:
    """rendered/moves, validated (each domain once, sorted, nodes of the fleet)."""
    out: list[Move] = []
    for n, line in enumerate(_lines(MOVES_FILE, data or b""), 1):
        parts = line.split(" ")
        if len(parts) != 4 or not is_domain(parts[0]):
            raise Refused(f"{MOVES_FILE}, line {n}: expected '<domain> <home> <moving_to|-> <moved_from|->'")
        if out and parts[0] <= out[-1].domain:
            raise Refused(f"{MOVES_FILE}, line {n}: {parts[0]} is out of order or listed twice")
        nodes = [p for p in parts[1:] if p != "-"]
        if parts[1] == "-" or any(p not in fleet.peers for p in nodes) or parts[1] in parts[2:]:
            raise Refused(f"{MOVES_FILE}, line {n}: names a node that is not in {NODES_FILE}, or the home twice")
        move_to, moved_from = (None if p == "-" else p for p in parts[2:])
        if move_to is None and moved_from is None:
            raise Refused(f"{MOVES_FILE}, line {n}: {parts[0]} is not moving")
        out.append(Move(parts[0], parts[1], move_to, moved_from))
    return out


@dataclass(frozen=True)
class Replica:
    domain: str
    home: str
    replica: str


def parse_replicas(data: bytes | None, fleet: Fleet) -> list[Replica]:
    """rendered/replicas, validated (each domain once, sorted, two different nodes of the fleet)."""
    out: list[Replica] = []
    for n, line in enumerate(_lines(REPLICAS_FILE, data or b""), 1):
        parts = line.split(" ")
        if len(parts) != 3 or not is_domain(parts[0]):
            raise Refused(f"{REPLICAS_FILE}, line {n}: expected '<domain> <home> <replica>'")
        if out and parts[0] <= out[-1].domain:
            raise Refused(f"{REPLICAS_FILE}, line {n}: {parts[0]} is out of order or listed twice")
        if any(p not in fleet.peers for p in parts[1:]) or parts[1] == parts[2]:
            raise Refused(f"{REPLICAS_FILE}, line {n}: names a node that is not in {NODES_FILE}, or the home twice")
        out.append(Replica(parts[0], parts[1], parts[2]))
    return out
