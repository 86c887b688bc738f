"""The local bare mirror (``<root>/mirror.git``): git plumbing, fetch, ancestry, blobs."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from .config import Config
from .errors import TickError
from .runner import Runner, short

SHA_RE = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
TIP_REF = "refs/pi-pull/tip"


class Mirror:
    """Objects only, never a work tree; every git call runs with auto-gc off."""

    def __init__(self, cfg: Config, runner: Runner, log: logging.Logger) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = log
        self.path = os.path.join(cfg.root, "mirror.git")
        self._git_version_checked = False

    def git(self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = 120.0) -> subprocess.CompletedProcess[bytes]:
        """Run ``git --git-dir <mirror> ARGS`` through the runner."""
        argv = [self.cfg.git, "--git-dir", self.path, "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
        argv.extend(args)
        return self.runner.run(argv, input=input, env=env, timeout=timeout)

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
            raise TickError(f"git {m.group(1).decode()}.{m.group(2).decode()} is too old to pass the sync key via GIT_CONFIG_COUNT "
                            "(need >= 2.31); upgrade git or use a non-http remote")

    def fetch(self, env: Mapping[str, str]) -> str:
        """Fetch ``<remote> <branch>`` into TIP_REF; return the fetched commit's sha."""
        r = self.git("-c", "credential.helper=", "-c", "fetch.fsckObjects=true", "-c", "http.lowSpeedLimit=1",
                     "-c", "http.lowSpeedTime=60", "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                     "--no-recurse-submodules", self.cfg.remote_url,
                     f"+refs/heads/{self.cfg.branch}:{TIP_REF}", env=env, timeout=self.cfg.fetch_timeout)
        if r.returncode != 0:
            detail = short(r.stderr) or f"rc={r.returncode}"
            raise TickError(f"fetch from {self.safe_url()} failed: {detail}")
        r = self.git("rev-parse", "--verify", "--quiet", TIP_REF + "^{commit}")
        sha = r.stdout.decode().strip()
        if r.returncode != 0 or not SHA_RE.match(sha):
            raise TickError(f"fetched ref {self.cfg.branch} does not name a commit")
        return sha

    def safe_url(self) -> str:
        """The remote URL with any user:password@ masked, for log lines."""
        return re.sub(r"//[^/@]*@", "//***@", self.cfg.remote_url)

    def is_ancestor(self, old: str, new: str) -> bool:
        r = self.git("merge-base", "--is-ancestor", old, new)
        return r.returncode == 0

    def cat_blobs(self, oids: list[str]) -> dict[str, bytes]:
        """Read many blobs with one ``git cat-file --batch``: {oid: content}."""
        if not oids:
            return {}
        r = self.git("cat-file", "--batch", input=("\n".join(oids) + "\n").encode())
        if r.returncode != 0:
            raise TickError(f"git cat-file failed: {short(r.stderr)}")
        data = r.stdout
        pos = 0
        blobs: dict[str, bytes] = {}
        for oid in oids:
            nl = data.index(b"\n", pos)
            header = data[pos:nl].decode("ascii", "replace").split(" ")
            if len(header) != 3 or header[0] != oid or header[1] != "blob":
                raise TickError("git cat-file: unexpected answer for {}: {}".format(oid, " ".join(header)[:100]))
            size = int(header[2])
            blobs[oid] = data[nl + 1: nl + 1 + size]
            pos = nl + 1 + size + 1
        return blobs

    def gc_auto(self) -> None:
        r = self.git("-c", "gc.auto=6700", "gc", "--auto", "--quiet", timeout=600)
        if r.returncode != 0:
            self.log.warning(f"git gc --auto failed: {short(r.stderr)}")
