"""This node's part in the fleet: trust in the other nodes, its credentials, and move-domain's work.

Every tick, after the release is live (like DKIM: a failure is logged and retried next tick,
never fails the tick), from the live commit's rendered/nodes, nodes.pem and moves
(pipull/fleetfiles.py, validated when the release was built):

* **Trust** (``[fleet] dir``, default ``<root>/fleet``, 0700): ``tls_policy`` (Postfix's relay to
  another node pins that node's certificate fingerprint), ``ccerts`` (the relay listener takes
  mail only from a client certificate of the fleet), ``peers.pem`` (the nodes' certificates and
  the system's CAs: Dovecot's ``ssl_ca``, which its IMAP proxy and doveadm verify peers against)
  and ``dovecot.conf``, which the bundle's Dovecot snippet includes: ``auth_proxy_self``, the
  peers as ``login_trusted_networks``, ``ssl_ca``, and this node's doveadm password and listener.
* **Certificate**: when rendered/nodes lists this node with another fingerprint than its own
  certificate's (``[fleet] tls_cert``), the report carries the certificate; the server commits it.
* **Credentials**: ``GET [fleet] url`` (the server's /v1/nodes/fleet, HTTP Basic with the sync
  key) answers this node's doveadm password and those of the peers a move lets it use; kept in
  ``credentials.json`` (0600) and fetched again when the fleet changes.
* **Moves** (rendered/moves): the node a domain is ``moving_to`` copies every mailbox from the
  home with ``doveadm backup -R`` (one way: nothing is written on the home), at most ``[fleet]
  sync_budget_s`` a tick, then reports ``copied``; the server switches the home. The old home
  (``moved_from``) then flushes its queue, kicks the domain's sessions, renames each Maildir it
  still holds into ``<mail_root>/.fleet-drain/`` (so no new delivery lands in what it syncs),
  ``doveadm sync``s it with the new home (two-way: the GUIDs keep every message once, what came
  in on either side meanwhile included) and moves it to the graveyard; once nothing
  is left or queued for the domain it reports ``drained``. A move that is called off leaves
  the target's copies in its graveyard.
* **Replicas** (rendered/replicas): the home keeps each replicated domain in two-way sync with
  its replica (pipull/replication.py), on change and at least every ``[fleet] replicate_full_s``;
  the report carries ``replication`` per peer. A domain in a move is left to the move.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from . import fleetfiles
from .config import POSTMAP_TYPES, Config
from .errors import ConfigError, Refused, TickError
from .fsutil import atomic_write
from .lifecycle import Lifecycle, graveyard_name, parse_mailboxes
from .mirror import Mirror
from .release import Releases
from .replication import Replication, Target
from .runner import Runner, short

DRAIN = ".fleet-drain"
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+?-----END CERTIFICATE-----\n?")


def colon_hex(fingerprint: str) -> str:
    """``ab12...`` as Postfix prints and matches fingerprints: ``AB:12:...``."""
    return ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()


def pem_fingerprint(pem: str) -> str:
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def resolve(address: str) -> list[str]:
    """The IPs of a node address (itself for an IP); [] when a name does not resolve now."""
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


class Fleet:
    """See the module docstring. ``token()`` is the node's HTTP Basic token (read when needed)."""

    def __init__(
        self,
        cfg: Config,
        runner: Runner,
        log: logging.Logger,
        mirror: Mirror,
        releases: Releases,
        lifecycle: Lifecycle,
        token: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.mirror = mirror
        self.releases = releases
        self.lifecycle = lifecycle
        self.token = token
        self.clock = clock
        self.dir = cfg.fleet_dir or os.path.join(cfg.root, "fleet")
        self.more = False  # set when a move's work did not fit this tick's budget
        self.replication = Replication(
            self.dir,
            cfg.mail_root,
            self.replicate,
            log,
            full_s=cfg.fleet_replicate_full_s,
            budget_s=cfg.fleet_sync_budget_s,
        )

    # ---- the tick's step

    def step(self, st: dict[str, Any]) -> dict[str, Any]:
        """Keep the trust files, and do this node's move work; what the report should carry."""
        self.more = False
        applied = st.get("applied_commit")
        if not isinstance(applied, str):
            return {}
        try:
            return self._step(st, applied)
        except (OSError, TickError, Refused, ValueError) as e:
            self.log.warning(f"fleet: {e}; retrying next tick")
            return {}

    def _step(self, st: dict[str, Any], applied: str) -> dict[str, Any]:
        fleet = self.releases.fleet_of(applied)
        me = fleet.peers.get(self.cfg.node_name)
        extras: dict[str, Any] = {}
        own = self.own_certificate()
        if me is not None and own is not None and pem_fingerprint(own) != me.fingerprint:
            extras["tls_certificate"] = own
        found = self.releases.top_files(applied, (fleetfiles.MOVES_FILE,))
        moves = fleetfiles.parse_moves(found.get(fleetfiles.MOVES_FILE), fleet)
        mine = [m for m in moves if self.cfg.node_name in (m.moving_to, m.moved_from)]
        replicas = fleetfiles.parse_replicas(
            self.releases.top_files(applied, (fleetfiles.REPLICAS_FILE,)).get(fleetfiles.REPLICAS_FILE), fleet
        )
        moving = {m.domain for m in moves}
        homed = [r for r in replicas if r.home == self.cfg.node_name and r.domain not in moving]
        needed = {m.home for m in mine} | {r.replica for r in homed}
        # A replica that refused the password cached for it may have a new one (a rotated key).
        refused = bool(self.replication.failing() & needed)
        creds = self.credentials(fleet, needed, force=refused) if me is not None or mine else None
        self.write_trust(fleet, me, creds)
        if me is not None:
            extras["replication"] = self._replicate(applied, fleet, homed, creds)
        steps: list[dict[str, str]] = []
        state = st.setdefault("fleet", {}) if mine or isinstance(st.get("fleet"), dict) else {}
        for move in mine:
            peer = fleet.peers[move.home]
            password = (creds or {}).get("peers", {}).get(move.home, {}).get("doveadm_password")
            if not isinstance(password, str):
                self.log.warning(f"fleet: no credentials for {move.home} yet; {move.domain} waits")
                continue
            if move.moving_to == self.cfg.node_name and self.copy(state, applied, move, peer.address, password):
                steps.append({"domain": move.domain, "step": "copied"})
            if move.moved_from == self.cfg.node_name and self.drain(state, applied, move, peer.address, password):
                steps.append({"domain": move.domain, "step": "drained"})
        if state:
            self.forget_copies(state, applied, {m.domain for m in moves if m.moving_to == self.cfg.node_name})
        if not state and "fleet" in st and not st["fleet"]:
            del st["fleet"]
        if steps:
            extras["moves"] = steps
        return extras

    # ---- replicas

    def _replicate(
        self, applied: str, fleet: fleetfiles.Fleet, homed: list[fleetfiles.Replica], creds: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """Plan the replicated domains this node is home to, run a full pass, and say how it stands."""
        targets = []
        for item in homed:
            password = (creds or {}).get("peers", {}).get(item.replica, {}).get("doveadm_password")
            if not isinstance(password, str):
                self.log.warning(f"fleet: no credentials for replica {item.replica} yet; {item.domain} waits")
                continue
            boxes = tuple(self._mailboxes(applied, item.domain))
            targets.append(Target(item.domain, item.replica, fleet.peers[item.replica].address, password, boxes))
        self.replication.plan(targets)
        if targets:
            self.replication.run_pass(full=True)
        return self.replication.report()

    def replicate(self, user: str, peer: str, address: str, password: str) -> tuple[bool, str]:
        """One two-way ``doveadm sync`` of ``user`` with its replica (pipull/replication.py's seam)."""
        host = f"[{address}]" if ":" in address else address
        target = f"tcps:{host}:{self.cfg.fleet_doveadm_port}"
        stall = str(max(1, round(self.cfg.fleet_sync_stall_s)))
        rc, out = self._doveadm(
            "sync", "-T", stall, "-u", user, target, password=password, conf=f"doveadm-replica-{peer}.conf"
        )
        if rc != 0:
            self.log.warning(f"replication: doveadm sync of {user} with {peer} failed (rc={rc}): {out}")
            return False, f"doveadm sync of {user} failed (rc={rc}): {out}"
        return True, ""

    # ---- this node's certificate

    def own_certificate(self) -> str | None:
        """The first certificate of ``[fleet] tls_cert`` (the leaf), or None without one."""
        try:
            with open(self.cfg.fleet_tls_cert, encoding="ascii", errors="replace") as fh:
                text = fh.read(1 << 16)
        except OSError:
            return None
        m = _PEM_BLOCK.search(text.replace("\r\n", "\n"))
        return m.group(0) if m else None

    # ---- credentials

    def credentials(self, fleet: fleetfiles.Fleet, needed: set[str], *, force: bool = False) -> dict[str, Any] | None:
        """This node's and the needed peers' doveadm passwords: the cached ones while they fit the fleet
        and this node's sync key (a new key gives new passwords), unless ``force`` (a peer refused
        the password cached for it: its key was rotated)."""
        path = os.path.join(self.dir, "credentials.json")
        cached: dict[str, Any] = {}
        try:
            with open(path, encoding="utf-8") as fh:
                cached = json.load(fh)
        except (OSError, ValueError):
            pass
        key = fleet.digest() + "/" + self._key_id()
        fits = isinstance(cached, dict) and cached.get("fleet") == key
        peers: dict[str, Any] = cached["peers"] if fits and isinstance(cached.get("peers"), dict) else {}
        if fits and needed <= set(peers) and not force:
            return cached
        if not self.cfg.fleet_url:
            self.log.warning("fleet: no [fleet] url (nor [report] url) to fetch the node credentials from")
            return cached if fits else None
        try:
            fresh = self._fetch()
        except TickError as e:
            self.log.warning(f"fleet: {e}")
            return cached if fits else None
        fresh["fleet"] = key
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        atomic_write(path, (json.dumps(fresh, sort_keys=True) + "\n").encode(), 0o600)
        return fresh

    def _key_id(self) -> str:
        """A short digest of this node's sync key, or "-" for a node without one (it fetches nothing)."""
        if not self.cfg.fleet_url:
            return "-"
        try:
            return hashlib.sha256(self.token().encode()).hexdigest()[:16]
        except (ConfigError, OSError):
            return "-"

    def _fetch(self) -> dict[str, Any]:
        req = urllib.request.Request(
            self.cfg.fleet_url, headers={"Authorization": "Basic " + self.token(), "User-Agent": "pi-pull"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.report_timeout) as resp:
                body = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise TickError(f"fetching the node credentials failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TickError(f"fetching the node credentials from {self.cfg.fleet_url} failed: {e}") from None
        secret = re.compile(r"^msd_[0-9a-f]{64}$")
        peers = body.get("peers") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or not secret.match(str(body.get("doveadm_password")))
            or not isinstance(peers, dict)
        ):
            raise TickError("the server's node credentials are not in the expected form")
        for name, peer in peers.items():
            if not isinstance(peer, dict) or not secret.match(str(peer.get("doveadm_password"))):
                raise TickError(f"the server's credentials for {str(name)[:60]} are not in the expected form")
        return {"doveadm_password": body["doveadm_password"], "peers": peers}

    # ---- trust files

    def write_trust(self, fleet: fleetfiles.Fleet, me: fleetfiles.Peer | None, creds: dict[str, Any] | None) -> None:
        """Write the Postfix tables, the CA file and the Dovecot include; reload Dovecot if its part changed."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if os.stat(self.dir).st_mode & 0o777 != 0o700:  # a chmod moves the ctime: a no-op tick changes nothing
            os.chmod(self.dir, 0o700)
        peers = [p for p in fleet.peers.values() if p.name != self.cfg.node_name]
        port = self.cfg.fleet_relay_port
        policy = "".join(
            f"[{p.address}]:{port} fingerprint match={colon_hex(p.fingerprint)}\n" for p in peers if p.fingerprint
        )
        ccerts = "".join(f"{colon_hex(p.fingerprint)} OK\n" for p in fleet.peers.values() if p.fingerprint)
        self._table("tls_policy", policy.encode())
        self._table("ccerts", ccerts.encode())
        pems = "".join(p.pem for p in fleet.peers.values() if p.pem)
        if pems:
            try:
                with open(self.cfg.fleet_ca_bundle, encoding="ascii", errors="replace") as fh:
                    pems += fh.read()
            except OSError:
                pass  # no system CAs: the fleet's own certificates only
        ca_path = os.path.join(self.dir, "peers.pem")
        if pems or os.path.exists(ca_path):
            self._write(ca_path, pems.encode(), 0o644)
        # Outside a fleet (no addressed node) the include stays absent, or empty once it was not.
        conf = self._dovecot_conf(me, peers, ca_path if pems else None, creds) if fleet.peers else ""
        conf_path = os.path.join(self.dir, "dovecot.conf")
        if (conf or os.path.exists(conf_path)) and self._write(conf_path, conf.encode(), 0o600):
            failures = self.releases.reload(["dovecot"])
            if failures:
                self.log.warning("fleet: " + "; ".join(failures))

    def _dovecot_conf(
        self,
        me: fleetfiles.Peer | None,
        peers: list[fleetfiles.Peer],
        ca_path: str | None,
        creds: dict[str, Any] | None,
    ) -> str:
        lines = ["# Written by pi-pull from the fleet's signed state (docs/fleet.md); do not edit.\n"]
        own = resolve(me.address) if me is not None else []
        if own:
            lines.append(f"auth_proxy_self = {' '.join(own)}\n")
        trusted = sorted({ip for p in peers for ip in resolve(p.address)})
        if trusted:
            lines.append(f"login_trusted_networks = {' '.join(trusted)}\n")
        if ca_path:
            # The peers' own certificates are the trust (no CA issues revocation lists for them).
            lines.append(f"ssl_ca = <{ca_path}\nssl_require_crl = no\n")
        # A login a node passes on costs a second login, and TLS, on the home: login processes that
        # serve many connections (Dovecot's high-performance mode) spare both sides a process start
        # and a TLS context per login. They stay chrooted and unprivileged.
        lines.append("service imap-login {\n  service_count = 0\n  process_min_avail = 1\n}\n")
        password = (creds or {}).get("doveadm_password")
        if me is not None and isinstance(password, str):
            lines.append(f"doveadm_password = {password}\n")
            lines.append(
                "service doveadm {\n  inet_listener fleet {\n"
                f"    port = {self.cfg.fleet_doveadm_port}\n    ssl = yes\n  }}\n}}\n"
            )
        return "".join(lines)

    def _write(self, path: str, data: bytes, mode: int) -> bool:
        """Write ``path`` if its content differs; True when it did."""
        try:
            with open(path, "rb") as fh:
                if fh.read() == data:
                    return False
        except OSError:
            pass
        atomic_write(path, data, mode)
        return True

    def _table(self, name: str, data: bytes) -> None:
        path = os.path.join(self.dir, name)
        map_type = self.cfg.map_type if self.cfg.map_type in POSTMAP_TYPES else "hash"
        suffix = ".lmdb" if map_type == "lmdb" else ".db"
        if not self._write(path, data, 0o644) and os.path.exists(path + suffix):
            return
        r = self.runner.run([*shlex.split(self.cfg.fleet_postmap), f"{map_type}:{path}"], timeout=120)
        if r.returncode != 0:
            raise TickError(f"postmap {path} failed: {short(r.stderr) or r.returncode}")

    # ---- moves

    def _mailboxes(self, applied: str, domain: str) -> list[tuple[str, str]]:
        files = self.releases.domain_files(applied, [domain]).get(domain, {})
        if "mailboxes" not in files:
            return []
        with self.mirror.batch() as cat:
            data = cat.read(files["mailboxes"], f"mailboxes of {domain}", self.cfg.max_file_bytes)
        return list(parse_mailboxes(data, domain))

    def _doveadm(
        self, *args: str, password: str | None = None, timeout: float = 3600, conf: str = "doveadm-peer.conf"
    ) -> tuple[int, str]:
        """Run doveadm with this node's Dovecot config; with ``password``, through a 0600 config file
        that includes it and sets the peer's doveadm password (a secret never goes on a command line)."""
        config = self.cfg.fleet_dovecot_config
        if password is not None:
            config = os.path.join(self.dir, conf)
            self._write(
                config, f"!include {self.cfg.fleet_dovecot_config}\ndoveadm_password = {password}\n".encode(), 0o600
            )
        r = self.runner.run([*shlex.split(self.cfg.fleet_doveadm), "-c", config, *args], timeout=timeout)
        return r.returncode, short(r.stderr + r.stdout)

    def _sync(self, user: str, address: str, password: str, *overrides: str, copy: bool = False) -> bool:
        """``doveadm sync`` (two-way) of ``user`` with the peer, or with ``copy`` ``doveadm backup -R``:
        this node's copy becomes the peer's, and nothing is ever written on the peer. ``-T``: a sync
        whose stream stalls that long is given up (and retried next tick) rather than held for
        dsync's default 10 minutes."""
        host = f"[{address}]" if ":" in address else address
        target = f"tcps:{host}:{self.cfg.fleet_doveadm_port}"
        opts = [x for o in overrides for x in ("-o", o)]
        command = ["backup", "-R"] if copy else ["sync"]
        stall = str(max(1, round(self.cfg.fleet_sync_stall_s)))
        rc, out = self._doveadm(*opts, *command, "-T", stall, "-u", user, target, password=password)
        if rc != 0:
            self.log.warning(f"fleet: doveadm {command[0]} of {user} with {address} failed (rc={rc}): {out}")
        return rc == 0

    def copy(self, state: dict[str, Any], applied: str, move: fleetfiles.Move, address: str, password: str) -> bool:
        """Copy every mailbox of the domain from its home (one way: the target has no mail of its own
        for the domain yet, and a leftover of an earlier move must not flow back); True once all are done."""
        copies = state.setdefault("copies", {})
        entry = copies.setdefault(move.domain, {"home": move.home, "done": []})
        if entry.get("home") != move.home:
            entry.update(home=move.home, done=[])
        done = set(entry["done"])
        started = self.clock()
        for local, box_id in self._mailboxes(applied, move.domain):
            name = f"{local}~{box_id}"
            if name in done:
                continue
            if self.clock() - started > self.cfg.fleet_sync_budget_s:
                self.more = True
                return False
            if not self._sync(f"{local}@{move.domain}", address, password, copy=True):
                return False
            entry["done"].append(name)
            done.add(name)
        return True

    def forget_copies(self, state: dict[str, Any], applied: str, moving_here: set[str]) -> None:
        """Copies of a move that is over: kept when this node is the home now, else to the graveyard."""
        copies = state.get("copies", {})
        for domain in [d for d in copies if d not in moving_here]:
            files = self.releases.domain_files(applied, [domain]).get(domain, {})
            home = None
            if fleetfiles.HOME in files:
                with self.mirror.batch() as cat:
                    data = cat.read(files[fleetfiles.HOME], f"home of {domain}", self.cfg.max_file_bytes)
                home = fleetfiles.parse_home_lenient(data)
            if home is None or home[0] != self.cfg.node_name:
                self._bury_all(domain, list(copies[domain].get("done", [])))
                self.log.info(f"fleet: the move of {domain} here was called off; its copies went to the graveyard")
            del copies[domain]
        if not copies:
            state.pop("copies", None)

    def _bury_all(self, domain: str, names: list[str]) -> None:
        rfd = self.lifecycle._open_root()
        if rfd is None:
            return
        try:
            dfd = self.lifecycle._open_domain(rfd, domain)
            if dfd is None:
                return
            try:
                for name in names:
                    try:
                        os.lstat(name, dir_fd=dfd)
                    except FileNotFoundError:
                        continue
                    self.lifecycle._bury(rfd, dfd, domain, name)
            finally:
                os.close(dfd)
        finally:
            os.close(rfd)

    def drain(self, state: dict[str, Any], applied: str, move: fleetfiles.Move, address: str, password: str) -> bool:
        """Hand what this old home still holds of the domain to the new home; True once nothing is left.

        Nothing is set aside while Postfix's queue holds mail for the domain: a delivery under way
        could land in a Maildir being moved (and be retried, so arrive twice). Once this node
        applied the switch nothing new is delivered here (its transport relays to the new home), so
        the queue only empties: flushed, it goes to the new home."""
        if self._queued_for(move.domain):
            self.runner.run([*shlex.split(self.cfg.fleet_postqueue), "-f"], timeout=60)
            self.more = True  # soon again (follow mode's next tick)
            return False
        pending: list[dict[str, str]] = state.setdefault("drain", [])
        for local, box_id in self._mailboxes(applied, move.domain):
            entry = self._set_aside(move.domain, local, box_id)
            if entry is not None:
                pending.append({"domain": move.domain, "user": f"{local}@{move.domain}", "entry": entry})
        for item in [p for p in pending if p["domain"] == move.domain]:
            # The set-aside entry is the mailbox's whole home: doveadm reads it as the home (-o
            # overrides the userdb's), so nothing of the sync (Pigeonhole's ~/sieve) recreates the
            # old home.
            path = os.path.join(self.cfg.mail_root, DRAIN, item["entry"])
            overrides = (f"mail_home={path}", f"mail_location=maildir:{path}/Maildir")
            if not self._sync(item["user"], address, password, *overrides):
                return False
            self._bury_drained(item["entry"])
            pending.remove(item)
        if not pending:
            state.pop("drain", None)
        return not any(p["domain"] == move.domain for p in pending)

    def _set_aside(self, domain: str, local: str, box_id: str) -> str | None:
        """Rename ``<domain>/<local>~<id>`` into the drain area (after kicking its sessions), so nothing
        is delivered or changed in what is synced; the entry's name, or None when there is no such Maildir."""
        name = f"{local}~{box_id}"
        src = os.path.join(self.cfg.mail_root, domain, name)
        if not os.path.isdir(src) or os.path.islink(src):
            return None
        self._doveadm("kick", f"{local}@{domain}", timeout=60)
        drain = os.path.join(self.cfg.mail_root, DRAIN)
        if not os.path.isdir(drain):
            os.mkdir(drain, 0o700)
            os.chown(drain, self.cfg.mail_uid, self.cfg.mail_gid)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        entry, n = graveyard_name(stamp, domain, name), 1
        while os.path.lexists(os.path.join(drain, entry)):
            n += 1
            entry = f"{graveyard_name(stamp, domain, name)}.{n}"
        os.rename(src, os.path.join(drain, entry))
        return entry

    def _bury_drained(self, entry: str) -> None:
        """A synced drain entry goes to the graveyard (deleted after purge_after_days)."""
        graveyard = self.lifecycle.graveyard
        os.makedirs(graveyard, mode=0o700, exist_ok=True)
        target = os.path.join(graveyard, entry)
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(graveyard, f"{entry}.{n}")
        os.rename(os.path.join(self.cfg.mail_root, DRAIN, entry), target)

    def _queued_for(self, domain: str) -> bool:
        """Whether Postfix's queue holds a message for the domain (``postqueue -j``)."""
        r = self.runner.run([*shlex.split(self.cfg.fleet_postqueue), "-j"], timeout=60)
        if r.returncode != 0:
            return False
        suffix = "@" + domain
        for line in r.stdout.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            for rcpt in item.get("recipients", []) if isinstance(item, dict) else []:
                if isinstance(rcpt, dict) and str(rcpt.get("address", "")).lower().endswith(suffix):
                    return True
        return False
