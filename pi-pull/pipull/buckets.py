"""The bucketed release layout (``[services] map_buckets = N``, N >= 1): an apply costs what changed.

With ``map_buckets = 0`` (configs from before it) a release holds one table per map, the
concatenation of every domain's fragment, postmapped whole, and a flat ``passwd.d/<domain>``
that is hard-linked file by file: both O(domains) on every apply (release.py). With N >= 1:

* **Postfix**: each map built from per-domain fragments (``FRAGMENT_MAPS``: virtual_mailbox_domains,
  virtual_mailbox_maps, virtual_alias_maps, and sender_login_maps where the commit carries it) is
  N tables ``postfix/<map>.<kk>`` (``kk`` two hex digits), and domain ``d`` lives in table
  ``bucket_of(d, N)``. main.cf lists the N tables of a map (``postfix_map_list``); Postfix
  searches them in order and takes the first match, and every key is in at most one table, so
  the N tables answer exactly what the one concatenated table answered. A table whose domains did not change is hard-linked
  from the live release. A changed one is copied (a new inode: the live file is never written) and
  updated in place with ``postmap -d -`` (keys that went away) then ``postmap -i -r`` (lines that
  are new or changed), computed from the old and the new fragment of each changed domain.
  Only map types that ``postmap -i`` updates in place qualify (``INCREMENTAL_TYPES``). There is no
  text source beside the tables (it would have to be rewritten whole): ``postmap -s`` dumps one.
* **Dovecot**: ``dovecot/passwd.d/<c>/<bb>/<domain>`` where ``c`` and ``bb`` are the domain's
  first one and two characters (``bb`` as in ``rendered/domains/<bb>/``; Dovecot's
  ``passwd.d/%1d/%2d/%d``). ``passwd.d/<c>`` is a symlink to an immutable index directory
  ``<root>/store/index/<c>.<id>`` whose entries are symlinks to immutable bucket directories
  ``<root>/store/passwd/<bb>.<id>``, shared by every release whose passwd-files of that bucket
  are the same. A change rebuilds only the buckets of the domains whose passwd changed (hard
  links for the bucket's other domains) and the index of their first character.
* **What changed** comes from ``git diff-tree -r`` between the live commit and the tip
  (git skips equal subtrees: O(change)), and only the changed domains are listed, read and
  validated. ``MANIFEST.json`` stays small: totals and one id per table and per passwd bucket.

Swap and rollback are as before: the release is built beside ``releases/``, new store
directories are moved in only once everything validated and postmapped, ``current`` moves by
one rename, and no file a live release uses is ever modified, so swapping back serves the
exact previous maps. Store directories no kept release points at are deleted after a prune.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from . import fleetfiles
from .aliasmap import ALIAS_MAP, check_bytes
from .bulkwrite import FileWriter
from .errors import Refused, TickError
from .fsutil import digest, open_new, rmtree, utcnow
from .mirror import BlobReader
from .runner import short
from .sendermap import SENDER_MAP, SenderCheck, alias_target, check_claims
from .sendermap import check_bytes as sender_check_bytes
from .verify import DomainCheck, feed

if TYPE_CHECKING:
    from .config import Config
    from .mirror import Mirror
    from .runner import Runner


class ReleaseSource(Protocol):
    """What a bucketed build reads from the release manager (release.Releases, which imports
    this module to run it, so the build names only the parts it uses)."""

    cfg: Config
    root: str
    dir: str
    fleet: fleetfiles.Fleet
    mirror: Mirror
    runner: Runner

    def manifest(self, sha: str | None) -> dict[str, Any]: ...
    def reuse_key(self) -> str: ...
    def list_rendered(self, sha: str) -> dict[str, dict[str, str]]: ...
    def changes(self, old: str, new: str) -> dict[str, dict[str, tuple[str, str]]]: ...
    def domain_files(self, sha: str, domains: Sequence[str]) -> dict[str, dict[str, str]]: ...
    def home_of(self, cat: BlobReader, domain: str, files: dict[str, str]) -> tuple[str, str] | None: ...


# Postfix maps assembled from one fragment per domain, in main.cf order. The first two are
# validated together with passwd (DomainCheck); the others alone (FRAGMENT_CHECKS).
FRAGMENT_MAPS: tuple[str, ...] = ("virtual_mailbox_domains", "virtual_mailbox_maps", ALIAS_MAP, SENDER_MAP)
DOMAIN_CHECKED = ("passwd", "virtual_mailbox_maps", "virtual_mailbox_domains", "mailboxes")
INCREMENTAL_TYPES = ("hash", "btree", "lmdb")
SUFFIXES = {"hash": (".db",), "btree": (".db",), "lmdb": (".lmdb",)}
LAYOUT = 2
STORE = "store"
PASSWD_STORE = os.path.join(STORE, "passwd")
INDEX_STORE = os.path.join(STORE, "index")
MAX_BUCKETS = 256
PATHSPECS_PER_CALL = 2000


def check_fragment(mapname: str, domain: str, data: bytes) -> SenderCheck | None:
    """Validate a fragment that is not part of DomainCheck (Refused on anything the compiler would not
    write); a sender-login fragment's check is returned (its claims on alias domains are checked later)."""
    if mapname == ALIAS_MAP:
        check_bytes(domain, data)
        return None
    if mapname == SENDER_MAP:
        return sender_check_bytes(domain, data)
    raise Refused(f"internal: no validator for {mapname}")  # pragma: no cover


def bucket_of(domain: str, n: int) -> int:
    """The table (0..n-1) that holds ``domain``'s lines: stable across runs, machines and Pythons."""
    return int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "big") % n if n > 1 else 0


def table_name(mapname: str, k: int) -> str:
    return f"{mapname}.{k:02x}"


def postfix_map_list(map_type: str, root: str, mapname: str, n: int) -> str:
    """The main.cf value that names the tables of ``mapname`` (what the bundle writes)."""
    base = f"{map_type}:{root.rstrip('/')}/current/postfix/"
    if n <= 0:
        return base + mapname
    return ", ".join(base + table_name(mapname, k) for k in range(n))


def fragment_keys(data: bytes) -> dict[bytes, bytes]:
    """{key: whole line} of a validated fragment (one ``key value`` per line)."""
    out: dict[bytes, bytes] = {}
    for line in data.split(b"\n"):
        if line:
            out[line.split(b" ", 1)[0]] = line
    return out


class _TableChange:
    __slots__ = ("deletes", "upserts")

    def __init__(self) -> None:
        self.deletes: list[bytes] = []
        self.upserts: list[bytes] = []


class BucketBuild:
    """Builds one release in the bucketed layout into ``tmp`` (see the module docstring)."""

    def __init__(self, rel: ReleaseSource, sha: str, live: str | None, tmp: str) -> None:
        self.rel = rel
        self.cfg = rel.cfg
        self.n = rel.cfg.map_buckets
        self.sha = sha
        self.live = live
        self.tmp = tmp
        self.store = os.path.join(rel.root, PASSWD_STORE)
        self.build_store = os.path.join(rel.root, STORE, f".build-{sha[:12]}-{os.getpid()}")
        self.tag = f"{sha[:12]}.{os.urandom(3).hex()}"
        self.mode = 0o640 if self.cfg.passwd_group else 0o644
        self.gid = -1
        self.maps = self._maps()
        self.tables: dict[str, str] = {}
        self.passwd_dirs: dict[str, str] = {}
        self.index_dirs: dict[str, str] = {}  # first character -> store/index/<c>.<tag> (symlinks to its bb dirs)
        self.domains = 0
        self.mailboxes = 0
        self.changed_domains = 0
        self.reloads: set[str] = set()
        self._fresh: set[str] = set()  # passwd buckets that get a new directory in this build
        # Dovecot's IMAP proxy passdb (pipull/fleetfiles.py PROXY_PASSDB): domain -> its line; None
        # while it is the live release's, unchanged (then it is hard-linked).
        self.proxy: dict[str, bytes] = {}
        self.proxy_changed: dict[str, bytes] = {}
        self.incremental = False

    def _maps(self) -> tuple[str, ...]:
        # The fleet's transport and defer maps are derived on the node from each domain's home
        # fragment (pipull/fleetfiles.py): bucketed like the fragment maps, by domain.
        return (*FRAGMENT_MAPS, *fleetfiles.DERIVED_MAPS)

    def _derived(self, domain: str, home: tuple[str, str] | None) -> dict[str, bytes]:
        return fleetfiles.derived_lines(domain, home, self.cfg.node_name, self.cfg.fleet_relay_port)

    # ---- entry point

    def run(self, gid: int) -> dict[str, Any]:
        self.gid = gid
        os.makedirs(os.path.join(self.tmp, "postfix"), mode=0o755)
        os.makedirs(os.path.join(self.tmp, "dovecot", "passwd.d"), mode=0o755)
        shutil.rmtree(self.build_store, ignore_errors=True)
        os.makedirs(self.build_store, mode=0o755)
        try:
            prev = self.rel.manifest(self.live)
            if self._can_follow(prev):
                self._incremental(prev)
            else:
                self._full()
            self._link_passwd_dirs()
            self._write_proxy_passdb(prev)
            self._publish_store()
        finally:
            shutil.rmtree(self.build_store, ignore_errors=True)
        return self._manifest(prev)

    def _write_proxy_passdb(self, prev: dict[str, Any]) -> None:
        """``dovecot/proxy.imap``: one line per domain homed on another node, sorted. An incremental
        build that changed no home links the live one; one that did reads it and applies the change."""
        target = os.path.join(self.tmp, "dovecot", fleetfiles.PROXY_PASSDB)
        live = os.path.join(self.rel.dir, self.live or "-", "dovecot", fleetfiles.PROXY_PASSDB)
        if self.incremental:
            if not self.proxy_changed and os.path.isfile(live):
                os.link(live, target)
                return
            try:
                with open(live, "rb") as fh:
                    for line in fh:
                        self.proxy[line.split(b":", 1)[0].decode("ascii", "replace")] = line
            except FileNotFoundError:
                pass
            self.proxy.update(self.proxy_changed)
        with open_new(target, 0o644) as out:
            for domain in sorted(self.proxy):
                out.write(self.proxy[domain])

    def _can_follow(self, prev: dict[str, Any]) -> bool:
        """Can this build start from the live release (same layout, validator and settings, every table there)?"""
        if not self.live or prev.get("layout") != LAYOUT or prev.get("reuse_key") != self.rel.reuse_key():
            return False
        if not self.rel.fleet.keeps(prev.get("fleet", [])):
            return False  # a node went or changed its address: every domain's home is checked again
        tables, dirs, index = prev.get("tables"), prev.get("passwd_dirs"), prev.get("index_dirs")
        if not isinstance(tables, dict) or not isinstance(dirs, dict) or not isinstance(index, dict):
            return False
        if not all(
            isinstance(v, str) and os.path.isdir(os.path.join(self.rel.root, INDEX_STORE, v)) for v in index.values()
        ):
            return False
        live_dir = os.path.join(self.rel.dir, self.live)
        for mapname in self.maps:
            for k in range(self.n):
                name = table_name(mapname, k)
                if name not in tables or not self._table_files_exist(os.path.join(live_dir, "postfix", name)):
                    return False
        return all(isinstance(v, str) and os.path.isdir(os.path.join(self.store, v)) for v in dirs.values())

    def _table_files_exist(self, base: str) -> bool:
        return all(os.path.isfile(base + s) for s in SUFFIXES[self.cfg.map_type])

    # ---- first build (or after a layout / settings change): every domain, every table

    def _full(self) -> None:
        """Every domain, bucket by bucket: validate its files, send its passwd-file to the writer
        process (bulkwrite.py) and keep its map lines; once bucket k's domains are all read, its
        tables are complete and are postmapped in the background while the next bucket is validated.

        Why this shape (first apply, 100k and 1M mailboxes on 2 cores, profiled): the validation is
        Python on one core; the 200k passwd-file inodes (1M) and the 4N ``postmap`` runs are syscalls
        and other processes, so they go to the other core instead of following the validation.
        """
        tree = self.rel.list_rendered(self.sha)
        groups: list[list[str]] = [[] for _ in range(self.n)]
        for domain in sorted(tree):
            groups[bucket_of(domain, self.n)].append(domain)
        order: list[str] = []
        for group in groups:
            for domain in group:
                files = tree[domain]
                order += [files[fleetfiles.HOME]] if fleetfiles.HOME in files else []
                order += [files[f] for f in DOMAIN_CHECKED if f in files] + [
                    files[m] for m in self.maps if m in files and m not in DOMAIN_CHECKED
                ]
        senders: dict[str, SenderCheck] = {}
        writer = FileWriter(self.mode, self.gid)
        postmaps = _Postmaps(self)
        try:
            with self.rel.mirror.batch(order) as cat:
                for k, group in enumerate(groups):
                    texts: dict[str, list[bytes]] = {m: [] for m in self.maps}
                    for domain in group:
                        files = tree[domain]
                        bb_dir = self._new_bucket_dir(domain[:2])
                        home = self.rel.home_of(cat, domain, files)
                        self.mailboxes += self._check_domain_whole(
                            cat, domain, files, os.path.join(bb_dir, domain), texts, writer, home
                        )
                        for mapname, data in self._derived(domain, home).items():
                            if mapname == fleetfiles.PROXY_PASSDB:
                                self.proxy[domain] = data
                            else:
                                texts[mapname].append(data)
                        for mapname in self.maps:
                            if mapname in fleetfiles.DERIVED_MAPS:
                                continue
                            if mapname not in DOMAIN_CHECKED and mapname in files:
                                data = self._read(cat, domain, mapname, files[mapname])
                                checked = check_fragment(mapname, domain, data)
                                if checked is not None:
                                    senders[domain] = checked
                                texts[mapname].append(data)
                    for mapname in self.maps:
                        postmaps.submit(table_name(mapname, k), texts.pop(mapname))
                # x@A in T's sender-login fragment only when A's alias map says @A @T (as sendermap.write_sender_maps).
                targets: dict[str, str] = {}
                for other in sorted({o for c in senders.values() for o in c.claims}):
                    alias_oid = tree.get(other, {}).get(ALIAS_MAP)
                    found = alias_target(cat, other, alias_oid, self.cfg.max_file_bytes) if alias_oid else None
                    if found:
                        targets[other] = found
                check_claims(senders, targets)
            writer.close()
            postmaps.finish()
        finally:
            writer.abort()
            postmaps.abort()
        self.domains = len(tree)
        for mapname in self.maps:
            for k in range(self.n):
                self.tables[table_name(mapname, k)] = self.tag
        self.reloads = {"postfix", "dovecot"}
        self.proxy = {d: line for d, line in self.proxy.items() if line}

    def _check_domain_whole(
        self,
        cat: BlobReader,
        domain: str,
        files: dict[str, str],
        passwd_target: str,
        texts: dict[str, list[bytes]],
        writer: FileWriter,
        home: tuple[str, str] | None,
    ) -> int:
        """``_check_domain`` for a first apply: each blob read whole (they are small), its passwd-file
        written by ``writer`` once it validated, the two mailbox maps' lines kept in ``texts``."""
        check = DomainCheck(domain, self.cfg, format2="mailboxes" in files, home=home)
        for fname in DOMAIN_CHECKED:
            oid = files.get(fname)
            if not oid:
                continue
            data = cat.read(oid, f"rendered/domains/{domain[:2]}/{domain}/{fname}", self.cfg.max_file_bytes)
            feed(check, fname, (data,))
            if fname == "passwd":
                writer.put(passwd_target, data)
            elif fname in texts:
                texts[fname].append(data)
        return check.finish()

    # ---- incremental build: only what differs between the live commit and the tip

    def _incremental(self, prev: dict[str, Any]) -> None:
        assert self.live is not None
        self.incremental = True
        changes = self.rel.changes(self.live, self.sha)
        self.tables = {str(k): str(v) for k, v in prev["tables"].items()}
        self.passwd_dirs = {str(k): str(v) for k, v in prev["passwd_dirs"].items()}
        self.index_dirs = {str(k): str(v) for k, v in prev["index_dirs"].items()}
        self.domains = int(prev.get("domains", 0))
        self.mailboxes = int(prev.get("mailboxes", 0))
        self.changed_domains = len(changes)
        now = self.rel.domain_files(self.sha, sorted(changes))
        edits: dict[str, _TableChange] = {}
        senders: dict[str, SenderCheck] = {}
        passwd_changed: dict[str, set[str]] = {}  # bb -> domains whose passwd-file changed or went away
        with self.rel.mirror.batch() as cat:
            for domain in sorted(changes):
                change, files = changes[domain], now.get(domain)
                was_there = any(old for old, _ in change.values()) or "passwd" not in change
                if files is None and not was_there:
                    continue
                self.domains += (files is not None) - was_there
                k = bucket_of(domain, self.n)
                if "passwd" in change:
                    passwd_changed.setdefault(domain[:2], set()).add(domain)
                new_data: dict[str, bytes] = {}
                home = self.rel.home_of(cat, domain, files) if files is not None else None
                if files is not None and any(f in change for f in (*DOMAIN_CHECKED, fleetfiles.HOME)):
                    target = None
                    if "passwd" in change:
                        target = os.path.join(self._new_bucket_dir(domain[:2]), domain)
                    captured: dict[str, Any] = {
                        m: _Capture() for m in ("virtual_mailbox_domains", "virtual_mailbox_maps") if m in change
                    }
                    self._check_domain(cat, domain, files, target, captured, home)
                    new_data.update({m: c.value() for m, c in captured.items()})
                old_derived: dict[str, bytes] = {}
                if fleetfiles.HOME in change:
                    old_home_oid = change[fleetfiles.HOME][0]
                    old_home = (
                        fleetfiles.parse_home_lenient(
                            self._read(cat, domain, fleetfiles.HOME, old_home_oid, limit=False)
                        )
                        if old_home_oid
                        else None
                    )
                    old_derived = self._derived(domain, old_home)
                    new_data.update(self._derived(domain, home))
                    self.proxy_changed[domain] = new_data.pop(fleetfiles.PROXY_PASSDB)
                for mapname in self.maps:
                    if mapname in fleetfiles.DERIVED_MAPS:
                        if fleetfiles.HOME in change:
                            self._edit(
                                edits, domain, mapname, k, fragment_keys(old_derived[mapname]), new_data[mapname]
                            )
                        continue
                    if mapname not in change:
                        continue
                    old_oid, new_oid = change[mapname]
                    if mapname not in new_data:
                        new_data[mapname] = b"" if not new_oid else self._read(cat, domain, mapname, new_oid)
                        if new_oid and mapname not in DOMAIN_CHECKED:
                            checked = check_fragment(mapname, domain, new_data[mapname])
                            if checked is not None:
                                senders[domain] = checked
                    old = fragment_keys(self._read(cat, domain, mapname, old_oid, limit=False)) if old_oid else {}
                    self._edit(edits, domain, mapname, k, old, new_data[mapname])
            self._check_sender_claims(cat, changes, senders)
        for bb, gone in passwd_changed.items():
            self._finish_bucket_dir(bb, gone)
        self._write_tables(edits)

    def _write_tables(self, edits: dict[str, _TableChange]) -> None:
        """Every table of the new release: a hard link to the live one, or its copy with `edits`."""
        assert self.live is not None
        live_dir = os.path.join(self.rel.dir, self.live)
        for mapname in self.maps:
            for k in range(self.n):
                name = table_name(mapname, k)
                found = edits.get(name)
                src, dst = os.path.join(live_dir, "postfix", name), os.path.join(self.tmp, "postfix", name)
                if found is None or not (found.deletes or found.upserts):
                    for s in SUFFIXES[self.cfg.map_type]:
                        os.link(src + s, dst + s)
                    continue
                self._update_table(src, dst, name, found)
                self.tables[name] = self.tag
                self.reloads.add("postfix")

    def _edit(
        self, edits: dict[str, _TableChange], domain: str, mapname: str, k: int, old: dict[bytes, bytes], data: bytes
    ) -> None:
        """Queue the key deletes and upserts that turn a domain's ``old`` lines of ``mapname`` into ``data``."""
        new = fragment_keys(data)
        if mapname == "virtual_mailbox_maps":
            self.mailboxes += len(new) - len(old)
        edit = edits.setdefault(table_name(mapname, k), _TableChange())
        edit.deletes += [key for key in old if key not in new]
        edit.upserts += [line for key, line in new.items() if old.get(key) != line]

    def _check_sender_claims(
        self, cat: BlobReader, changes: dict[str, dict[str, tuple[str, str]]], senders: dict[str, SenderCheck]
    ) -> None:
        """The sender-login rules that span domains (sendermap.check_claims), for what this change can affect.

        A key ``x@A`` in T's fragment needs A's alias map to say ``@A @T``, and A's own fragment
        must not list ``x@A`` too. So T is checked again when T's fragment changed, when A's alias
        map changed (its old and its new target), and when A's own fragment changed (A's target).
        """
        limit = self.cfg.max_file_bytes
        claimants: set[str] = set(senders)
        touched_targets = [d for d, ch in changes.items() if ALIAS_MAP in ch or SENDER_MAP in ch]
        for d in touched_targets:
            ch = changes[d]
            oids = [ch[ALIAS_MAP][0]] if ALIAS_MAP in ch else []
            tip_alias = self.rel.domain_files(self.sha, [d]).get(d, {}).get(ALIAS_MAP)
            oids.append(tip_alias or "")
            for oid in oids:
                found = alias_target(cat, d, oid, limit) if oid else None
                if found:
                    claimants.add(found)
        files = self.rel.domain_files(self.sha, sorted(claimants))
        checks: dict[str, SenderCheck] = {}
        for t in sorted(claimants):
            if t in senders:
                checks[t] = senders[t]
            elif SENDER_MAP in files.get(t, {}):
                checks[t] = sender_check_bytes(t, self._read(cat, t, SENDER_MAP, files[t][SENDER_MAP]))
        claimed = sorted({o for c in checks.values() for o in c.claims})
        others = self.rel.domain_files(self.sha, claimed)
        targets: dict[str, str] = {}
        for other in claimed:
            alias_oid = others.get(other, {}).get(ALIAS_MAP)
            found = alias_target(cat, other, alias_oid, limit) if alias_oid else None
            if found:
                targets[other] = found
            if other not in checks and SENDER_MAP in others.get(other, {}):
                own = sender_check_bytes(other, self._read(cat, other, SENDER_MAP, others[other][SENDER_MAP]))
                own.claims = {}  # only its own keys matter here; its claims are checked when it changes
                checks[other] = own
        check_claims(checks, targets)

    def _update_table(self, src: str, dst: str, name: str, edit: _TableChange) -> None:
        """A private copy of the live table, then postmap -d (gone keys) and -i -r (new or changed lines)."""
        for s in SUFFIXES[self.cfg.map_type]:
            with open(src + s, "rb") as fin, open_new(dst + s, 0o644) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        base = shlex.split(self.cfg.postmap)
        target = f"{self.cfg.map_type}:{dst}"
        if edit.deletes:
            self._postmap([*base, "-d", "-", target], name, b"".join(k + b"\n" for k in edit.deletes))
        if edit.upserts:
            self._postmap([*base, "-i", "-r", target], name, b"".join(line + b"\n" for line in edit.upserts))

    def _postmap(self, argv: list[str], name: str, data: bytes | None) -> None:
        r = self.rel.runner.run(argv, input=data, timeout=600)
        # postmap -d exits 1 when a key was not found (cannot happen here, but it is not a failure).
        if r.returncode != 0 and not (argv[-3:-1] == ["-d", "-"] and r.returncode == 1 and not r.stderr.strip()):
            detail = short(r.stderr) or f"rc={r.returncode}"
            raise TickError(f"postmap {name} failed: {detail}")

    # ---- domains

    def _read(self, cat: BlobReader, domain: str, fname: str, oid: str, limit: bool = True) -> bytes:
        what = f"rendered/domains/{domain[:2]}/{domain}/{fname}"
        # An old blob was validated when it went live; the limit still bounds what is read.
        return cat.read(oid, what, self.cfg.max_file_bytes if limit else max(self.cfg.max_file_bytes, 1 << 30))

    def _check_domain(
        self,
        cat: BlobReader,
        domain: str,
        files: dict[str, str],
        passwd_target: str | None,
        outs: dict[str, Any],
        home: tuple[str, str] | None = None,
    ) -> int:
        """Stream and validate passwd, the two mailbox maps and mailboxes (against the validated
        ``home``); write passwd to ``passwd_target`` and each map into ``outs[map]`` (if given).
        Returns the mailbox count."""
        check = DomainCheck(domain, self.cfg, format2="mailboxes" in files, home=home)
        for fname in DOMAIN_CHECKED:
            oid = files.get(fname)
            if not oid:
                continue
            out: Any = outs.get(fname)
            fh: BinaryIO | None = None
            if fname == "passwd" and passwd_target:
                fh = open_new(passwd_target, self.mode)
                out = fh
            try:
                feed(
                    check,
                    fname,
                    _tee(
                        cat.stream(oid, f"rendered/domains/{domain[:2]}/{domain}/{fname}", self.cfg.max_file_bytes), out
                    ),
                )
            finally:
                if fh is not None:
                    fh.close()
                    if self.gid >= 0 and passwd_target:
                        os.chown(passwd_target, 0 if os.geteuid() == 0 else -1, self.gid)
        return check.finish()

    # ---- passwd buckets

    def _new_bucket_dir(self, bb: str) -> str:
        path = os.path.join(self.build_store, f"{bb}.{self.tag}")
        if bb not in self._fresh:
            os.mkdir(path, 0o755)
            self._fresh.add(bb)
        return path

    def _finish_bucket_dir(self, bb: str, changed: set[str]) -> None:
        """Hard-link the bucket's unchanged passwd-files from its live directory into the new one."""
        new = self._new_bucket_dir(bb)
        old_name = self.passwd_dirs.get(bb)
        if old_name:
            with os.scandir(os.path.join(self.store, old_name)) as it:
                for entry in it:
                    if entry.name not in changed:
                        os.link(entry.path, os.path.join(new, entry.name))

    def _link_passwd_dirs(self) -> None:
        """Record the new bucket directories (empty ones are dropped), give each first character with a
        changed bucket a new index directory (symlinks to its buckets), and symlink every index in the release.

        Two levels (``passwd.d/%1d/%2d/%d``) because every symlink is a new inode, and creating inodes
        is what costs on a busy ext4 (~0.2-1 ms each): a change makes ~2 x 37 links, not one per bucket.
        """
        for bb in sorted(self._fresh):
            path = os.path.join(self.build_store, f"{bb}.{self.tag}")
            if os.listdir(path):
                self.passwd_dirs[bb] = f"{bb}.{self.tag}"
                self.reloads.add("dovecot")
            else:
                os.rmdir(path)
                if self.passwd_dirs.pop(bb, None):
                    self.reloads.add("dovecot")
        for c in sorted({bb[0] for bb in self._fresh}):
            members = sorted(bb for bb in self.passwd_dirs if bb[0] == c)
            if not members:
                self.index_dirs.pop(c, None)
                continue
            name = f"{c}.{self.tag}"
            path = os.path.join(self.build_store, "index", name)
            os.makedirs(path, mode=0o755)
            for bb in members:
                os.symlink(os.path.join("..", "..", "passwd", self.passwd_dirs[bb]), os.path.join(path, bb))
            self.index_dirs[c] = name
        pdir = os.path.join(self.tmp, "dovecot", "passwd.d")
        for c, name in self.index_dirs.items():
            os.symlink(os.path.join("..", "..", "..", "..", INDEX_STORE, name), os.path.join(pdir, c))

    def _publish_store(self) -> None:
        """Move the new bucket and index directories into the store (the release is complete and valid)."""
        os.makedirs(self.store, mode=0o755, exist_ok=True)
        index = os.path.join(self.rel.root, INDEX_STORE)
        os.makedirs(index, mode=0o755, exist_ok=True)
        for bb in sorted(self._fresh):
            name = f"{bb}.{self.tag}"
            src = os.path.join(self.build_store, name)
            if os.path.isdir(src):
                os.replace(src, os.path.join(self.store, name))
        built = os.path.join(self.build_store, "index")
        for name in sorted(os.listdir(built)) if os.path.isdir(built) else ():
            os.replace(os.path.join(built, name), os.path.join(index, name))

    # ---- manifest

    def _manifest(self, prev: dict[str, Any]) -> dict[str, Any]:
        return {
            "commit": self.sha,
            "built_at": utcnow(),
            "layout": LAYOUT,
            "map_type": self.cfg.map_type,
            "map_buckets": self.n,
            "reuse_key": self.rel.reuse_key(),
            "postfix_digest": digest(
                [(n, v.encode()) for n, v in self.tables.items()] + [("\0map_type", self.cfg.map_type.encode())]
            ),
            "dovecot_digest": digest(
                [(bb, v.encode()) for bb, v in self.passwd_dirs.items()] + [("\0proxy", self._proxy_digest())]
            ),
            "index_dirs": self.index_dirs,
            "fleet": self.rel.fleet.addresses(),
            "domains": self.domains,
            "mailboxes": self.mailboxes,
            "changed_domains": self.changed_domains,
            "reused_domains": self.domains - self.changed_domains if prev.get("layout") == LAYOUT else 0,
            "tables": self.tables,
            "passwd_dirs": self.passwd_dirs,
        }

    def _proxy_digest(self) -> bytes:
        try:
            with open(os.path.join(self.tmp, "dovecot", fleetfiles.PROXY_PASSDB), "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest().encode()
        except FileNotFoundError:
            return b""


class _Postmaps:
    """New tables built by ``postmap -i`` in the background (at most ``WORKERS`` at a time), each from
    a temporary file (not a pipe: ``subprocess`` feeds a pipe 512 bytes per poll, 3 s of a 1M first apply)."""

    WORKERS = 2  # the validation keeps one core; two postmaps keep up with it and end together

    def __init__(self, build: BucketBuild) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.build = build
        self.pool = ThreadPoolExecutor(max_workers=self.WORKERS)
        self.jobs: list[Any] = []

    def submit(self, name: str, parts: list[bytes]) -> None:
        import tempfile

        fh = tempfile.TemporaryFile(dir=self.build.build_store)
        fh.writelines(parts)
        fh.flush()
        fh.seek(0)
        self.jobs.append(self.pool.submit(self._run, name, fh))

    def _run(self, name: str, fh: BinaryIO) -> None:
        b = self.build
        try:
            argv = [*shlex.split(b.cfg.postmap), "-i", f"{b.cfg.map_type}:{os.path.join(b.tmp, 'postfix', name)}"]
            r = b.rel.runner.run(argv, stdin_file=fh, timeout=600)
        finally:
            fh.close()
        if r.returncode != 0:
            raise TickError(f"postmap {name} failed: {short(r.stderr) or f'rc={r.returncode}'}")

    def finish(self) -> None:
        """Wait for every table; the first failure is raised."""
        for job in self.jobs:
            job.result()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Capture:
    """Collects a validated fragment's bytes (a file-like ``write``)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


def _tee(chunks: Iterable[bytes], out: Any) -> Iterator[bytes]:
    for chunk in chunks:
        if out is not None:
            out.write(chunk)
        yield chunk


def _links(directory: str) -> set[str]:
    """Base names of the symlink targets in ``directory`` (empty if it is missing)."""
    out: set[str] = set()
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.is_symlink():
                    out.add(os.path.basename(os.readlink(entry.path)))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def collect_garbage(root: str, releases_dir: str) -> int:
    """Delete the store's index and passwd bucket directories that no release under ``releases_dir`` reaches."""
    index, store = os.path.join(root, INDEX_STORE), os.path.join(root, PASSWD_STORE)
    if not os.path.isdir(index) and not os.path.isdir(store):
        return 0
    try:
        releases = os.listdir(releases_dir)
    except FileNotFoundError:
        releases = []
    used_index: set[str] = set()
    for rel in releases:
        used_index |= _links(os.path.join(releases_dir, rel, "dovecot", "passwd.d"))
    used: set[str] = set()
    for name in used_index:
        used |= _links(os.path.join(index, name))
    removed = 0
    for top, keep in ((index, used_index), (store, used)):
        for name in os.listdir(top) if os.path.isdir(top) else ():
            if name not in keep:
                rmtree(os.path.join(top, name))
                removed += 1
    return removed
