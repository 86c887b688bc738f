"""Releases under ``<root>/releases/<sha>``: build from git blobs, validate, postmap, swap, reload, prune."""

from __future__ import annotations

import grp
import json
import logging
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import POSTMAP_TYPES, Config
from .errors import Refused, TickError
from .fsutil import digest, fsync_dir, rmtree, utcnow, write_file
from .mirror import SHA_RE, Mirror
from .runner import Runner, short
from .verify import DOMAIN_RE, validate_domain

MAP_FILES = ("virtual_mailbox_domains", "virtual_mailbox_maps")
DOMAIN_FILES = ("passwd", *MAP_FILES)
# Bump when validation gets stricter: releases built by an older validator are then not reused.
VALIDATOR_VERSION = 1


@dataclass
class _Plan:
    """What a build needs: each domain's (passwd, maps, domains) blob ids, what is reused, the blobs read."""

    tree: dict[str, dict[str, str]]
    keys: dict[str, list[str]] = field(default_factory=dict)
    reuse: set[str] = field(default_factory=set)
    prev_files: dict[str, list[Any]] = field(default_factory=dict)
    prev_passwd_dir: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    gid: int = -1


class Releases:
    """The release directories and the ``current`` symlink of one node."""

    def __init__(self, cfg: Config, runner: Runner, log: logging.Logger, mirror: Mirror) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.mirror = mirror
        self.root = cfg.root
        self.dir = os.path.join(cfg.root, "releases")
        self.current = os.path.join(cfg.root, "current")

    # ---- read rendered/ from git

    def list_rendered(self, sha: str) -> dict[str, dict[str, str]]:
        """Blob ids of each domain's rendered files: {domain: {file name: blob id}}."""
        r = self.mirror.git("ls-tree", "-r", "-z", sha, "--", "rendered/domains/")
        if r.returncode != 0:
            raise TickError(f"git ls-tree {sha[:12]} failed: {short(r.stderr)}")
        wanted: dict[str, dict[str, str]] = {}
        for entry in r.stdout.split(b"\0"):
            if entry:
                self._add_tree_entry(wanted, entry)
        for domain, files in wanted.items():
            if "virtual_mailbox_domains" not in files:
                raise Refused(f"rendered/ for {domain} lacks virtual_mailbox_domains")
        return wanted

    def _add_tree_entry(self, wanted: dict[str, dict[str, str]], entry: bytes) -> None:
        meta, _, pathb = entry.partition(b"\t")
        try:
            mode, otype, oid = meta.decode("ascii").split(" ")
            path = pathb.decode("utf-8")
        except (UnicodeDecodeError, ValueError):
            raise Refused("undecodable tree entry under rendered/") from None
        parts = path.split("/")
        if len(parts) != 5 or parts[4] not in DOMAIN_FILES:
            self.log.debug(f"ignoring rendered path {path}")
            return
        bb, domain, fname = parts[2], parts[3], parts[4]
        if not DOMAIN_RE.match(domain) or bb != domain[:2]:
            raise Refused("unsafe or misplaced domain directory {!r}".format("/".join(parts[:4])))
        if otype != "blob" or mode not in ("100644", "100755"):
            raise Refused(f"{path} is not a regular file (mode {mode})")
        wanted.setdefault(domain, {})[fname] = oid

    def reuse_key(self) -> str:
        return json.dumps([VALIDATOR_VERSION, self.cfg.passwd_group, self.cfg.mail_root])

    # ---- build

    def build(self, sha: str, previous: str | None) -> dict[str, Any]:
        """Materialise rendered/ of ``sha`` into releases/<sha> (validated, postmapped).

        Domains whose three blobs are unchanged since ``previous`` (the live release) are not
        re-read or re-validated: their passwd-file is hard-linked from it, so a one-mailbox
        change costs little even with 100k mailboxes, and unchanged files keep their mtime.
        """
        plan = self._plan(sha, previous)
        self._read_and_validate(plan)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        final = os.path.join(self.dir, sha)
        tmp = os.path.join(self.dir, f".tmp-{sha[:12]}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = self._write(tmp, sha, plan)
            if os.path.lexists(final):
                rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _plan(self, sha: str, previous: str | None) -> _Plan:
        plan = _Plan(tree=self.list_rendered(sha))
        prev = self.manifest(previous)
        if previous and prev.get("reuse_key") == self.reuse_key() and isinstance(prev.get("files"), dict):
            plan.prev_files = prev["files"]
        plan.prev_passwd_dir = os.path.join(self.dir, previous or "-", "dovecot", "passwd.d")
        for domain, files in plan.tree.items():
            key = [files.get("passwd", ""), files.get("virtual_mailbox_maps", ""), files["virtual_mailbox_domains"]]
            plan.keys[domain] = key
            old = plan.prev_files.get(domain)
            if isinstance(old, list) and old[:3] == key and os.path.isfile(os.path.join(plan.prev_passwd_dir, domain)):
                plan.reuse.add(domain)
        return plan

    def _read_and_validate(self, plan: _Plan) -> None:
        """Read the blobs a build needs (not the passwd-files it links) and validate everything new
        before anything is written."""
        need: set[str] = set()
        for domain, key in plan.keys.items():
            need.update(key[1:] if domain in plan.reuse else key)
        need.discard("")
        plan.blobs = self.mirror.cat_blobs(sorted(need))
        plan.blobs[""] = b""
        for domain in sorted(plan.tree):
            if domain in plan.reuse:
                plan.counts[domain] = int(plan.prev_files[domain][3])
            else:
                p_oid, m_oid, d_oid = plan.keys[domain]
                plan.counts[domain] = validate_domain(domain, plan.blobs[p_oid], plan.blobs[m_oid], plan.blobs[d_oid],
                                                      self.cfg.mail_root)

    def _write_passwd(self, plan: _Plan, domain: str, target: str) -> None:
        if domain in plan.reuse:
            try:
                os.link(os.path.join(plan.prev_passwd_dir, domain), target)
                return
            except OSError:
                pass
        p_oid = plan.keys[domain][0]
        if p_oid not in plan.blobs:
            plan.blobs.update(self.mirror.cat_blobs([p_oid]))
        write_file(target, plan.blobs[p_oid], 0o640 if self.cfg.passwd_group else 0o644)
        if plan.gid >= 0:
            os.chown(target, 0 if os.geteuid() == 0 else -1, plan.gid)

    def _write(self, tmp: str, sha: str, plan: _Plan) -> dict[str, Any]:
        passwd_dir = os.path.join(tmp, "dovecot", "passwd.d")
        os.makedirs(os.path.join(tmp, "postfix"), mode=0o755)
        os.makedirs(passwd_dir, mode=0o755)
        plan.gid = grp.getgrnam(self.cfg.passwd_group).gr_gid if self.cfg.passwd_group else -1
        files_manifest: dict[str, list[Any]] = {}
        vmd_parts: list[bytes] = []
        vmm_parts: list[bytes] = []
        for domain in sorted(plan.tree):
            p_oid, m_oid, d_oid = plan.keys[domain]
            self._write_passwd(plan, domain, os.path.join(passwd_dir, domain))
            files_manifest[domain] = [p_oid, m_oid, d_oid, plan.counts[domain]]
            for part, lst in ((plan.blobs[d_oid], vmd_parts), (plan.blobs[m_oid], vmm_parts)):
                if part and not part.endswith(b"\n"):
                    part += b"\n"
                lst.append(part)
        write_file(os.path.join(tmp, "postfix", "virtual_mailbox_domains"), b"".join(vmd_parts))
        write_file(os.path.join(tmp, "postfix", "virtual_mailbox_maps"), b"".join(vmm_parts))
        self.postmap(tmp)
        manifest = self._manifest_for(sha, files_manifest, len(plan.reuse))
        write_file(os.path.join(tmp, "MANIFEST.json"), (json.dumps(manifest, sort_keys=True) + "\n").encode())
        write_file(os.path.join(tmp, "COMMIT"), (sha + "\n").encode())
        return manifest

    def _manifest_for(self, sha: str, files: dict[str, list[Any]], reused: int) -> dict[str, Any]:
        """MANIFEST.json: per-service digests decide which services a swap reloads."""
        return {
            "commit": sha,
            "built_at": utcnow(),
            "map_type": self.cfg.map_type,
            "reuse_key": self.reuse_key(),
            "postfix_digest": digest([(d, f"{v[1]} {v[2]}".encode()) for d, v in files.items()]
                                     + [("\0map_type", self.cfg.map_type.encode())]),
            "dovecot_digest": digest([(d, v[0].encode()) for d, v in files.items()]),
            "domains": len(files),
            "mailboxes": sum(int(v[3]) for v in files.values()),
            "reused_domains": reused,
            "files": files,
        }

    def postmap(self, release: str) -> None:
        if self.cfg.map_type not in POSTMAP_TYPES:
            return
        base = shlex.split(self.cfg.postmap)
        for name in MAP_FILES:
            target = "{}:{}".format(self.cfg.map_type, os.path.join(release, "postfix", name))
            r = self.runner.run([*base, target], timeout=600)
            if r.returncode != 0:
                detail = short(r.stderr) or f"rc={r.returncode}"
                raise TickError(f"postmap {name} failed: {detail}")

    def remove(self, sha: str) -> None:
        rmtree(os.path.join(self.dir, sha))

    # ---- current / swap

    def current_commit(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if SHA_RE.match(name) and os.path.isdir(os.path.join(self.dir, name)):
            return name
        return None

    def exists(self, sha: str) -> bool:
        return os.path.isdir(os.path.join(self.dir, sha))

    def swap_to(self, sha: str | None) -> None:
        """Point ``current`` at releases/<sha> atomically (or remove it if sha is None)."""
        if sha is None:
            try:
                os.unlink(self.current)
            except FileNotFoundError:
                pass
            fsync_dir(self.root)
            return
        tmp = os.path.join(self.root, f".current.tmp-{os.getpid()}")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(os.path.join("releases", sha), tmp)
        os.replace(tmp, self.current)
        fsync_dir(self.root)

    def manifest(self, sha: str | None) -> dict[str, Any]:
        if not sha:
            return {}
        try:
            with open(os.path.join(self.dir, sha, "MANIFEST.json"), encoding="utf-8") as fh:
                m = json.load(fh)
                return m if isinstance(m, dict) else {}
        except (OSError, ValueError):
            return {}

    def reload(self, which: Sequence[str]) -> list[str]:
        """Run the reload commands for ``which``; return failure messages."""
        failures = []
        for svc in which:
            cmd = self.cfg.postfix_reload if svc == "postfix" else self.cfg.dovecot_reload
            if not cmd:
                self.log.debug(f"no {svc}_reload command configured; not reloading {svc}")
                continue
            r = self.runner.shell(cmd, timeout=self.cfg.reload_timeout)
            if r.returncode != 0:
                failures.append(f"{svc} reload failed (rc={r.returncode}): {short(r.stderr + r.stdout, 200)}")
        return failures

    # ---- prune

    def prune(self, st: dict[str, Any]) -> None:
        """Keep ``keep_releases`` (plus current, applied and previous good); drop the rest."""
        keep = set(st["history"][: self.cfg.keep_releases])
        for s in (self.current_commit(), st.get("applied_commit"), st.get("previous_commit")):
            if s:
                keep.add(s)
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if name in keep:
                continue
            path = os.path.join(self.dir, name)
            try:
                rmtree(path)
                self.log.debug(f"pruned release {name}")
            except OSError as e:
                self.log.warning(f"cannot prune {path}: {e}")
        st["history"] = [s for s in st["history"] if s in keep or os.path.isdir(os.path.join(self.dir, s))]
