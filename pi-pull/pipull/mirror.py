"""The local bare mirror (``<root>/mirror.git``): git plumbing, fetch into a quarantine, ancestry, blobs.

What a tick fetches lands in a quarantine object directory (``mirror.git/quarantine``, the
way ``git receive-pack`` quarantines a push), with the mirror's own objects as an alternate.
Only once the statement, the commit and every rendered file passed are the new objects moved
into the mirror; anything refused is deleted with the quarantine, so an untrusted remote
cannot leave data behind. The fetch is killed once the quarantine outgrows
``[limits] max_fetch_mb``, and a blob is measured (the ``cat-file --batch`` header) before
a byte of it is read.

Refs: ``refs/pi-pull/applied`` (the applied commit: keeps its history, and is what fetch
negotiates from) and ``refs/pi-pull/accepted`` (the last statement applied).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

from .config import Config
from .errors import Refused, TickError
from .runner import Runner, short

SHA_RE = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
REMOTE_REF = "refs/mailstate/accepted"
ACCEPTED_REF = "refs/pi-pull/accepted"
APPLIED_REF = "refs/pi-pull/applied"
LEGACY_TIP_REF = "refs/pi-pull/tip"  # before statements: the fetched branch tip, refused or not
TIP_REF = ACCEPTED_REF
QUARANTINE = "quarantine"
CHUNK = 1 << 16


class Mirror:
    """Objects only, never a work tree; every git call runs with auto-gc off."""

    def __init__(self, cfg: Config, runner: Runner, log: logging.Logger) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.path = os.path.join(cfg.root, "mirror.git")
        self.quarantine_dir = os.path.join(self.path, QUARANTINE)
        self._quarantine_env: dict[str, str] = {}
        self._git_version_checked = False

    def git(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 120.0,
        limit_bytes: int = 0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``git --git-dir <mirror> ARGS`` through the runner (inside the quarantine while one is open)."""
        argv = [self.cfg.git, "--git-dir", self.path, "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
        argv.extend(args)
        full = {**self._quarantine_env, **(env or {})}
        if limit_bytes:
            return self.runner.run(
                argv, input=input, env=full, timeout=timeout, limit_dir=self.quarantine_dir, limit_bytes=limit_bytes
            )
        return self.runner.run(argv, input=input, env=full or None, timeout=timeout)

    def ensure(self) -> None:
        """Create the bare mirror (mode 0700) on the first tick; atomic by rename."""
        if os.path.isfile(os.path.join(self.path, "HEAD")):
            return
        os.makedirs(self.cfg.root, mode=0o755, exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        r = self.runner.run([self.cfg.git, "init", "--bare", "--quiet", tmp], timeout=60)
        if r.returncode != 0:
            raise TickError(f"git init of the mirror failed: {short(r.stderr)}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, self.path)
        self.log.info(f"created mirror {self.path}")

    def check_git_version(self) -> None:
        """Credentials travel via GIT_CONFIG_COUNT, which git < 2.31 ignores (it would fetch unauthenticated)."""
        if self._git_version_checked:
            return
        self._git_version_checked = True
        r = self.runner.run([self.cfg.git, "--version"], timeout=30)
        m = re.search(rb"(\d+)\.(\d+)", r.stdout)
        if m and (int(m.group(1)), int(m.group(2))) < (2, 31):
            raise TickError(
                f"git {m.group(1).decode()}.{m.group(2).decode()} is too old to pass the sync key via GIT_CONFIG_COUNT "
                "(need >= 2.31); upgrade git or use a non-http remote"
            )

    # ---- refs

    def set_refs(self, refs: Mapping[str, str]) -> None:
        """Point each ref at its object, all in one ``git update-ref --stdin`` transaction."""
        if not refs:
            return
        lines = "".join(f"update {name} {sha}\n" for name, sha in refs.items())
        r = self.git("update-ref", "--stdin", input=lines.encode())
        if r.returncode != 0:
            raise TickError("git update-ref {} failed: {}".format(" ".join(refs), short(r.stderr)))

    def refs(self) -> dict[str, str]:
        """Every ``refs/pi-pull/*`` ref and the object it names (one git call)."""
        r = self.git("for-each-ref", "--format=%(refname) %(objectname)", "refs/pi-pull/")
        out: dict[str, str] = {}
        for line in r.stdout.decode("ascii", "replace").splitlines():
            name, _, oid = line.partition(" ")
            if SHA_RE.match(oid):
                out[name] = oid
        return out

    def adopt(self, applied: str | None) -> None:
        """Bring a mirror from before statements (or after a crash) into shape: no quarantine
        left over, the applied commit held by APPLIED_REF, the old fetched-tip ref and any
        unreachable objects it held gone."""
        if os.path.isdir(self.quarantine_dir):
            shutil.rmtree(self.quarantine_dir, ignore_errors=True)
        refs = self.refs()
        if applied and refs.get(APPLIED_REF) != applied and self.has_commit(applied):
            self.set_refs({APPLIED_REF: applied})
        if LEGACY_TIP_REF in refs:
            self.git("update-ref", "-d", LEGACY_TIP_REF)
            self.prune()

    def prune(self) -> None:
        """Drop objects no ref reaches (loose ones; packs are only ever migrated after acceptance)."""
        self.git("reflog", "expire", "--expire=now", "--all", timeout=600)
        r = self.git("prune", "--expire=now", timeout=600)
        if r.returncode != 0:
            self.log.warning(f"git prune failed: {short(r.stderr)}")

    # ---- fetch

    def ls_remote(self, env: Mapping[str, str]) -> str | None:
        """The object id the remote's statement ref names, or None when it has none (nothing is downloaded)."""
        r = self.git(
            "-c",
            "credential.helper=",
            "-c",
            "http.lowSpeedLimit=1",
            "-c",
            "http.lowSpeedTime=60",
            "ls-remote",
            "--refs",
            self.cfg.remote_url,
            REMOTE_REF,
            env=env,
            timeout=self.cfg.fetch_timeout,
        )
        if r.returncode != 0:
            detail = short(r.stderr) or f"rc={r.returncode}"
            raise TickError(f"fetch from {self.safe_url()} failed: {detail}")
        for line in r.stdout.decode("ascii", "replace").splitlines():
            oid, _, name = line.partition("\t")
            if name.strip() == REMOTE_REF and SHA_RE.match(oid.strip()):
                return oid.strip()
        return None

    def open_quarantine(self) -> Quarantine:
        return Quarantine(self)

    def fetch(self, env: Mapping[str, str]) -> str:
        """Fetch the remote's statement ref into the open quarantine; return the tag object's id.

        Bounded: git is killed once the quarantine outgrows ``[limits] max_fetch_mb``. No ref
        moves here (FETCH_HEAD names what came); Quarantine.accept() moves objects and refs.
        """
        if not self._quarantine_env:
            raise TickError("internal: fetch outside a quarantine")
        r = self.git(
            "-c",
            "credential.helper=",
            "-c",
            "fetch.fsckObjects=true",
            "-c",
            "http.lowSpeedLimit=1",
            "-c",
            "http.lowSpeedTime=60",
            "-c",
            "fetch.unpackLimit=1",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-recurse-submodules",
            self.cfg.remote_url,
            REMOTE_REF,
            env=env,
            timeout=self.cfg.fetch_timeout,
            limit_bytes=self.cfg.max_fetch_bytes,
        )
        if r.returncode == 125:
            raise Refused(
                f"the fetch from {self.safe_url()} weighed more than [limits] max_fetch_mb = {self.cfg.max_fetch_mb} MiB; "
                "stopped, nothing of it kept"
            )
        if r.returncode != 0:
            detail = short(r.stderr) or f"rc={r.returncode}"
            if "couldn't find remote ref" in detail:
                raise Refused(no_statement_message(self.safe_url()))
            raise TickError(f"fetch from {self.safe_url()} failed: {detail}")
        try:
            with open(os.path.join(self.path, "FETCH_HEAD"), encoding="ascii", errors="replace") as fh:
                first = fh.readline()
        except OSError as e:
            raise TickError(f"fetch from {self.safe_url()} wrote no FETCH_HEAD: {e}") from None
        oid = first.split("\t", 1)[0].strip()
        if not SHA_RE.match(oid):
            raise TickError(f"fetch from {self.safe_url()}: unexpected FETCH_HEAD")
        return oid

    def safe_url(self) -> str:
        """The remote URL with any user:password@ masked, for log lines."""
        return re.sub(r"//[^/@]*@", "//***@", self.cfg.remote_url)

    # ---- objects

    def object_size(self, oid: str, kind: str) -> int:
        """Size of ``oid``, which must be an object of type ``kind``; Refused otherwise."""
        r = self.git("cat-file", "--batch-check", input=(oid + "\n").encode())
        parts = r.stdout.decode("ascii", "replace").split()
        if r.returncode != 0 or len(parts) != 3 or parts[2] == "missing" or not parts[2].isdigit():
            raise Refused(f"{oid[:12]} is missing from what the remote sent")
        if parts[1] != kind:
            raise Refused(f"{oid[:12]} is a {parts[1][:20]}, not a {kind}")
        return int(parts[2])

    def read_object(self, oid: str, kind: str, max_bytes: int) -> bytes:
        """The raw content of a small object, measured before it is read."""
        size = self.object_size(oid, kind)
        if size > max_bytes:
            raise Refused(f"{kind} {oid[:12]} is {size} bytes, more than the {max_bytes} allowed")
        r = self.git("cat-file", kind, oid)
        if r.returncode != 0:
            raise TickError(f"git cat-file {kind} {oid[:12]} failed: {short(r.stderr)}")
        return r.stdout

    def has_commit(self, sha: str) -> bool:
        r = self.git("cat-file", "-e", sha + "^{commit}")
        return r.returncode == 0

    def is_ancestor(self, old: str, new: str) -> bool:
        r = self.git("merge-base", "--is-ancestor", old, new)
        return r.returncode == 0

    def batch(self, order: Sequence[str] = ()) -> BlobReader:
        """A ``git cat-file --batch`` process that streams blobs (see BlobReader); ``order``: the
        blobs the caller will read first, in that order, requested at once (no round trip each)."""
        return BlobReader(self, order)

    def gc_auto(self) -> None:
        r = self.git("-c", "gc.auto=6700", "gc", "--auto", "--quiet", timeout=600)
        if r.returncode != 0:
            self.log.warning(f"git gc --auto failed: {short(r.stderr)}")


def no_statement_message(url: str) -> str:
    return (
        f"no accepted-head statement ({REMOTE_REF}) at {url}: the server has accepted nothing yet, or the remote is "
        "not a mailstate server or a git host it pushes to; nothing applied"
    )


class Quarantine:
    """New objects go to ``mirror.git/quarantine`` until ``accept()``; leaving the block without
    accepting deletes them (a refused or failed tick leaves nothing behind)."""

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.dir = mirror.quarantine_dir
        self.accepted = False

    def __enter__(self) -> Quarantine:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(os.path.join(self.dir, "pack"), mode=0o700)
        self.mirror._quarantine_env = {
            "GIT_OBJECT_DIRECTORY": self.dir,
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": os.path.join(self.mirror.path, "objects"),
        }
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.mirror._quarantine_env = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.unlink(os.path.join(self.mirror.path, "FETCH_HEAD"))
        except OSError:
            pass

    def accept(self, refs: Mapping[str, str]) -> None:
        """Move the quarantined objects into the mirror (packs' .idx last, as git does), then set ``refs``."""
        objects = os.path.join(self.mirror.path, "objects")
        self.mirror._quarantine_env = {}
        for sub in sorted(os.listdir(self.dir)):
            src = os.path.join(self.dir, sub)
            if sub == "pack":
                names = sorted(os.listdir(src), key=lambda n: (n.endswith(".idx"), n))
                for name in names:
                    if name.startswith("tmp_"):
                        continue
                    _move(os.path.join(src, name), os.path.join(objects, "pack", name))
            elif len(sub) == 2 and os.path.isdir(src):
                os.makedirs(os.path.join(objects, sub), exist_ok=True)
                for name in os.listdir(src):
                    _move(os.path.join(src, name), os.path.join(objects, sub, name))
        self.mirror.set_refs(refs)
        self.accepted = True


def _move(src: str, dst: str) -> None:
    """Objects are content-addressed: an existing destination already holds the same bytes."""
    if os.path.exists(dst):
        os.unlink(src)
    else:
        os.rename(src, dst)


class BlobReader:
    """Streams blobs out of one ``git cat-file --batch``: the header's size is checked against a
    limit before any content is read, and content comes in 64 KiB chunks.

    The ids of ``order`` are written by a thread while the caller reads, so 40k small blobs cost
    one pipeline, not 40k round trips; ``stream()`` must then ask for them in that order. Any
    other id is requested when it is asked for, once ``order`` is used up.
    """

    def __init__(self, mirror: Mirror, order: Sequence[str] = ()) -> None:
        self.mirror = mirror
        m = mirror
        argv = [m.cfg.git, "--git-dir", m.path, "-c", "gc.auto=0", "cat-file", "--batch"]
        self.proc = m.runner.popen(argv, env=m._quarantine_env or None)
        self.pending: collections.deque[str] = collections.deque(order)
        self._lock = threading.Lock()  # the writer thread and late requests share stdin
        self._writer: threading.Thread | None = None
        if order:
            self._writer = threading.Thread(target=self._write_ids, args=(list(order),), daemon=True)
            self._writer.start()

    def _write_ids(self, ids: list[str]) -> None:
        p = self.proc
        assert p.stdin is not None
        try:
            with self._lock:
                for i in range(0, len(ids), 512):
                    p.stdin.write("".join(oid + "\n" for oid in ids[i : i + 512]).encode())
                p.stdin.flush()
        except (OSError, ValueError):
            pass  # the reader stopped early (a refusal) and closed the pipes

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        p = self.proc
        for stream in (p.stdout, p.stdin):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def read(self, oid: str, what: str, max_bytes: int) -> bytes:
        """The blob's whole content (one read: for the many small blobs of a first apply); Refused
        like ``stream()``."""
        size = self._header(oid, what, max_bytes)
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(size)
        if len(data) != size:
            raise TickError(f"git cat-file: {what} ended early")
        self.proc.stdout.read(1)  # the newline after each object
        return data

    def stream(self, oid: str, what: str, max_bytes: int) -> Iterator[bytes]:
        """Yield the blob's content in chunks; Refused when it is not a blob or is over ``max_bytes``."""
        left = self._header(oid, what, max_bytes)
        p = self.proc
        assert p.stdout is not None
        while left:
            chunk = p.stdout.read(min(CHUNK, left))
            if not chunk:
                raise TickError(f"git cat-file: {what} ended early")
            left -= len(chunk)
            yield chunk
        p.stdout.read(1)  # the newline after each object

    def _header(self, oid: str, what: str, max_bytes: int) -> int:
        """Ask for ``oid`` (unless ``order`` already did) and read its header: the content's size."""
        p = self.proc
        assert p.stdin is not None and p.stdout is not None
        if self.pending:
            expected = self.pending.popleft()
            if expected != oid:
                raise TickError(f"internal: blob {oid[:12]} read out of order (expected {expected[:12]})")
        else:
            try:
                if self._writer is not None:
                    self._writer.join()
                with self._lock:
                    p.stdin.write(oid.encode() + b"\n")
                    p.stdin.flush()
            except (OSError, ValueError) as e:
                raise TickError(f"git cat-file --batch died: {e}") from None
        header = p.stdout.readline(256).decode("ascii", "replace").split()
        if len(header) != 3 or header[0] != oid or not header[2].isdigit():
            raise TickError("git cat-file: unexpected answer for {}: {}".format(oid[:12], " ".join(header)[:100]))
        if header[1] != "blob":
            raise Refused(f"{what} is a {header[1][:20]}, not a file")
        size = int(header[2])
        if size > max_bytes:
            # The reader is left mid-object: the caller must stop using it (the build is refused).
            raise Refused(
                f"{what} weighs {size / 1048576:.1f} MiB, more than [limits] max_file_mb = {max_bytes // 1048576}"
            )
        return size
