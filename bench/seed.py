"""Synthetic states for benchmarks: one data dir whose single seed commit holds N mailboxes.

    from bench.seed import seed_state
    info = seed_state(tmp / "data", 100_000)          # ~20k domains, 5 mailboxes each
    store = open_store(info.root)

The seed is built the way the store builds a commit (files.dump_domain, render_domain,
GitRepo.build_tree, GitRepo.commit, move_branch), but as ONE signed commit on top of the
`init` commit, so a 100k-mailbox state takes seconds rather than 100k API calls. Every
mailbox reuses one precomputed cost-4 bcrypt hash of `SEED_PASSWORD`.

Domain names are random pronounceable words plus a TLD from a seeded `random.Random`, so
the same arguments always give the same names and the two-character buckets
(`domains/<bb>/`) spread the way real names do (a few hundred buckets, unevenly filled).
Every domain is linked to one of `projects` projects (ids 1..projects) and email-enabled.

`fast=True` (the default from 200k mailboxes on) streams the files into `git fast-import`
instead of writing them as loose objects through libgit2: one pack, no million files on disk.
The tree is the same; the signed commit on top of it is made by the store's own code
(`GitRepo.commit`), and the throwaway unsigned commit fast-import needs is never on a branch.

    python -m bench.seed --mailboxes 1000000 --out /tmp/seed-1m    # 200k domains, ~2-4 min
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailstate.compiler.render import render_domain
from mailstate.state import files
from mailstate.state.datadir import DataDir, init_data_dir
from mailstate.state.gitrepo import GitRepo
from mailstate.state.models import DomainFile, Mailbox, Settings
from mailstate.state.signing import Ed25519Signer
from mailstate.state.snapshot import Actor
from mailstate.state.store import clean_request_id, commit_message, utcnow

SEED_PASSWORD = "bench-password"
# bcrypt cost 4 of SEED_PASSWORD, computed once; hashing 100k passwords would dominate the seed.
SEED_HASH = "{BLF-CRYPT}$2b$04$eD2YH1/jiNwdLvnPKDJJdOGYHFz/JWTnqcjiWELOKVYukGo9hi6Q."

_ONSETS = "b c d f g h j k l m n p r s t v w z br cr dr fl gr kl pl pr sch sh st tr ch th".split()
_VOWELS = "a e i o u a e o ai ee oo ei".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "x", "nd", "rt", "st", "m", "ck"]
_TLDS = (
    ["com"] * 8
    + ["nl"] * 5
    + ["de"] * 3
    + ["net", "org", "eu", "be", "io", "co.uk", "fr", "shop", "dev", "info", "online"]
)
_FIRST = "anna bas chris daan emma fleur gijs hanna ivo jan kim lars lisa mark noah olga piet rosa sam tess vera wout yara zoe".split()
_ROLES = "info admin sales support contact office billing hr jobs hello noreply press team finance".split()


@dataclass(frozen=True)
class SeedInfo:
    """What a seeded data dir holds (stable: the HTTP bench imports this too)."""

    root: Path  # the data dir: open_store(root) / DataDir(root)
    data_dir: DataDir
    head: str  # the seed commit
    domains: list[str]  # every domain, sorted; all linked and email-enabled
    project_of: dict[str, int]  # domain -> project id (1..projects)
    emails: list[str]  # every mailbox address, all active, in domain order
    mailboxes: int
    projects: int
    password: str = SEED_PASSWORD  # plain text of the one hash every mailbox has
    seconds: float = 0.0  # wall time of the seed
    buckets: int = 0  # distinct domains/<bb>/ folders
    stats: dict[str, float] = field(default_factory=dict)  # seconds per phase


def _word(rng: random.Random) -> str:
    text = ""
    for _ in range(rng.choice((1, 2, 2, 2, 3, 3))):
        if text or rng.random() < 0.85:
            text += rng.choice(_ONSETS)
        text += rng.choice(_VOWELS)
    text += rng.choice(_CODAS)
    return text


def domain_names(count: int, seed: int = 1) -> list[str]:
    """`count` distinct, realistic-looking domain names (deterministic for a seed)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        name = _word(rng)
        roll = rng.random()
        if roll < 0.2:
            name += "-" + _word(rng)
        elif roll < 0.3:
            name += str(rng.randint(1, 99))
        elif roll < 0.35:
            name = "my" + name
        out.add(f"{name}.{rng.choice(_TLDS)}")
    return sorted(out)


def _local_parts(rng: random.Random, count: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        roll = rng.random()
        if roll < 0.3 and len(seen) < len(_ROLES):
            local = rng.choice(_ROLES)
        elif roll < 0.8:
            local = f"{rng.choice(_FIRST)}.{_word(rng)}"
        else:
            local = f"{rng.choice(_FIRST)}{rng.randint(1, 999)}"
        if local not in seen:
            seen.add(local)
            out.append(local)
    return out


FAST_FROM = 200_000  # mailboxes; above this, loose objects cost minutes and millions of inodes


def seed_state(
    root: Path,
    mailboxes: int,
    per_domain: int = 5,
    *,
    projects: int = 50,
    seed: int = 1,
    mail_root: str = "/var/vmail",
    fast: bool | None = None,
) -> SeedInfo:
    """Create the data dir `root` holding `mailboxes` mailboxes in ONE signed commit.

    Domains hold `per_domain` mailboxes each (the last one takes the remainder). bcrypt cost
    in mailstate.yaml is 4, so add-user/update-password stay cheap in benches that use them.
    `fast` (default: from FAST_FROM mailboxes on) builds the tree with `git fast-import`.
    """
    fast = mailboxes >= FAST_FROM if fast is None else fast
    t0 = time.perf_counter()
    stats: dict[str, float] = {}
    settings = Settings(bcrypt_cost=4, mail_root=mail_root)
    dd = init_data_dir(Path(root), settings)
    repo = GitRepo(dd.repo)
    base = repo.head()
    assert base is not None
    stats["init"] = time.perf_counter() - t0

    t = time.perf_counter()
    rng = random.Random(seed)
    ndomains = max(1, -(-mailboxes // per_domain)) if mailboxes else 0
    names = domain_names(ndomains, seed)
    rng.shuffle(shuffled := list(names))  # projects own scattered domains, not runs of them
    project_of = {name: 1 + i % projects for i, name in enumerate(shuffled)}
    box = Mailbox.model_construct(password=SEED_HASH, quota_mb=1024, active=True)
    quotas = {q: Mailbox.model_construct(password=SEED_HASH, quota_mb=q, active=True) for q in (256, 512, 2048, 10240)}
    emails: list[str] = []
    changes: dict[str, bytes | None] = {}
    importer = _FastImport(dd.repo, base) if fast else None
    left = mailboxes
    for i, name in enumerate(names):
        count = min(per_domain, left) if i < ndomains - 1 else left
        left -= count
        boxes = {}
        for local in _local_parts(rng, count):
            template = quotas[q] if (q := rng.choice((0, 0, 0, 0, 0, 256, 512, 2048, 10240))) else box
            # state format 2: every mailbox has its own id (unique: the running count in hex)
            boxes[local] = template.model_copy(update={"id": f"20260101-{len(emails):06x}"})
            emails.append(f"{local}@{name}")
        dom = DomainFile.model_construct(domain=name, project_id=project_of[name], email_enabled=True, mailboxes=boxes)
        # PyYAML's dumper is ~1 ms a domain (minutes at 200k); the seed's files are simple
        # enough to write directly, and the first ones are checked against dump_domain.
        text = _canonical(dom) if fast else None
        if text is None or i < CHECKED:
            canonical = files.dump_domain(dom)
            assert text is None or text == canonical, f"the seed's writer differs from dump_domain for {name}"
            text = canonical
        changes[files.domain_path(name)] = text
        changes.update(render_domain(dom, settings))
        if importer is not None:
            importer.add(changes)
            changes.clear()
    stats["render"] = time.perf_counter() - t

    t = time.perf_counter()
    tree = importer.finish() if importer is not None else repo.build_tree(base, changes)
    stats["tree"] = time.perf_counter() - t
    t = time.perf_counter()
    message = commit_message("seed", f"{mailboxes} mailboxes", None, Actor.admin("bench:seed"), clean_request_id(None))
    sha = repo.commit(tree, base, message, Ed25519Signer(dd.key), utcnow())
    repo.move_branch(sha, base)
    stats["commit"] = time.perf_counter() - t
    return SeedInfo(
        root=Path(root),
        data_dir=dd,
        head=sha,
        domains=names,
        project_of=project_of,
        emails=emails,
        mailboxes=mailboxes,
        projects=projects,
        seconds=time.perf_counter() - t0,
        buckets=len({files.bucket(n) for n in names}),
        stats=stats,
    )


CHECKED = 500  # domains whose fast-written file is compared with files.dump_domain


def _plain_key(text: str) -> bool:
    return files._plain_str(text.encode()) == text


def _canonical(dom: DomainFile) -> bytes | None:
    """`files.dump_domain(dom)` for the seed's plain domains (no aliases, forwarding, or keys
    YAML would quote), written directly; None for anything else."""
    if dom.aliases or dom.alias_of is not None or not _plain_key(dom.domain):
        return None
    out = [
        f"domain: {dom.domain}\nproject_id: {dom.project_id}\nemail_enabled: {'true' if dom.email_enabled else 'false'}\nmailboxes:\n"
    ]
    for local, box in sorted(dom.mailboxes.items()):
        if box.forward_to is not None or box.id is None or "'" in box.password or not _plain_key(local):
            return None
        active = "true" if box.active else "false"
        out.append(
            f"  {local}:\n    id: {box.id}\n    password: '{box.password}'\n    quota_mb: {box.quota_mb}\n    active: {active}\n"
        )
    return "".join(out).encode()


class _FastImport:
    """Files streamed into `git fast-import` as one commit on a throwaway ref; `finish()`
    answers that commit's tree and drops the ref (the commit itself is never used)."""

    REF = "refs/bench/seed-import"

    def __init__(self, repo: Path, base: str) -> None:
        self.repo = repo
        self.proc = subprocess.Popen(
            ["git", "-C", str(repo), "fast-import", "--quiet", "--done"],
            stdin=subprocess.PIPE,
        )
        assert self.proc.stdin is not None
        self.out = self.proc.stdin
        msg = b"seed tree (throwaway)"
        head = b"commit %s\ncommitter bench <bench@example.invalid> 0 +0000\n" % self.REF.encode()
        self.out.write(head + b"data %d\n%s\nfrom %s\n" % (len(msg), msg, base.encode()))

    def add(self, changes: dict[str, bytes | None]) -> None:
        for path, data in changes.items():
            assert data is not None and "\n" not in path and not path.startswith('"')
            self.out.write(b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data))

    def finish(self) -> str:
        self.out.write(b"\ndone\n")
        self.out.close()
        if self.proc.wait() != 0:
            raise RuntimeError("git fast-import failed")
        git = ["git", "-C", str(self.repo)]
        tree = subprocess.run(
            [*git, "rev-parse", f"{self.REF}^{{tree}}"], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run([*git, "update-ref", "-d", self.REF], check=True)
        return tree


def pack(info: SeedInfo) -> float:
    """Repack the seeded repo (`git repack -adq`), as a long-lived repo would be; seconds taken."""
    t = time.perf_counter()
    subprocess.run(["git", "repack", "-a", "-d", "-q"], cwd=info.data_dir.repo, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    """`python -m bench.seed --mailboxes N --out DIR`: seed a data dir and print what it took."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mailboxes", type=int, default=1_000_000)
    parser.add_argument("--per-domain", type=int, default=5)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True, help="the data dir to create (must not exist)")
    parser.add_argument("--loose", action="store_true", help="libgit2 loose objects instead of git fast-import")
    args = parser.parse_args()
    info = seed_state(args.out, args.mailboxes, args.per_domain, projects=args.projects, fast=not args.loose)
    du = subprocess.run(["du", "-sb", str(args.out)], capture_output=True, text=True).stdout.split()[0]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in info.stats.items())
    print(
        f"{info.mailboxes} mailboxes, {len(info.domains)} domains, {info.buckets} buckets: {info.seconds:.1f} s ({phases}); {int(du) / 1e6:.0f} MB on disk"
    )


if __name__ == "__main__":
    main()
