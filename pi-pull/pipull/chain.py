"""Every commit verified: each commit between the applied one and the new tip carries a trusted signature.

Verifying only the tip (what Flux does) lets an unsigned or untrusted commit hide under a
trusted one. A tick verifies the whole range ``applied..tip`` instead, cheaply:

* one ``git rev-list`` lists the range, one ``git cat-file --batch`` per 2000 commits reads
  them (no git process per commit);
* each commit's SSH signature and payload (the commit minus its ``gpgsig`` header) are cut
  out here, and ``ssh-keygen -Y verify`` checks them, a few at a time in parallel, each with
  ``-Overify-time=<committer time>`` exactly as ``git verify-commit`` does (git >= 2.36): a
  key given ``valid-before=`` in allowed_signers stops being good for commits dated after it,
  and a key removed from the file is good for nothing;
* committer times may not go backwards along the chain (a commit dated before one of its
  parents) nor lie in the future beyond ``[freshness] clock_skew``: a retired key cannot
  backdate a commit to before its ``valid-before``, because the commit would have to be dated
  before the trusted commits it builds on.

The principal passed to ``-I`` is read from allowed_signers by the key in the signature (a
hint only: ssh-keygen checks key, principal, namespace and validity itself); a line whose
principals are patterns falls back to ``ssh-keygen -Y find-principals``.

First apply (no applied commit): only the tip is verified, not its whole history. The node
serves the tip's tree and nothing of the history below it; the statement says a server
accepted that tip, and servers verify every commit they adopt; and verifying years of
history on the first tick would cost O(history) and refuse history signed by admin keys
removed since (removal is how a compromised admin key is retired).
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .config import Config
from .errors import Refused, TickError
from .mirror import Mirror
from .rules import parse_signers_line
from .runner import Runner, short

MAX_COMMIT_BYTES = 1024 * 1024
BATCH = 2000
WORKERS = 4
_SIG_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_SIG_END = b"-----END SSH SIGNATURE-----"
_PERSON_TIME = re.compile(rb" ([0-9]{1,12}) [+-][0-9]{4}$")
_PATTERN_CHARS = set("*?!")


@dataclass(frozen=True)
class Commit:
    """One commit as the chain check needs it: parents, committer time, signature and payload."""

    sha: str
    parents: tuple[str, ...]
    committer_time: int
    signature: bytes | None  # the armored signature (gpgsig header), None when unsigned
    payload: bytes  # the commit without its gpgsig header: what the signature covers


def parse_commit(sha: str, raw: bytes) -> Commit:
    """Cut a raw commit object into the parts the chain check uses; Refused when malformed."""
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, body = raw.rstrip(b"\n"), b""
    kept: list[bytes] = []
    sig: list[bytes] | None = None
    in_sig = False
    parents: list[str] = []
    committer: int | None = None
    for line in head.split(b"\n"):
        if in_sig and line.startswith(b" "):
            assert sig is not None
            sig.append(line[1:])
            continue
        in_sig = False
        if line.startswith(b"gpgsig "):
            if sig is not None:
                raise Refused(f"commit {sha[:12]} carries two signatures")
            sig, in_sig = [line[len(b"gpgsig ") :]], True
            continue
        kept.append(line)
        if line.startswith(b"parent "):
            parents.append(line[7:].decode("ascii", "replace"))
        elif line.startswith(b"committer "):
            m = _PERSON_TIME.search(line)
            if m is None:
                raise Refused(f"commit {sha[:12]} has no readable committer time")
            committer = int(m.group(1))
    if committer is None:
        raise Refused(f"commit {sha[:12]} has no committer line")
    payload = b"\n".join(kept) + (b"\n\n" + body if sep else b"\n")
    signature = b"\n".join(sig) + b"\n" if sig is not None else None
    return Commit(sha=sha, parents=tuple(parents), committer_time=committer, signature=signature, payload=payload)


def signature_key(signature: bytes) -> str | None:
    """The base64 public key an SSHSIG armored signature names (what allowed_signers lists), or None."""
    text = signature.strip()
    if not text.startswith(_SIG_BEGIN) or not text.endswith(_SIG_END):
        return None
    try:
        blob = base64.b64decode(b"".join(text[len(_SIG_BEGIN) : -len(_SIG_END)].split()), validate=True)
    except ValueError:
        return None
    if blob[:6] != b"SSHSIG" or len(blob) < 14:
        return None
    n = int.from_bytes(blob[10:14], "big")
    key = blob[14 : 14 + n]
    return base64.b64encode(key).decode() if len(key) == n and n else None


def signers_by_key(path: str) -> dict[str, list[str]]:
    """allowed_signers (``principals [options] keytype base64 [comment]``): base64 key -> principal fields."""
    out: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read(4 << 20).splitlines()
    except OSError:
        return out
    for line in lines:
        parsed = parse_signers_line(line)
        if parsed is not None:
            out.setdefault(parsed.key, []).append(parsed.principals)
    return out


def verify_time(ts: int) -> str:
    """``-Overify-time=`` value for a unix time (UTC, the ``Z`` form ssh-keygen reads)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(ts)) + "Z"


class ChainVerifier:
    """Checks every commit of a range against the node's allowed_signers (see the module docstring)."""

    def __init__(
        self, mirror: Mirror, cfg: Config, runner: Runner, signers: str, *, now: float, clock_skew: float
    ) -> None:
        self.mirror = mirror
        self.cfg = cfg
        self.runner = runner
        self.signers = signers  # the allowed_signers file to verify against
        self.now = now
        self.clock_skew = clock_skew
        self._keys = signers_by_key(signers)

    def range(self, base: str | None, tip: str) -> list[str]:
        """The commits in ``base..tip``, oldest first (just ``[tip]`` without a base)."""
        if base is None:
            return [tip]
        r = self.mirror.git("rev-list", "--reverse", "--topo-order", tip, "^" + base, timeout=600)
        if r.returncode != 0:
            raise TickError(f"git rev-list {base[:12]}..{tip[:12]} failed: {short(r.stderr)}")
        return r.stdout.decode("ascii", "replace").split()

    def read(self, shas: list[str]) -> dict[str, Commit]:
        """Read and parse commits with one ``git cat-file --batch`` per BATCH of them."""
        out: dict[str, Commit] = {}
        for i in range(0, len(shas), BATCH):
            chunk = shas[i : i + BATCH]
            r = self.mirror.git("cat-file", "--batch", input="".join(s + "\n" for s in chunk).encode(), timeout=600)
            if r.returncode != 0:
                raise TickError(f"git cat-file --batch failed: {short(r.stderr)}")
            data, pos = r.stdout, 0
            for sha in chunk:
                nl = data.find(b"\n", pos)
                header = data[pos:nl].decode("ascii", "replace").split()
                if len(header) != 3 or header[0] != sha or not header[2].isdigit():
                    raise Refused(f"commit {sha[:12]} is missing from what the remote sent")
                size = int(header[2])
                if header[1] != "commit":
                    raise Refused(f"{sha[:12]} is a {header[1][:20]}, not a commit")
                if size > MAX_COMMIT_BYTES:
                    raise Refused(
                        f"commit {sha[:12]} is {size} bytes, over the {MAX_COMMIT_BYTES} a state commit may weigh"
                    )
                out[sha] = parse_commit(sha, data[nl + 1 : nl + 1 + size])
                pos = nl + 1 + size + 1
        return out

    def verify(self, base: str | None, tip: str) -> int:
        """Refused unless every commit of ``base..tip`` is signed by a trusted key, at its own
        committer time, with times that never go backwards; returns how many were checked."""
        shas = self.range(base, tip)
        if tip not in shas:
            if not shas:
                return 0
            raise Refused(f"internal: {tip[:12]} is not in its own range")
        commits = self.read(shas)
        outside = sorted({p for c in commits.values() for p in c.parents if p not in commits})
        if base is not None:
            commits.update(self.read(outside))
        where = f" (between applied {base[:12]} and tip {tip[:12]})" if base else ""
        limit = self.now + self.clock_skew
        for sha in shas:
            c = commits[sha]
            if c.signature is None:
                raise Refused(f"commit {sha[:12]}{where} is not signed")
            if _SIG_BEGIN not in c.signature:
                raise Refused(f"commit {sha[:12]}{where} is not SSH-signed (only ssh signatures are trusted)")
            if c.committer_time > limit:
                raise Refused(
                    f"commit {sha[:12]}{where} is dated {c.committer_time - int(self.now)} s in the future "
                    f"(over [freshness] clock_skew = {self.clock_skew:g} s)"
                )
            for p in c.parents:
                parent = commits.get(p)
                if parent is not None and c.committer_time < parent.committer_time:
                    raise Refused(
                        f"commit {sha[:12]}{where} is dated before its parent {p[:12]} "
                        f"({c.committer_time} < {parent.committer_time}): committer times may not go backwards "
                        "(a retired key could backdate a commit)"
                    )
        order = [commits[s] for s in shas]
        if len(order) == 1:
            failures = [self._check(order[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(WORKERS, len(order))) as pool:
                failures = list(pool.map(self._check, order))
        for i, failure in enumerate(failures):
            if failure is not None:
                raise Refused(f"commit {order[i].sha[:12]}{where} is not signed by a trusted key ({failure})")
        return len(order)

    def _principal(self, c: Commit, sigfile: str) -> str | None:
        assert c.signature is not None
        key = signature_key(c.signature)
        for field in self._keys.get(key or "", []):
            first = field.split(",")[0]
            if first and not (_PATTERN_CHARS & set(first)):
                return first
        if key is None or key not in self._keys:
            return None
        r = self.runner.run(
            [
                self.cfg.ssh_keygen,
                "-Y",
                "find-principals",
                "-f",
                self.signers,
                "-s",
                sigfile,
                "-Overify-time=" + verify_time(c.committer_time),
            ],
            timeout=60,
        )
        found = r.stdout.decode("utf-8", "replace").split()
        return found[0] if r.returncode == 0 and found else None

    def _check(self, c: Commit) -> str | None:
        """None when ``c``'s signature verifies at its committer time, else the reason."""
        assert c.signature is not None
        with tempfile.TemporaryDirectory(prefix="pi-pull-commit-") as tmp:
            sigfile = os.path.join(tmp, "commit.sig")
            with open(sigfile, "wb") as fh:
                fh.write(c.signature)
            principal = self._principal(c, sigfile)
            if principal is None:
                return "its key is not in allowed_signers"
            argv = [
                self.cfg.ssh_keygen,
                "-Y",
                "verify",
                "-f",
                self.signers,
                "-I",
                principal,
                "-n",
                "git",
                "-s",
                sigfile,
                "-Overify-time=" + verify_time(c.committer_time),
            ]
            if self.cfg.revoked_signers:
                argv += ["-r", self.cfg.revoked_signers]
            r = self.runner.run(argv, input=c.payload, timeout=60)
        if r.returncode == 0:
            return None
        if r.returncode == 127:
            raise TickError(f"cannot check commit signatures: {short(r.stderr)}")
        return short(r.stderr + r.stdout, 200) or f"rc={r.returncode}"
