"""Every commit verified when a server adopts commits made elsewhere (the node's pipull/chain.py, server side).

A push into DIR/state.git or an upstream fetch may bring many commits; the tip's signature
says nothing about the ones under it. Before the store adopts `tip` on top of the commit it
last validated (`base`), every commit of `base..tip` must:

* carry an SSH signature that `ssh-keygen -Y verify` accepts against DIR/allowed_signers at
  the commit's own committer time (`-Overify-time`, as `git verify-commit` does since git
  2.36), so a key retired with `valid-before=` signs nothing dated after it, and a key removed
  from the file signs nothing at all;
* be dated no earlier than its parents and no later than now + CLOCK_SKEW, so that a retired
  key cannot backdate a commit under its `valid-before`.

Cheap for long ranges: pygit2 walks the range and hands out each commit's signature and signed
payload in process (no git per commit); only ssh-keygen runs once per commit, WORKERS at a time.
A data dir joining an existing fleet (no base) checks the tip only, like a node's first apply:
the history below it was checked by the servers that adopted it, and its tree is all that is
served.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pygit2

from mailstate.state.errors import StoreError
from mailstate.state.signers import parse_signers_line

CLOCK_SKEW = 300  # seconds a committer time may lie in the future
WORKERS = 4
_SIG_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_SIG_END = b"-----END SSH SIGNATURE-----"
_PATTERN_CHARS = set("*?!")


@dataclass(frozen=True)
class _Commit:
    sha: str
    time: int
    parents: tuple[str, ...]
    signature: bytes | None
    payload: bytes


def signature_key(signature: bytes) -> str | None:
    """The base64 public key an armored SSHSIG signature names (as allowed_signers lists it), or None."""
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


def signers_by_key(path: Path) -> dict[str, list[str]]:
    """allowed_signers: base64 key -> the principals fields of the lines that list it."""
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parsed = parse_signers_line(line)
        if parsed is not None:
            out.setdefault(parsed.key, []).append(parsed.principals)
    return out


def verify_time(ts: int) -> str:
    """`-Overify-time=` for a unix time (UTC)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(ts)) + "Z"


def _read(repo: pygit2.Repository, sha: str) -> _Commit:
    obj = repo.get(sha)
    if not isinstance(obj, pygit2.Commit):
        raise StoreError(f"{sha[:12]} is not a commit.")
    signature, payload = obj.gpg_signature
    return _Commit(
        sha=sha,
        time=int(obj.commit_time),
        parents=tuple(str(p) for p in obj.parent_ids),
        signature=signature,
        payload=payload or b"",
    )


def range_problems(
    repo_path: Path, base: str | None, tip: str, allowed_signers: Path, *, now: float | None = None
) -> list[str]:
    """Why `base..tip` (just `tip` without a base) may not be adopted; [] when every commit is
    signed by a trusted key at its own time, with times that never go backwards."""
    repo = pygit2.Repository(str(repo_path))
    walker = repo.walk(pygit2.Oid(hex=tip), pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.REVERSE)
    if base is not None:
        walker.hide(pygit2.Oid(hex=base))
        shas = [str(c.id) for c in walker]
    else:
        shas = [tip]
    commits = {sha: _read(repo, sha) for sha in shas}
    limit = (time.time() if now is None else now) + CLOCK_SKEW
    where = f" (between {base[:12]} and {tip[:12]})" if base else ""
    for sha in shas:
        c = commits[sha]
        if c.signature is None:
            return [f"commit {sha[:12]}{where} is not signed by a trusted key (it carries no signature)"]
        if _SIG_BEGIN not in c.signature:
            return [
                f"commit {sha[:12]}{where} is not signed by a trusted key (not an SSH signature; only those are trusted)"
            ]
        if c.time > limit:
            return [f"commit {sha[:12]}{where} is dated in the future (over {CLOCK_SKEW} s ahead)"]
        for p in c.parents:
            parent = commits.get(p) or _read(repo, p)
            if c.time < parent.time:
                return [
                    f"commit {sha[:12]}{where} is dated before its parent {p[:12]}: committer times may not go backwards (a retired key could backdate)"
                ]
    keys = signers_by_key(allowed_signers)
    order = [commits[s] for s in shas]
    with ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(order)))) as pool:
        failures = list(pool.map(lambda c: _check(c, allowed_signers, keys), order))
    for c, failure in zip(order, failures, strict=True):
        if failure is not None:
            return [f"commit {c.sha[:12]}{where} is not signed by a trusted key ({failure})"]
    return []


def _check(c: _Commit, allowed_signers: Path, keys: dict[str, list[str]]) -> str | None:
    assert c.signature is not None
    with tempfile.TemporaryDirectory(prefix="mailstate-commit-") as tmp:
        sig = Path(tmp) / "commit.sig"
        sig.write_bytes(c.signature)
        signers = os.path.abspath(allowed_signers)
        principal = None
        for field in keys.get(signature_key(c.signature) or "", []):
            first = field.split(",")[0]
            if first and not (_PATTERN_CHARS & set(first)):
                principal = first
                break
        try:
            if principal is None and (signature_key(c.signature) or "") in keys:
                found = subprocess.run(
                    ["ssh-keygen", "-Y", "find-principals", "-f", signers, "-s", str(sig), f"-Overify-time={verify_time(c.time)}"],
                    capture_output=True, timeout=60,
                )  # fmt: skip
                names = found.stdout.decode(errors="replace").split()
                principal = names[0] if found.returncode == 0 and names else None
            if principal is None:
                return "its key is not in allowed_signers"
            proc = subprocess.run(
                [
                    "ssh-keygen",
                    "-Y",
                    "verify",
                    "-f",
                    signers,
                    "-I",
                    principal,
                    "-n",
                    "git",
                    "-s",
                    str(sig),
                    f"-Overify-time={verify_time(c.time)}",
                ],
                input=c.payload,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StoreError("ssh-keygen could not check a commit signature.") from exc
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else f"rc={proc.returncode}"
