"""DKIM on the node: this node's own signing keys, two alternating selectors, OpenDKIM's tables.

Why on the node: the private key never leaves the machine that signs with it. It is made
here (``openssl genpkey``, RSA 2048, through the Runner seam), written 0600 under
``[dkim] key_dir`` (default /etc/pi-pull/dkim) and never read by anything but OpenDKIM: it
is not in git, in a report, or in a log line. The node reports only the public half
(``p=``, the base64 of the DER SubjectPublicKeyInfo) with its selector, and the server's
``dns-records`` turns it into the TXT record the domain publishes.

Signer: OpenDKIM as a milter on the submission services only (the bundle's opendkim.conf;
Postfix's ``smtpd_milters`` on 587/465). pi-pull renders its two tables from the live
release's domains (``release.release_domains``, which knows every map layout: every
email-enabled domain, alias domains included) and reloads OpenDKIM (``[dkim] reload``) only
when a table changed. The domains are listed again only when the live release's domain list
can have changed (``release.domain_list_version``) or the active key did::

    KeyTable       <domain> <domain>:<selector>:<key_dir>/<selector>.private
    SigningTable   *@<domain> <domain>            (refile: one pattern per domain)

Selectors: ``ms1-<node name>`` and ``ms2-<node name>``, the two-selector pattern of the big
senders (the server accepts no other selector from a node). A key is in one of three states:

* ``pending``: made, not used yet. It is in every report from now on; once a report that
  carried it was accepted by the server (HTTP 200) and ``publish_wait`` seconds have passed
  since (the time for the platform's DNS code to publish it and for caches to expire), it
  becomes
* ``active``: the one key OpenDKIM signs with; the key it replaces becomes
* ``retired``: still reported and published, so mail signed just before the switch verifies
  until the next rotation, which makes a new pending key on that selector and drops it.

Rotation: ``pi_pull.py dkim-rotate --config FILE`` (operator), or automatically when the active
key is older than ``[dkim] rotate_days`` (0: never). A node without any key makes its first one
pending on its first tick: nothing is signed with a key the server has not heard of.

Metadata (selector, state, created_at, reported_at, activated_at, public key) lives next to
the keys in ``<key_dir>/keys.json``, so it goes wherever the keys go. Nothing here fails a
tick: a DKIM problem is logged and retried next tick while mail keeps flowing (OpenDKIM
keeps its last tables).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import logging
import os
import pwd
import shlex
import time
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import TickError
from .fsutil import atomic_write
from .release import domain_list_version, release_domains
from .runner import Runner, short

KEY_BITS = 2048
KEYS_FILE = "keys.json"
KEY_TABLE = "KeyTable"
SIGNING_TABLE = "SigningTable"
STATES = ("pending", "active", "retired")
# What keys.json records about the tables written last: their digest and what they were made from.
TABLE_STATE = ("tables_digest", "tables_source")


def ensure_key_dir(path: str, owner: str) -> None:
    """The keys' directory: 0750 whatever the umask or an earlier mode (it is not for others), owned by
    root and, when run as root, the group of ``owner`` (OpenDKIM reads the tables and keys here)."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    os.chmod(path, 0o750)
    gid = _group_of(owner)
    if os.geteuid() == 0 and gid >= 0:
        os.chown(path, 0, gid)


def _group_of(owner: str) -> int:
    if not owner:
        return -1
    try:
        return pwd.getpwnam(owner).pw_gid
    except KeyError:
        try:
            return grp.getgrnam(owner).gr_gid
        except KeyError:
            return -1


class Dkim:
    """One node's DKIM keys and OpenDKIM tables (see the module docstring).

    ``clock`` (epoch seconds) is the tests' seam: creation, report and publish-wait times read it.
    """

    def __init__(
        self, cfg: Config, runner: Runner, log: logging.Logger, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.clock = clock
        self.dir = cfg.dkim_key_dir
        self.path = os.path.join(self.dir, KEYS_FILE)
        # The server accepts exactly these two for this node (state/nodes.py), so no node can
        # publish under another's DNS names.
        self.selectors = (f"ms1-{cfg.node_name}", f"ms2-{cfg.node_name}")

    # ---- keys.json

    def load(self) -> dict[str, dict[str, Any]]:
        """{selector: metadata} of this node's two selectors (anything else in the file is ignored)."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise TickError(f"cannot read {self.path}: {e}") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        out: dict[str, dict[str, Any]] = {}
        for sel, meta in (keys or {}).items() if isinstance(keys, dict) else ():
            if (
                sel in self.selectors
                and isinstance(meta, dict)
                and meta.get("state") in STATES
                and isinstance(meta.get("public_key"), str)
                and os.path.isfile(self.key_path(sel))
            ):
                out[sel] = meta
        return out

    def _save(self, keys: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        body = {"keys": keys, **(extra or {})}
        atomic_write(self.path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode(), 0o644)

    def _table_state(self) -> dict[str, str]:
        """keys.json's ``TABLE_STATE`` entries ("" where missing), kept by every save of the keys."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            data = None
        return {k: str(data.get(k, "")) if isinstance(data, dict) else "" for k in TABLE_STATE}

    def key_path(self, selector: str) -> str:
        return os.path.join(self.dir, f"{selector}.private")

    # ---- key generation

    def _ensure_dir(self) -> None:
        ensure_key_dir(self.dir, self.cfg.dkim_key_owner)

    def generate(self, selector: str) -> dict[str, Any]:
        """A new RSA key for ``selector`` (replacing what that selector had); its metadata, state pending."""
        self._ensure_dir()
        final = self.key_path(selector)
        tmp = f"{final}.tmp-{os.getpid()}"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # Created 0600 by us first: openssl then writes into it and the key is never readable by others.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            openssl = shlex.split(self.cfg.dkim_openssl)
            r = self.runner.run(
                [*openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}", "-out", tmp],
                timeout=120,
            )
            if r.returncode != 0:
                raise TickError(f"openssl genpkey failed: {short(r.stderr) or f'rc={r.returncode}'}")
            public = self.public_key(tmp)
            if self.cfg.dkim_key_owner and os.geteuid() == 0:
                try:
                    pw = pwd.getpwnam(self.cfg.dkim_key_owner)
                    os.chown(tmp, pw.pw_uid, pw.pw_gid)
                except KeyError:
                    pass
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        now = int(self.clock())
        self.log.info(f"dkim: new key on selector {selector} (pending until reported and publish_wait has passed)")
        return {"state": "pending", "created_at": now, "public_key": public, "reported_at": None}

    def public_key(self, private_path: str) -> str:
        """The ``p=`` value of a private key: base64 of its DER SubjectPublicKeyInfo."""
        openssl = shlex.split(self.cfg.dkim_openssl)
        r = self.runner.run([*openssl, "pkey", "-in", private_path, "-pubout", "-outform", "DER"], timeout=60)
        if r.returncode != 0 or not r.stdout:
            raise TickError(f"openssl pkey -pubout failed: {short(r.stderr) or f'rc={r.returncode}'}")
        return base64.b64encode(r.stdout).decode("ascii")

    # ---- the tick's steps

    def step(self) -> list[dict[str, Any]] | None:
        """Make the first key, rotate when due, activate a reported pending key once
        publish_wait passed, render the tables and reload OpenDKIM on a change. Returns the
        ``dkim_keys`` entries for this tick's report (None when DKIM is off or failed)."""
        if not self.cfg.dkim:
            return None
        try:
            return self._step()
        except (OSError, TickError, ValueError) as e:
            self.log.warning(f"dkim: {e}; retrying next tick (OpenDKIM keeps its last tables)")
            return None

    def _step(self) -> list[dict[str, Any]]:
        keys = self.load()
        now = self.clock()
        changed = False
        if not keys:
            keys[self.selectors[0]] = self.generate(self.selectors[0])
            changed = True
        active = self._active(keys)
        pending = next((s for s, m in keys.items() if m["state"] == "pending"), None)
        if (
            active
            and not pending
            and self.cfg.dkim_rotate_days > 0
            and now - float(keys[active].get("activated_at") or keys[active]["created_at"])
            >= self.cfg.dkim_rotate_days * 86400
        ):
            self.log.info(
                f"dkim: the active key {active} is older than rotate_days = {self.cfg.dkim_rotate_days}; rotating"
            )
            idle = self._idle(active)
            keys[idle] = self.generate(idle)
            pending, changed = idle, True
        if pending:
            reported = keys[pending].get("reported_at")
            if isinstance(reported, (int, float)) and now - reported >= self.cfg.dkim_publish_wait:
                for meta in keys.values():
                    if meta["state"] == "active":
                        meta["state"] = "retired"
                keys[pending]["state"] = "active"
                keys[pending]["activated_at"] = int(now)
                self.log.info(f"dkim: {pending} is the active key from now on (reported {int(now - reported)}s ago)")
                changed = True
        if changed:
            self._save(keys, self._table_state())
        self.render(keys)
        return self.report_entries(keys)

    def _active(self, keys: dict[str, dict[str, Any]]) -> str | None:
        return next((s for s, m in keys.items() if m["state"] == "active"), None)

    def _idle(self, active: str | None) -> str:
        return self.selectors[1] if active == self.selectors[0] else self.selectors[0]

    @staticmethod
    def report_entries(keys: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"selector": s, "public_key": m["public_key"], "state": m["state"], "created_at": int(m["created_at"])}
            for s, m in sorted(keys.items())
        ]

    def reported(self, entries: list[dict[str, Any]]) -> None:
        """A report carrying ``entries`` was accepted: start the publish wait of its pending key."""
        try:
            keys = self.load()
            sent = {e["selector"]: e["public_key"] for e in entries}
            touched = False
            for sel, meta in keys.items():
                if (
                    meta["state"] == "pending"
                    and meta.get("reported_at") is None
                    and sent.get(sel) == meta["public_key"]
                ):
                    meta["reported_at"] = int(self.clock())
                    touched = True
                    self.log.info(
                        f"dkim: pending key {sel} reported; it signs after publish_wait = {self.cfg.dkim_publish_wait:g}s"
                    )
            if touched:
                self._save(keys, self._table_state())
        except (OSError, TickError, ValueError, KeyError) as e:
            self.log.warning(f"dkim: cannot record the report of the pending key: {e}")

    def rotate(self) -> str:
        """Make a new pending key on the idle selector (``dkim-rotate``); a sentence saying what happened."""
        keys = self.load()
        pending = next((s for s, m in keys.items() if m["state"] == "pending"), None)
        if pending:
            return f"{pending} already holds a pending key; it becomes active once reported and publish_wait has passed"
        active = self._active(keys)
        idle = self._idle(active)
        keys[idle] = self.generate(idle)
        self._save(keys, self._table_state())
        return f"new pending key on {idle}; {active or 'no key'} keeps signing until it has been reported and publish_wait has passed"

    # ---- OpenDKIM's tables

    def _release(self) -> str:
        return os.path.join(self.cfg.root, "current")

    def domains(self) -> list[str]:
        """The live release's domains, sorted (``release.release_domains``: every layout)."""
        return release_domains(self._release(), self.cfg, self.runner)

    def tables(self, keys: dict[str, dict[str, Any]]) -> tuple[bytes, bytes]:
        """(KeyTable, SigningTable) bytes: every domain signs with the active key; empty without one."""
        active = self._active(keys)
        if active is None:
            return b"", b""
        key = self.key_path(active)
        kt, st = [], []
        for domain in self.domains():
            kt.append(f"{domain} {domain}:{active}:{key}\n")
            st.append(f"*@{domain} {domain}\n")
        return "".join(kt).encode(), "".join(st).encode()

    def render(self, keys: dict[str, dict[str, Any]]) -> bool:
        """Write the tables when they changed and reload OpenDKIM; True when they changed."""
        active = self._active(keys)
        source = json.dumps([active and self.key_path(active), domain_list_version(self._release())])
        have = all(os.path.isfile(os.path.join(self.dir, n)) for n in (KEY_TABLE, SIGNING_TABLE))
        state = self._table_state()
        if have and state["tables_source"] == source:
            return False  # same key, same domain list: nothing to list or compare
        kt, st = self.tables(keys)
        digest = hashlib.sha256(kt + b"\0" + st).hexdigest()
        if have and state["tables_digest"] == digest:
            self._save(self.load(), {"tables_digest": digest, "tables_source": source})
            if active and not kt:  # a key became active, or the domains changed, and still nothing is signed
                self._log_tables(active, 0)
            return False
        self._ensure_dir()
        atomic_write(os.path.join(self.dir, KEY_TABLE), kt, 0o644)
        atomic_write(os.path.join(self.dir, SIGNING_TABLE), st, 0o644)
        if self.cfg.dkim_reload:
            r = self.runner.shell(self.cfg.dkim_reload, timeout=self.cfg.reload_timeout)
            if r.returncode != 0:
                # Nothing is recorded: the next tick writes and reloads again.
                raise TickError(
                    f"opendkim reload failed (rc={r.returncode}): {short(r.stderr + r.stdout) or 'no output'}"
                )
        self._save(self.load(), {"tables_digest": digest, "tables_source": source})
        self._log_tables(active, kt.count(b"\n"))
        return True

    def _log_tables(self, active: str | None, count: int) -> None:
        """What OpenDKIM signs from now on, as the tables just written say (never more)."""
        if active is None:
            self.log.info("dkim: tables empty, nothing is signed: no key is active yet")
        elif count == 0:
            self.log.warning(
                f"dkim: {active} is active but the live release lists no domain: tables empty, nothing is signed"
            )
        else:
            self.log.info(f"dkim: signing the mail of {count} domain(s) with {active}")
