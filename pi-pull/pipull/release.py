"""Releases under ``<root>/releases/<sha>``: build from git blobs, validate, postmap, swap, reload, prune."""

from __future__ import annotations

import grp
import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import buckets, fleetfiles
from .aliasmap import ALIAS_MAP, write_alias_maps
from .config import POSTMAP_TYPES, Config
from .errors import Refused, TickError
from .fsutil import digest, fsync_dir, open_new, rmtree, utcnow, write_file
from .mirror import SHA_RE, BlobReader, Mirror
from .rules import is_domain
from .runner import Runner, short
from .sendermap import SENDER_MAP, write_sender_maps
from .services import explain_reload_failure
from .verify import DomainCheck, feed

MAP_FILES = ("virtual_mailbox_domains", "virtual_mailbox_maps")
DOMAIN_FILES = ("passwd", "mailboxes", fleetfiles.HOME, *buckets.FRAGMENT_MAPS)
REQUIRED_FILES = ("passwd", *MAP_FILES)
if SENDER_MAP not in DOMAIN_FILES:  # the sender-login fragment (pipull/sendermap.py)
    DOMAIN_FILES = (*DOMAIN_FILES, SENDER_MAP)
# Bump when validation gets stricter: releases built by an older validator are then not reused.
VALIDATOR_VERSION = 3
# The Postfix maps a node derives from the domains' home fragments (pipull/fleetfiles.py).
DERIVED_MAPS = fleetfiles.DERIVED_MAPS
LISTINGS_KEPT = 4  # tip + live release per tick, with room to spare


DOMAINS_MAP = "virtual_mailbox_domains"
MAX_DOMAINS_BYTES = 64 * 1024 * 1024


def domain_list_version(release: str) -> str:
    """A value that changes whenever ``release_domains(release)`` may answer differently; cheap.

    One table a map: the release itself (a commit's domains never change). Bucketed: the ids of
    its ``virtual_mailbox_domains`` tables in MANIFEST.json, which change only when a table's
    domains did, so an apply that adds a mailbox costs the caller no listing."""
    if os.path.isfile(os.path.join(release, "postfix", DOMAINS_MAP)):
        return "release " + os.path.basename(os.path.realpath(release))
    manifest = _read_manifest(release)
    if manifest.get("layout") != buckets.LAYOUT:
        return "none"
    tables = manifest.get("tables")
    ids = (
        sorted(f"{k}={v}" for k, v in tables.items() if k.startswith(DOMAINS_MAP + "."))
        if isinstance(tables, dict)
        else []
    )
    return "tables " + " ".join(ids)


def release_domains(release: str, cfg: Config, runner: Runner) -> list[str]:
    """Every domain of the release at ``release`` (e.g. ``<root>/current``), sorted: the domains
    Postfix takes as its own (``virtual_mailbox_domains``: every email-enabled domain, alias domains
    included), whatever the layout. The one place that knows where a release keeps them:

    * one table a map (``map_buckets = 0``, any map type): the text ``postfix/virtual_mailbox_domains``;
    * bucketed (``buckets.py``): no text source, so ``postmap -s`` of each of its N tables;
    * anything else (no release yet, or install's empty placeholder tables): no domain.

    Raises TickError when a table cannot be read."""
    text = os.path.join(release, "postfix", DOMAINS_MAP)
    manifest = {} if os.path.isfile(text) else _read_manifest(release)
    if manifest.get("layout") == buckets.LAYOUT:
        map_type = str(manifest.get("map_type") or cfg.map_type)
        dumps = []
        for k in range(int(manifest.get("map_buckets") or 0)):
            table = os.path.join(release, "postfix", buckets.table_name(DOMAINS_MAP, k))
            r = runner.run([*shlex.split(cfg.postmap), "-s", f"{map_type}:{table}"], timeout=600)
            if r.returncode != 0:
                raise TickError(f"postmap -s {table} failed: {short(r.stderr) or f'rc={r.returncode}'}")
            dumps.append(r.stdout)
        data = b"".join(dumps)
    else:
        try:
            with open(text, "rb") as fh:
                data = fh.read(MAX_DOMAINS_BYTES)
        except FileNotFoundError:
            return []
    names = (line.split(None, 1)[0].decode("ascii", "replace") for line in data.splitlines() if line.strip())
    return sorted({name for name in names if is_domain(name)})  # validated when built; a path is made of it too


def _read_manifest(release: str) -> dict[str, Any]:
    try:
        with open(os.path.join(release, "MANIFEST.json"), encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


@dataclass
class _Plan:
    """What a build needs: each domain's blob ids (passwd, maps, domains, mailboxes), what is reused."""

    tree: dict[str, dict[str, str]]
    keys: dict[str, list[str]] = field(default_factory=dict)
    reuse: set[str] = field(default_factory=set)
    prev_files: dict[str, list[Any]] = field(default_factory=dict)
    prev_passwd_dir: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    gid: int = -1
    homes: dict[str, str] = field(default_factory=dict)  # domain -> its home fragment's blob id


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
        # Listings by commit id: a commit's tree never changes, and one apply asks for the tip's
        # and the live release's up to three times each (build, before_swap, after_reload and
        # its sweep); the four repeats cost ~1 s of ls-tree + parsing at 100k mailboxes.
        self._listings: dict[str, dict[str, dict[str, str]]] = {}
        # Per tick: MANIFEST.json by commit (the build and the agent both ask for the live one),
        # diff-tree results by (old, new), and per-domain listings (build and lifecycle share them).
        self._manifests: dict[str, dict[str, Any]] = {}
        self._changes: dict[tuple[str, str], dict[str, dict[str, tuple[str, str]]]] = {}
        self._domain_files: dict[str, dict[str, dict[str, str]]] = {}
        self._good_domains: set[str] = set()  # names is_domain() accepted (as rendered/domains/<its bb>/<name>)
        self._fleets: dict[str, fleetfiles.Fleet] = {}
        self.fleet = fleetfiles.Fleet()  # the fleet of the commit being built (build() sets it)

    # ---- read rendered/ from git

    def list_rendered(self, sha: str) -> dict[str, dict[str, str]]:
        """Blob ids of each domain's rendered files: {domain: {file name: blob id}}.

        Sizes are checked when a blob is read (the ``cat-file --batch`` header comes first): a
        file over ``[limits] max_file_mb`` is refused before a byte of it is read. (``ls-tree -l``
        would measure them here, but costs ~20x the listing at 100k mailboxes.)

        A listing is validated once and remembered for the life of this object (one tick):
        the result is shared, callers must not modify it. Only listings that passed are kept.
        """
        cached = self._listings.get(sha)
        if cached is not None:
            return cached
        wanted = self._list_rendered(sha)
        if len(self._listings) >= LISTINGS_KEPT:
            self._listings.pop(next(iter(self._listings)))
        self._listings[sha] = wanted
        return wanted

    def _list_rendered(self, sha: str) -> dict[str, dict[str, str]]:
        r = self.mirror.git("ls-tree", "-r", "-z", sha, "--", "rendered/domains/")
        if r.returncode != 0:
            raise TickError(f"git ls-tree {sha[:12]} failed: {short(r.stderr)}")
        wanted: dict[str, dict[str, str]] = {}
        for entry in r.stdout.split(b"\0"):
            if entry:
                self._add_tree_entry(wanted, entry)
        for domain, files in wanted.items():
            for name in REQUIRED_FILES:
                if name not in files:
                    raise Refused(f"rendered/ for {domain} lacks {name}")
        return wanted

    def _add_tree_entry(self, wanted: dict[str, dict[str, str]], entry: bytes) -> None:
        meta, _, pathb = entry.partition(b"\t")
        try:
            mode, otype, oid = meta.decode("ascii").split()
            path = pathb.decode("utf-8")
        except (UnicodeDecodeError, ValueError):
            raise Refused("undecodable tree entry under rendered/") from None
        place = self._rendered_path(path)
        if place is None:
            return
        if otype != "blob" or mode not in ("100644", "100755"):
            raise Refused(f"{path} is not a regular file (mode {mode})")
        wanted.setdefault(place[0], {})[place[1]] = oid

    def _rendered_path(self, path: str) -> tuple[str, str] | None:
        """(domain, file name) of ``rendered/domains/<bb>/<domain>/<file>``; None for a path pi-pull ignores."""
        parts = path.split("/")
        if len(parts) != 5 or parts[4] not in DOMAIN_FILES:
            self.log.debug(f"ignoring rendered path {path}")
            return None
        bb, domain, fname = parts[2], parts[3], parts[4]
        if domain not in self._good_domains:  # ~5 files a domain: its name is checked once
            if not is_domain(domain) or bb != domain[:2]:
                raise Refused("unsafe or misplaced domain directory {!r}".format("/".join(parts[:4])))
            self._good_domains.add(domain)
        return domain, fname

    def changes(self, old: str, new: str) -> dict[str, dict[str, tuple[str, str]]]:
        """{domain: {file name: (old blob id or "", new blob id or "")}} of the rendered files that differ.

        ``git diff-tree -r`` compares the two trees and skips every subtree whose id is equal, so
        this costs what changed, not the size of the state. Cached for the tick (shared, read-only).
        """
        key = (old, new)
        cached = self._changes.get(key)
        if cached is not None:
            return cached
        r = self.mirror.git(
            "diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new, "--", "rendered/domains/"
        )
        if r.returncode != 0:
            raise TickError(f"git diff-tree {old[:12]} {new[:12]} failed: {short(r.stderr)}")
        out: dict[str, dict[str, tuple[str, str]]] = {}
        fields = r.stdout.split(b"\0")
        zero = "0" * 40
        for i in range(0, len(fields) - 1, 2):
            try:
                meta, path = fields[i].decode("ascii"), fields[i + 1].decode("utf-8")
                _mode_a, mode_b, oid_a, oid_b, _status = meta.lstrip(":").split()
            except (UnicodeDecodeError, ValueError):
                raise Refused("undecodable diff entry under rendered/") from None
            place = self._rendered_path(path)
            if place is None:
                continue
            if oid_b.strip("0") and mode_b not in ("100644", "100755"):
                raise Refused(f"{path} is not a regular file (mode {mode_b})")
            out.setdefault(place[0], {})[place[1]] = (
                "" if oid_a == zero[: len(oid_a)] else oid_a,
                "" if oid_b == zero[: len(oid_b)] else oid_b,
            )
        self._changes[key] = out
        return out

    def domain_files(self, sha: str, domains: Sequence[str]) -> dict[str, dict[str, str]]:
        """{domain: {file name: blob id}} for the given domains of ``sha`` (absent: not in that commit).

        One ``ls-tree`` with a pathspec per domain: O(the domains asked for). Above a few thousand
        domains the whole listing is cheaper and is used instead.
        """
        if sha in self._listings:
            full = self._listings[sha]
            return {d: full[d] for d in domains if d in full}
        cache = self._domain_files.setdefault(sha, {})
        missing = [d for d in domains if d not in cache]
        if len(missing) > buckets.PATHSPECS_PER_CALL:
            full = self.list_rendered(sha)
            return {d: full[d] for d in domains if d in full}
        if missing:
            specs = [f"rendered/domains/{d[:2]}/{d}/" for d in missing if is_domain(d)]
            r = self.mirror.git("ls-tree", "-r", "-z", sha, "--", *specs)
            if r.returncode != 0:
                raise TickError(f"git ls-tree {sha[:12]} failed: {short(r.stderr)}")
            found: dict[str, dict[str, str]] = {}
            for entry in r.stdout.split(b"\0"):
                if entry:
                    self._add_tree_entry(found, entry)
            for domain, files in found.items():
                for name in REQUIRED_FILES:
                    if name not in files:
                        raise Refused(f"rendered/ for {domain} lacks {name}")
            for d in missing:
                cache[d] = found.get(d, {})
        return {d: cache[d] for d in domains if cache.get(d)}

    def reuse_key(self) -> str:
        # The derived transport lines depend on who this node is and on the relay port.
        return json.dumps(
            [
                VALIDATOR_VERSION,
                self.cfg.passwd_group,
                self.cfg.mail_root,
                self.cfg.mail_uid,
                self.cfg.mail_gid,
                self.cfg.node_name,
                self.cfg.fleet_relay_port,
            ]
        )

    # ---- the fleet (pipull/fleetfiles.py)

    def top_files(self, sha: str, names: Sequence[str]) -> dict[str, bytes]:
        """The blobs of top-level rendered files (rendered/nodes, nodes.pem, moves) of ``sha``, as present."""
        r = self.mirror.git("ls-tree", "-z", sha, "--", *names)
        if r.returncode != 0:
            raise TickError(f"git ls-tree {sha[:12]} failed: {short(r.stderr)}")
        oids: dict[str, str] = {}
        for entry in r.stdout.split(b"\0"):
            if entry:
                meta, _, path = entry.partition(b"\t")
                mode, otype, oid = meta.decode("ascii").split()
                if otype != "blob" or mode not in ("100644", "100755"):
                    raise Refused(f"{path.decode('utf-8', 'replace')} is not a regular file")
                oids[path.decode("utf-8")] = oid
        if not oids:
            return {}
        with self.mirror.batch() as cat:
            return {p: cat.read(oid, p, fleetfiles.MAX_FLEET_BYTES) for p, oid in oids.items()}

    def fleet_of(self, sha: str) -> fleetfiles.Fleet:
        """rendered/nodes (+ nodes.pem) of ``sha``, validated with rendered/moves and rendered/replicas;
        cached for the tick."""
        cached = self._fleets.get(sha)
        if cached is None:
            names = (fleetfiles.NODES_FILE, fleetfiles.NODES_PEM, fleetfiles.MOVES_FILE, fleetfiles.REPLICAS_FILE)
            found = self.top_files(sha, names)
            cached = fleetfiles.parse_fleet(found.get(fleetfiles.NODES_FILE), found.get(fleetfiles.NODES_PEM))
            fleetfiles.parse_moves(found.get(fleetfiles.MOVES_FILE), cached)
            fleetfiles.parse_replicas(found.get(fleetfiles.REPLICAS_FILE), cached)
            self._fleets[sha] = cached
        return cached

    def home_of(self, cat: BlobReader, domain: str, files: dict[str, str]) -> tuple[str, str] | None:
        """(home, address) from the domain's home fragment, validated against ``self.fleet``."""
        oid = files.get(fleetfiles.HOME)
        if not oid:
            return None
        data = cat.read(oid, f"rendered/domains/{domain[:2]}/{domain}/{fleetfiles.HOME}", self.cfg.max_file_bytes)
        home = fleetfiles.parse_home(domain, data, self.fleet)
        return home.home, home.address

    # ---- build

    def build(self, sha: str, previous: str | None) -> dict[str, Any]:
        """Materialise rendered/ of ``sha`` into releases/<sha> (validated, postmapped).

        Every file is streamed from git, validated line by line as it is written (constant
        memory whatever its size), into a build directory beside releases/ that becomes
        releases/<sha> only when everything passed: a refused commit leaves releases/ untouched.

        Domains whose blobs are unchanged since ``previous`` (the live release) are not
        re-validated: their passwd-file is hard-linked from it, so a one-mailbox change costs
        little even with 100k mailboxes, and unchanged files keep their mtime.
        """
        final = os.path.join(self.dir, sha)
        tmp = os.path.join(self.root, f".build-{sha[:12]}-{os.getpid()}")
        for top in (self.root, os.path.join(self.root, buckets.STORE)):
            for name in os.listdir(top) if os.path.isdir(top) else ():
                if name.startswith(".build-"):  # left by a run that died mid-build
                    shutil.rmtree(os.path.join(top, name), ignore_errors=True)
        self._manifests.pop(sha, None)
        self.fleet = self.fleet_of(sha)
        try:
            if self.cfg.map_buckets > 0:
                manifest = self._write_bucketed(tmp, sha, previous)
            else:
                manifest = self._write(tmp, sha, self._plan(sha, previous))
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            if os.path.lexists(final):
                rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _write_bucketed(self, tmp: str, sha: str, previous: str | None) -> dict[str, Any]:
        """The bucketed layout (pipull/buckets.py): cost follows the change."""
        gid = grp.getgrnam(self.cfg.passwd_group).gr_gid if self.cfg.passwd_group else -1
        manifest = buckets.BucketBuild(self, sha, previous, tmp).run(gid)
        write_file(os.path.join(tmp, "MANIFEST.json"), (json.dumps(manifest, sort_keys=True) + "\n").encode())
        write_file(os.path.join(tmp, "COMMIT"), (sha + "\n").encode())
        return manifest

    def _plan(self, sha: str, previous: str | None) -> _Plan:
        plan = _Plan(tree=self.list_rendered(sha))
        prev = self.manifest(previous)
        same_fleet = self.fleet.keeps(prev.get("fleet", []))
        if (
            previous
            and prev.get("reuse_key") == self.reuse_key()
            and isinstance(prev.get("files"), dict)
            and same_fleet
        ):
            plan.prev_files = prev["files"]
        plan.prev_passwd_dir = os.path.join(self.dir, previous or "-", "dovecot", "passwd.d")
        for domain, files in plan.tree.items():
            key = [
                files["passwd"],
                files["virtual_mailbox_maps"],
                files["virtual_mailbox_domains"],
                files.get("mailboxes", ""),
            ]
            plan.keys[domain] = key
            if files.get(fleetfiles.HOME):
                plan.homes[domain] = files[fleetfiles.HOME]
            old = plan.prev_files.get(domain)
            prev_homes: dict[str, Any] = prev["homes"] if isinstance(prev.get("homes"), dict) else {}
            if (
                isinstance(old, list)
                and len(old) >= 4
                and old[:3] == key[:3]
                and (old[4:5] or [""]) == key[3:4]
                and prev_homes.get(domain, "") == plan.homes.get(domain, "")
                and os.path.isfile(os.path.join(plan.prev_passwd_dir, domain))
            ):
                plan.reuse.add(domain)
        return plan

    def _stream(
        self, cat: BlobReader, check: DomainCheck | None, fname: str, oid: str, domain: str, out: BinaryIO | None
    ) -> None:
        """Copy one blob into ``out`` (if any), validating its lines with ``check`` (if any)."""
        what = f"rendered/domains/{domain[:2]}/{domain}/{fname}"
        chunks = cat.stream(oid, what, self.cfg.max_file_bytes)
        if check is None:
            for chunk in chunks:
                if out is not None:
                    out.write(chunk)
            return

        def tee() -> Iterator[bytes]:
            for chunk in chunks:
                if out is not None:
                    out.write(chunk)
                yield chunk

        feed(check, fname, tee())

    def _write_passwd(self, plan: _Plan, cat: BlobReader, check: DomainCheck | None, domain: str, target: str) -> None:
        with open_new(target, 0o640 if self.cfg.passwd_group else 0o644) as out:
            self._stream(cat, check, "passwd", plan.keys[domain][0], domain, out)
        if plan.gid >= 0:
            os.chown(target, 0 if os.geteuid() == 0 else -1, plan.gid)

    def _write(self, tmp: str, sha: str, plan: _Plan) -> dict[str, Any]:
        passwd_dir = os.path.join(tmp, "dovecot", "passwd.d")
        os.makedirs(os.path.join(tmp, "postfix"), mode=0o755)
        os.makedirs(passwd_dir, mode=0o755)
        plan.gid = grp.getgrnam(self.cfg.passwd_group).gr_gid if self.cfg.passwd_group else -1
        files_manifest: dict[str, list[Any]] = {}
        order: list[str] = []  # every blob the loop below reads, in its order: requested up front
        for domain in sorted(plan.tree):
            p_oid, m_oid, d_oid, b_oid = plan.keys[domain]
            fresh = domain not in plan.reuse
            order += [plan.homes[domain]] if domain in plan.homes else []
            order += ([p_oid] if fresh else []) + [m_oid, d_oid] + ([b_oid] if fresh and b_oid else [])
        with (
            self.mirror.batch(order) as cat,
            open_new(os.path.join(tmp, "postfix", "virtual_mailbox_domains"), 0o644) as vmd,
            open_new(os.path.join(tmp, "postfix", "virtual_mailbox_maps"), 0o644) as vmm,
            open_new(os.path.join(tmp, "postfix", fleetfiles.TRANSPORT_MAP), 0o644) as transport,
            open_new(os.path.join(tmp, "postfix", fleetfiles.DEFER_MAP), 0o644) as defer,
            open_new(os.path.join(tmp, "dovecot", fleetfiles.PROXY_PASSDB), 0o644) as proxy,
        ):
            links: list[str] = []
            for domain in sorted(plan.tree):
                p_oid, m_oid, d_oid, b_oid = plan.keys[domain]
                home = self.home_of(cat, domain, plan.tree[domain])
                derived = fleetfiles.derived_lines(domain, home, self.cfg.node_name, self.cfg.fleet_relay_port)
                transport.write(derived[fleetfiles.TRANSPORT_MAP])
                defer.write(derived[fleetfiles.DEFER_MAP])
                proxy.write(derived[fleetfiles.PROXY_PASSDB])
                fresh = domain not in plan.reuse
                check = DomainCheck(domain, self.cfg, format2=bool(b_oid), home=home) if fresh else None
                if check is None:
                    links.append(domain)  # linked once everything validated: a refused build touches no live file
                else:
                    self._write_passwd(plan, cat, check, domain, os.path.join(passwd_dir, domain))
                self._stream(cat, check, "virtual_mailbox_maps", m_oid, domain, vmm)
                self._stream(cat, check, "virtual_mailbox_domains", d_oid, domain, vmd)
                if b_oid and check is not None:
                    self._stream(cat, check, "mailboxes", b_oid, domain, None)
                count = int(plan.prev_files[domain][3]) if check is None else check.finish()
                plan.counts[domain] = count
                files_manifest[domain] = [p_oid, m_oid, d_oid, count] + ([b_oid] if b_oid else [])
            for domain in links:
                target = os.path.join(passwd_dir, domain)
                try:
                    os.link(os.path.join(plan.prev_passwd_dir, domain), target)
                except OSError:
                    home = self.home_of(cat, domain, plan.tree[domain])
                    again = DomainCheck(domain, self.cfg, format2=bool(plan.keys[domain][3]), home=home)
                    self._write_passwd(plan, cat, again, domain, target)
            # Last, so the blobs read above keep their order; always validated (the fragments are small).
            alias_maps = write_alias_maps(cat, plan.tree, tmp, self.cfg.max_file_bytes)
            sender_maps = write_sender_maps(cat, plan.tree, tmp, self.cfg.max_file_bytes)
        self.postmap(tmp)
        manifest = self._manifest_for(sha, files_manifest, len(plan.reuse), alias_maps, sender_maps, plan.homes)
        write_file(os.path.join(tmp, "MANIFEST.json"), (json.dumps(manifest, sort_keys=True) + "\n").encode())
        write_file(os.path.join(tmp, "COMMIT"), (sha + "\n").encode())
        return manifest

    def _manifest_for(
        self,
        sha: str,
        files: dict[str, list[Any]],
        reused: int,
        alias_maps: dict[str, str] | None = None,
        sender_maps: dict[str, str] | None = None,
        homes: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """MANIFEST.json: per-service digests decide which services a swap reloads."""
        alias_maps = alias_maps or {}
        sender_maps = sender_maps or {}
        homes = homes or {}
        return {
            "commit": sha,
            "built_at": utcnow(),
            "map_type": self.cfg.map_type,
            "reuse_key": self.reuse_key(),
            "postfix_digest": digest(
                [(d, f"{v[1]} {v[2]}".encode()) for d, v in files.items()]
                + [("\0map_type", self.cfg.map_type.encode())]
                + [("\0alias " + d, oid.encode()) for d, oid in sorted(alias_maps.items())]
                + [("\0sender " + d, oid.encode()) for d, oid in sorted(sender_maps.items())]
                + [("\0home " + d, oid.encode()) for d, oid in sorted(homes.items())]
            ),
            "dovecot_digest": digest([(d, v[0].encode()) for d, v in files.items()]),
            "domains": len(files),
            "mailboxes": sum(int(v[3]) for v in files.values()),
            "reused_domains": reused,
            "files": files,
            "alias_maps": alias_maps,
            "sender_maps": sender_maps,
            "homes": homes,
            "fleet": self.fleet.addresses(),
        }

    def postmap(self, release: str) -> None:
        if self.cfg.map_type not in POSTMAP_TYPES:
            return
        base = shlex.split(self.cfg.postmap)
        for name in (*MAP_FILES, ALIAS_MAP, SENDER_MAP, *DERIVED_MAPS):
            target = "{}:{}".format(self.cfg.map_type, os.path.join(release, "postfix", name))
            r = self.runner.run([*base, target], timeout=600)
            if r.returncode != 0:
                detail = short(r.stderr) or f"rc={r.returncode}"
                raise TickError(f"postmap {name} failed: {detail}")

    def remove(self, sha: str) -> None:
        self._manifests.pop(sha, None)
        rmtree(os.path.join(self.dir, sha))

    # ---- current / swap

    def current_commit(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if SHA_RE.match(name) and os.path.isdir(os.path.join(self.dir, name)):
            for mapname in (ALIAS_MAP, SENDER_MAP, *DERIVED_MAPS):
                self._ensure_alias_map(name, mapname)
            return name
        return None

    def _ensure_alias_map(self, sha: str, mapname: str = ALIAS_MAP) -> None:
        """A release built by a pi-pull without alias (or sender-login) maps gets an empty one
        (what that pi-pull applied), so the main.cf line ``virtual_alias_maps`` (or
        ``smtpd_sender_login_maps``) never names a missing table."""
        path = os.path.join(self.dir, sha, "postfix", mapname)
        if os.path.lexists(path) or self.manifest(sha).get("layout") == buckets.LAYOUT:
            return  # a bucketed release has every table of every map (pipull/buckets.py)
        try:
            write_file(path, b"")
            if self.cfg.map_type in POSTMAP_TYPES:
                self.runner.run([*shlex.split(self.cfg.postmap), f"{self.cfg.map_type}:{path}"], timeout=600)
        except OSError as e:
            self.log.warning(f"could not add an empty {mapname} to release {sha[:12]}: {e}")

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
        """releases/<sha>/MANIFEST.json ({} if missing or unreadable); read once per tick (shared, read-only)."""
        if not sha:
            return {}
        cached = self._manifests.get(sha)
        if cached is not None:
            return cached
        try:
            with open(os.path.join(self.dir, sha, "MANIFEST.json"), encoding="utf-8") as fh:
                m = json.load(fh)
        except (OSError, ValueError):
            return {}
        m = m if isinstance(m, dict) else {}
        self._manifests[sha] = m
        return m

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
                # postfix prints nothing when stderr is not a terminal: say what is wrong instead.
                failures.append(explain_reload_failure(svc, cmd, r, self.runner))
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
                self._manifests.pop(name, None)
                rmtree(path)
                self.log.debug(f"pruned release {name}")
            except OSError as e:
                self.log.warning(f"cannot prune {path}: {e}")
        st["history"] = [s for s in st["history"] if s in keep or os.path.isdir(os.path.join(self.dir, s))]
        try:
            buckets.collect_garbage(self.root, self.dir)
        except OSError as e:
            self.log.warning(f"cannot delete unused passwd buckets in {buckets.PASSWD_STORE}: {e}")
