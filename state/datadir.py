"""The server's data directory: creating it (`mailstate init`) and opening its store.

    DIR/state.git          bare state repo; its first commit is signed
    DIR/signing_key(.pub)  the server's ed25519 commit-signing key (0600)
    DIR/allowed_signers    who may sign state commits (nodes and `git verify-commit` use it)
    DIR/mailstate.db       tokens and node sync status (never in git)
    DIR/cache/             parse cache keyed by git blob id, HMAC-checked JSON (safe to delete)

Every path is made absolute once, when the DataDir is made: git runs with `-C <repo>` and
resolves a relative path given to it (`gpg.ssh.allowedSignersFile=data/allowed_signers`, a
relative upstream) from inside the repo, so `--data ./data` would otherwise break signature
checks of other processes' commits and lose their writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2

from mailstate.compiler.render import compile_state
from mailstate.state import files
from mailstate.state.dnscheck import DnsChecker
from mailstate.state.errors import StoreError
from mailstate.state.events import dns_check_failed, project_of
from mailstate.state.gitrepo import GitRepo, fsync_path
from mailstate.state.keyrotation import DataDirSigner
from mailstate.state.localdb import LocalDB
from mailstate.state.models import NodesFile, Settings
from mailstate.state.signing import Ed25519Signer, Signer, allowed_signers_line, generate_key
from mailstate.state.snapshot import Actor
from mailstate.state.store import Clock, Store, clean_request_id, commit_message, utcnow
from mailstate.state.upgrade import upgrade_store
from mailstate.state.upstream import Upstream
from mailstate.state.webhooks import Webhooks

# Writes an ed25519 key pair at the path (and path.pub); returns the public key line.
KeyGen = Callable[[Path], str]

log = logging.getLogger("mailstate.datadir")


@dataclass(frozen=True)
class DataDir:
    """Paths inside a data directory; `root` (so every path below) is absolute."""

    root: Path

    def __post_init__(self) -> None:
        # Resolved against the cwd of the moment the dir is opened, and never again.
        object.__setattr__(self, "root", absolute(self.root))

    @property
    def repo(self) -> Path:
        return self.root / "state.git"

    @property
    def key(self) -> Path:
        return self.root / "signing_key"

    @property
    def allowed_signers(self) -> Path:
        return self.root / "allowed_signers"

    @property
    def db(self) -> Path:
        return self.root / "mailstate.db"

    @property
    def cache(self) -> Path:
        return self.root / "cache" / "domains.json"

    def is_initialised(self) -> bool:
        return self.repo.exists() and self.key.exists()


def absolute(path: Path | str) -> Path:
    """`path` made absolute (and normalised) against the current directory; `~` expanded."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def local_git_url(url: str) -> str:
    """`url` with a local path made absolute; URLs and scp-like `host:path` are left alone.

    git tells a path from a remote the same way: a `scheme://`, or a `:` with no `/` before it.
    """
    if "://" in url:
        return url
    colon, slash = url.find(":"), url.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        return url
    return str(absolute(url))


def init_data_dir(
    root: Path,
    settings: Settings | None = None,
    *,
    actor: Actor | None = None,
    clock: Clock = utcnow,
    extra_files: dict[str, bytes] | None = None,
    keygen: KeyGen = generate_key,
) -> DataDir:
    """Create a data dir with a bare repo whose first commit is signed. Refuses a used dir.

    `extra_files` (repo path → bytes) go into the first commit too, e.g. a CI workflow.
    `keygen` writes the ed25519 signing key pair and returns its public line: ssh-keygen by
    default; the library tests pass one that makes the same key files in process.
    """
    dd = DataDir(Path(root))
    if dd.repo.exists() or dd.key.exists():
        raise StoreError(f"{root} already holds a mailstate data dir.", code="already_initialised")
    dd.root.mkdir(parents=True, exist_ok=True)
    os.chmod(dd.root, 0o700)
    public = keygen(dd.key)
    dd.allowed_signers.write_text(allowed_signers_line(public))
    LocalDB(dd.db).close()
    repo = GitRepo.init_bare(dd.repo)
    durable_git_config(repo)
    settings = settings or Settings()
    tree = repo.build_tree(
        None,
        {
            files.SETTINGS_PATH: files.dump_settings(settings),
            files.NODES_PATH: files.dump_nodes(NodesFile()),
            **compile_state(settings, []),  # rendered/settings (format 2)
            **(extra_files or {}),
        },
    )
    who = actor or Actor.admin(f"cli:{os.environ.get('USER', 'root')}")
    message = commit_message("init", "mailstate", None, who, clean_request_id(None))
    sha = repo.commit(tree, None, message, Ed25519Signer(dd.key), clock())
    repo.move_branch(sha, None)
    for path in (dd.key, Path(f"{dd.key}.pub"), dd.allowed_signers, dd.root):
        fsync_path(path)  # a power cut must not leave commits without the key that signed them
    try:
        fsync_path(dd.root.parent)  # the data dir's own name; its parent may not be ours to read
    except OSError:
        log.warning("could not fsync %s, the folder holding the new data dir", dd.root.parent)
    return dd


def durable_git_config(repo: GitRepo) -> None:
    """Make git's own writes to the repo durable too (`core.fsync=all`, unless set).

    The store's writes go through libgit2, which fsyncs by itself (gitrepo.set_durable). This
    covers the git CLI on the same repo: the background repack, and an admin's push.
    """
    config = repo.repo.config
    try:
        if "core.fsync" not in config:
            config["core.fsync"] = "all"
    except pygit2.GitError as exc:  # e.g. another process holds config.lock: it sets it too
        log.warning("could not set core.fsync in %s: %s", repo.path, exc)


def open_store(
    root: Path,
    *,
    signer: Signer | None = None,
    clock: Clock = utcnow,
    db: LocalDB | None = None,
    upstream: str | None = None,
    upgrade: bool = True,
) -> Store:
    """The store of an initialised data dir, signing with its own key by default.

    With `upgrade` (the default) a format-1 state is first upgraded to format 2 in one signed
    commit (state.upgrade).

    With `upstream` (a git URL or path), every write is pushed there before it counts, and
    commits from elsewhere are adopted only when signed by a key in `DIR/allowed_signers`.
    """
    dd = DataDir(Path(root))
    if not dd.is_initialised():
        raise StoreError(
            f"{root} is not a mailstate data dir; run `mailstate init --data {root}`.", code="not_initialised"
        )
    durable_git_config(GitRepo(dd.repo))
    store = Store(
        dd.repo,
        # Re-reads DIR/signing_key after a rotation and carries its endorsements (state/keyrotation.py).
        signer or DataDirSigner(dd.root),
        clock=clock,
        cache_path=dd.cache,
        status_source=db.node_status if db is not None else None,
        upstream=Upstream(local_git_url(upstream), dd.repo) if upstream else None,
        trusted_signers=dd.allowed_signers,
    )
    store.usage_source = db.usage_for if db is not None else None
    store.dkim_source = db.dkim_keys if db is not None else None
    store.app_use_source = db.app_password_uses if db is not None else None
    store.sending_source = db.sending_for if db is not None else None
    if db is not None:
        # Webhooks and their outbox live in the same database (state/webhooks.py); delivering them
        # is the server's (api/server.py), but any process may register one or queue an event.
        hooks = Webhooks(dd.db)
        store.webhooks = hooks
        # The resolver of $MAILSTATE_DNS_RESOLVER (a bad value makes check-dns answer 503, not the start fail).
        checker = DnsChecker.from_env(db)
        checker.on_failure = dns_check_failed(hooks, project_of(store))
        store.dns_check_source = checker.check
        store.dns_status_source = db.dns_status
    # A format-1 state becomes format 2 in one signed commit the first time a store opens it
    # (the server on start, any CLI command); a format-2 state is left alone.
    if upgrade:
        upgrade_store(store, strict=False)
    return store


def upgrade_data_dir(root: Path) -> dict[str, Any]:
    """`mailstate upgrade --data DIR`: upgrade the data dir's state repo (state.upgrade.upgrade_store)."""
    return upgrade_store(open_store(root, upgrade=False))
