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
_TLDS = ["com"] * 8 + ["nl"] * 5 + ["de"] * 3 + ["net", "org", "eu", "be", "io", "co.uk", "fr", "shop", "dev", "info", "online"]
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


def seed_state(root: Path, mailboxes: int, per_domain: int = 5, *, projects: int = 50, seed: int = 1, mail_root: str = "/var/vmail") -> SeedInfo:
    """Create the data dir `root` holding `mailboxes` mailboxes in ONE signed commit.

    Domains hold `per_domain` mailboxes each (the last one takes the remainder). bcrypt cost
    in mailstate.yaml is 4, so add-user/update-password stay cheap in benches that use them.
    """
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
        changes[files.domain_path(name)] = files.dump_domain(dom)
        changes.update(render_domain(dom, settings))
    stats["render"] = time.perf_counter() - t

    t = time.perf_counter()
    tree = repo.build_tree(base, changes)
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


def pack(info: SeedInfo) -> float:
    """Repack the seeded repo (`git repack -adq`), as a long-lived repo would be; seconds taken."""
    t = time.perf_counter()
    subprocess.run(["git", "repack", "-a", "-d", "-q"], cwd=info.data_dir.repo, check=True, capture_output=True)
    return time.perf_counter() - t
