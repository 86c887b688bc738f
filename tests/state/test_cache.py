"""The parse cache (DIR/cache/domains.json) is safe to delete and safe to corrupt.

Any damage means no cache: a warning, a start that parses from git, and a rebuilt cache. A
planted or edited entry is never served (the file carries an HMAC under a per-data-dir key),
and the cache is JSON, so loading it can never run code (the old pickle is never read).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.domainmap import DomainMap, Lazy
from mailstate.state.load import CACHE_MAGIC, ParseCache
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, FakeClock
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e


def _users(store: Store) -> list[tuple[str, int, bool]]:
    return sorted((u["email"], u["quota_mb"], u["active"]) for u in store.execute("list-users", ADMIN).result["users"])


def _view(store: Store) -> tuple[Any, ...]:
    return (store.head, _users(store), sorted(store.snapshot.domains))


@pytest.fixture
def warm(data_dir: DataDir, mail_store: Store) -> tuple[Any, ...]:
    """A data dir with two domains whose cache has been written; the state's view."""
    mail_store.execute("add-domain", ADMIN, {"domain": "other.org", "project_id": PROJECT_A.project_id})
    mail_store.execute("add-user", PROJECT_A, {"email": "two@other.org", "password": PASSWORD})
    view = _view(mail_store)
    open_store(data_dir.root)  # loads the commit: writes the cache
    assert data_dir.cache.is_file()
    return view


class CacheFile:
    """The parts of a cache file: header fields, index rows, entry bytes by blob id."""

    def __init__(self, data: bytes) -> None:
        header, _, rest = data.partition(b"\n")
        self.magic, self.tag, length, self.mac = header.split(b" ")
        self.index = rest[: int(length)]
        self.body = rest[int(length) :]
        self.rows: list[list[Any]] = json.loads(self.index)
        self.entries = {row[0]: json.loads(self.body[row[5] : row[5] + row[6]]) for row in self.rows}

    @staticmethod
    def assemble(tag: bytes, rows: list[list[Any]], body: bytes, key: bytes) -> bytes:
        index = json.dumps(rows).encode()
        mac = hmac.new(key, tag + b"\n" + index, hashlib.sha256).hexdigest().encode()
        return b" ".join([CACHE_MAGIC, tag, str(len(index)).encode(), mac]) + b"\n" + index + body


def _cache_file(data_dir: DataDir) -> CacheFile:
    return CacheFile(data_dir.cache.read_bytes())


def test_the_cache_is_authenticated_json_and_is_used(data_dir: DataDir, warm: tuple[Any, ...]) -> None:
    parts = _cache_file(data_dir)
    assert parts.magic == CACHE_MAGIC and len(parts.mac) == 64
    entries = parts.entries
    assert len(entries) == 2 and all(e["domain"] in ("example.com", "other.org") for e in entries.values())
    assert {row[1] for row in parts.rows} == {"example.com", "other.org"} and all(
        len(row[7]) == 32 for row in parts.rows
    )
    assert b"BLF-CRYPT" in data_dir.cache.read_bytes()  # hashes only, as in git; never a password
    assert PASSWORD.encode() not in data_dir.cache.read_bytes()
    key = data_dir.cache.parent / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    cache = ParseCache.open(data_dir.cache)
    assert set(cache.entries) == set(entries) and not cache.dirty
    assert all(isinstance(e, Lazy) for e in cache.entries.values())  # nothing parsed at open
    restarted = open_store(data_dir.root)
    # A start parses at most the one domain the upgrade check reads (state.upgrade.senders_missing).
    assert isinstance(restarted.snapshot.domains, DomainMap) and restarted.snapshot.domains.parsed_count() <= 1
    assert _view(restarted) == warm
    # the entries built from the cache are the parsed ones
    fresh = open_store(data_dir.root)
    shutil.rmtree(data_dir.cache.parent)
    assert open_store(data_dir.root).snapshot.domains == fresh.snapshot.domains


def test_a_restart_after_writes_re_encodes_only_what_changed(data_dir: DataDir, warm: tuple[Any, ...]) -> None:
    before = _cache_file(data_dir)
    store = open_store(data_dir.root)
    store.execute("add-user", PROJECT_A, {"email": "three@other.org", "password": PASSWORD})
    open_store(data_dir.root)  # parses other.org's new blob; example.com's entry is copied as bytes
    after = _cache_file(data_dir)
    unchanged = {row[0] for row in before.rows} & {row[0] for row in after.rows}
    assert len(unchanged) == 1 and len(after.rows) == 2
    (oid,) = unchanged
    assert after.entries[oid] == before.entries[oid] and after.entries[oid]["domain"] == "example.com"
    assert "three" in next(e for e in after.entries.values() if e["domain"] == "other.org")["mailboxes"]


# --- damage: every kind means no cache, a warning, a working store ---------------------------


def _damage(data_dir: DataDir, kind: str, tmp_path: Path) -> None:
    cache = data_dir.cache
    folder = cache.parent
    if kind == "cache_dir_is_a_file":
        shutil.rmtree(folder)
        folder.write_text("not a folder\n")
    elif kind == "cache_file_is_a_folder":
        cache.unlink()
        cache.mkdir()
    elif kind == "dangling_symlink":
        cache.unlink()
        cache.symlink_to(tmp_path / "nowhere" / "domains.json")
    elif kind == "symlink_to_a_valid_cache":
        # A valid cache of this very data dir, reached through a symlink: not followed.
        moved = tmp_path / "elsewhere.json"
        shutil.move(cache, moved)
        cache.symlink_to(moved)
    elif kind == "fifo":
        cache.unlink()
        os.mkfifo(cache)  # reading would block forever
    elif kind == "garbage":
        cache.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif kind == "empty":
        cache.write_bytes(b"")
    elif kind == "key_missing":
        (folder / "key").unlink()
    elif kind == "key_is_a_folder":
        (folder / "key").unlink()
        (folder / "key").mkdir()
    elif kind == "key_garbage":
        (folder / "key").write_bytes(b"short")
    elif kind == "not_readable_json":
        header, _, _body = cache.read_bytes().partition(b"\n")
        cache.write_bytes(header + b"\n{not json")
    else:
        raise AssertionError(kind)


DAMAGE = [
    "cache_dir_is_a_file",
    "cache_file_is_a_folder",
    "dangling_symlink",
    "symlink_to_a_valid_cache",
    "fifo",
    "garbage",
    "truncated",
    "empty",
    "key_missing",
    "key_is_a_folder",
    "key_garbage",
    "not_readable_json",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_cache_is_no_cache(
    data_dir: DataDir, warm: tuple[Any, ...], kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _damage(data_dir, kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mailstate.cache"):
        restarted = open_store(data_dir.root)
    assert _view(restarted) == warm
    assert any("parse cache" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    # it keeps working, and where the damage left room, the cache is whole again
    out = restarted.execute("add-user", PROJECT_A, {"email": "after@example.com", "password": PASSWORD})
    assert out.result["commit"]
    again = open_store(data_dir.root)
    assert _view(again) == _view(restarted)
    if kind not in ("cache_dir_is_a_file", "cache_file_is_a_folder", "key_is_a_folder", "fifo"):
        assert data_dir.cache.is_file() and not data_dir.cache.is_symlink()
        assert ParseCache.open(data_dir.cache).entries  # rebuilt, and valid


# --- a poisoned entry is never served ---------------------------------------------------------


def _poison(entry: dict[str, Any]) -> dict[str, Any]:
    """The example.com entry with a planted mailbox and a bigger quota."""
    box = dict(next(iter(entry["mailboxes"].values())))
    entry["mailboxes"]["planted"] = {**box, "quota_mb": 999999 if box["quota_mb"] < 999999 else 1}
    for other in entry["mailboxes"].values():
        other["quota_mb"] = 4242
    return entry


FORGERIES = [
    "old_mac",
    "guessed_key",
    "other_data_dir_key",
    "swapped_entries",
    "entry_edited_in_place",
    "entry_remaced_under_real_key",
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_poisoned_entry_is_never_served(
    data_dir: DataDir, warm: tuple[Any, ...], tmp_path: Path, forgery: str
) -> None:
    parts = _cache_file(data_dir)
    real_key = (data_dir.cache.parent / "key").read_bytes()
    rows = [list(r) for r in parts.rows]
    target = next(r for r in rows if r[1] == "example.com")
    if forgery == "swapped_entries":
        # Each entry is real, but filed under the other one's blob id (index re-MACed with the
        # real key, as a bug in the writer would): each entry's own MAC binds it to its blob.
        a, b = rows
        a[5:8], b[5:8] = b[5:8], a[5:8]
        data = CacheFile.assemble(parts.tag, rows, parts.body, real_key)
    elif forgery == "entry_edited_in_place":
        # Same length, index untouched: only the entry's MAC can tell.
        start, length = target[5], target[6]
        entry = parts.body[start : start + length]
        edited = entry.replace(b'"quota_mb":1024', b'"quota_mb":4242')
        assert edited != entry and len(edited) == len(entry)
        body = parts.body[:start] + edited + parts.body[start + length :]
        data = (
            b" ".join([parts.magic, parts.tag, str(len(parts.index)).encode(), parts.mac]) + b"\n" + parts.index + body
        )
    else:
        poisoned = json.dumps(_poison(parts.entries[target[0]])).encode()
        body = b""
        for row in rows:
            chunk = poisoned if row is target else parts.body[row[5] : row[5] + row[6]]
            row[5], row[6] = len(body), len(chunk)
            body += chunk
        if forgery == "old_mac":
            index = json.dumps(rows).encode()
            data = b" ".join([parts.magic, parts.tag, str(len(index)).encode(), parts.mac]) + b"\n" + index + body
        elif forgery == "guessed_key":
            data = CacheFile.assemble(parts.tag, rows, body, os.urandom(32))
        elif forgery == "other_data_dir_key":
            other = init_data_dir(tmp_path / "other", None, clock=FakeClock())
            open_store(other.root).execute("add-domain", ADMIN, {"domain": "x.org"})
            open_store(other.root)  # parses x.org: writes its cache and makes its key
            data = CacheFile.assemble(parts.tag, rows, body, (other.cache.parent / "key").read_bytes())
        else:  # entry_remaced_under_real_key: the index is fine, the entry's MAC is the old one
            data = CacheFile.assemble(parts.tag, rows, body, real_key)
    data_dir.cache.write_bytes(data)
    restarted = open_store(data_dir.root)
    assert _view(restarted) == warm
    users = restarted.execute("list-users", PROJECT_A, {"domain": "example.com"}).result["users"]
    assert [u["email"] for u in users] == ["info@example.com"] and users[0]["quota_mb"] != 4242


def test_a_pickle_in_the_cache_never_runs(data_dir: DataDir, warm: tuple[Any, ...], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    evil = pickle.dumps(Payload())
    (data_dir.cache.parent / "domains.pickle").write_bytes(evil)  # the old cache's name
    data_dir.cache.write_bytes(evil)
    restarted = open_store(data_dir.root)
    assert not marker.exists()
    assert _view(restarted) == warm
    assert not (data_dir.cache.parent / "domains.pickle").exists()  # the legacy file is dropped


# --- the server starts whatever the cache looks like ------------------------------------------


def test_mailstate_serve_starts_with_a_broken_cache(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path)
    srv.start()
    try:
        with srv.client(srv.admin_token) as c:
            assert (
                c.post("/v1/email-account/add-domain", json={"domain": "example.com", "project_id": 5}).status_code
                == 201
            )
        cache = srv.data.cache
        folder = cache.parent
        for kind in ("cache_dir_is_a_file", "cache_file_is_a_folder", "dangling_symlink"):
            srv.stop()
            if folder.is_file():
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
            if kind == "cache_dir_is_a_file":
                folder.write_text("not a folder\n")
            elif kind == "cache_file_is_a_folder":
                cache.mkdir(parents=True)
            else:
                folder.mkdir()
                cache.symlink_to(tmp_path / "nowhere.json")
            srv.start()
            with srv.client(srv.admin_token) as c:
                assert c.get("/v1/health").json()["status"] == "ok", kind
                domains = c.get("/v1/email-account/list-domains").json()["domains"]
                assert [d["domain"] for d in domains] == ["example.com"], kind
        assert "parse cache" in srv.log_text()
    finally:
        srv.stop()
