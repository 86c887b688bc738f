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
from mailstate.state.load import CACHE_MAGIC, ParseCache
from mailstate.state.store import Store
from tests.conftest import ADMIN, PASSWORD, PROJECT_A, FakeClock
from tests.server import LiveServer


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


def _cache_json(data_dir: DataDir) -> tuple[bytes, dict[str, Any]]:
    header, _, body = data_dir.cache.read_bytes().partition(b"\n")
    return header, json.loads(body)


def test_the_cache_is_authenticated_json_and_is_used(data_dir: DataDir, warm: tuple[Any, ...]) -> None:
    header, entries = _cache_json(data_dir)
    magic, _tag, mac = header.split(b" ")
    assert magic == CACHE_MAGIC and len(mac) == 64
    assert len(entries) == 2 and all(e["domain"] in ("example.com", "other.org") for e in entries.values())
    assert b"BLF-CRYPT" in data_dir.cache.read_bytes()  # hashes only, as in git; never a password
    assert PASSWORD.encode() not in data_dir.cache.read_bytes()
    key = data_dir.cache.parent / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    cache = ParseCache.open(data_dir.cache)
    assert set(cache.entries) == set(entries) and not cache.dirty
    restarted = open_store(data_dir.root)
    assert _view(restarted) == warm
    # the entries built from the cache are the parsed ones
    fresh = open_store(data_dir.root)
    shutil.rmtree(data_dir.cache.parent)
    assert open_store(data_dir.root).snapshot.domains == fresh.snapshot.domains


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
def test_a_damaged_cache_is_no_cache(data_dir: DataDir, warm: tuple[Any, ...], kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
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


def _poison(entries: dict[str, Any]) -> dict[str, Any]:
    """The example.com entry with a planted mailbox and a bigger quota."""
    for entry in entries.values():
        if entry["domain"] == "example.com":
            box = dict(next(iter(entry["mailboxes"].values())))
            entry["mailboxes"]["planted"] = {**box, "quota_mb": 999999 if box["quota_mb"] < 999999 else 1}
            for other in entry["mailboxes"].values():
                other["quota_mb"] = 4242
    return entries


@pytest.mark.parametrize("forgery", ["old_mac", "guessed_key", "other_data_dir_key", "swapped_entries"])
def test_a_poisoned_entry_is_never_served(data_dir: DataDir, warm: tuple[Any, ...], tmp_path: Path, forgery: str) -> None:
    header, entries = _cache_json(data_dir)
    magic, tag, mac = header.split(b" ")
    if forgery == "swapped_entries":
        # Each entry is real, but filed under the other one's blob id.
        a, b = list(entries)
        body = json.dumps({a: entries[b], b: entries[a]}).encode()
    else:
        body = json.dumps(_poison(entries)).encode()
    if forgery == "guessed_key":
        mac = hmac.new(os.urandom(32), tag + b"\n" + body, hashlib.sha256).hexdigest().encode()
    elif forgery == "other_data_dir_key":
        other = init_data_dir(tmp_path / "other", None, clock=FakeClock())
        open_store(other.root).execute("add-domain", ADMIN, {"domain": "x.org"})
        open_store(other.root)  # parses x.org: writes its cache and makes its key
        key = (other.cache.parent / "key").read_bytes()
        mac = hmac.new(key, tag + b"\n" + body, hashlib.sha256).hexdigest().encode()
    data_dir.cache.write_bytes(b" ".join([magic, tag, mac]) + b"\n" + body)
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
            assert c.post("/v1/email-account/add-domain", json={"domain": "example.com", "project_id": 5}).status_code == 201
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
