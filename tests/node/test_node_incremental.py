"""The node's incremental apply (pi-pull/pipull/buckets.py) against a full rebuild.

Real git, real ``postmap`` (hash). A seeded random generator makes sequences of changes
(mailboxes added, removed, changed; domains added, disabled, re-enabled; aliases, catch-alls and
alias domains set and cleared; format-1 -> format-2 moves of a domain's homes). After every step
the release built incrementally from the previous one must hold exactly what a release built from
nothing holds, and what the fragments say: every entry of every Postfix table (``postmap -s`` over
all the buckets of a map) and every passwd-file. A failed reload must leave the previous release
serving with byte-identical tables and passwd-files.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.mailnode import (
    StateRepo,
    age_file,
    git,
    make_signing_key,
    require_binaries,
    run_pi_pull,
    write_allowed_signers,
)

pytestmark = pytest.mark.e2e

EXIT_OK, EXIT_ERROR = 0, 1
MAPS = ("virtual_mailbox_domains", "virtual_mailbox_maps", "virtual_alias_maps", "sender_login_maps")
HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53
ROOT = "/var/vmail"


# --------------------------------------------------------------------------- a state and its fragments


class State:
    """Domains -> mailboxes and aliases, rendered the way the compiler writes the fragments."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.domains: dict[str, dict[str, Any]] = {}
        self.n = 0

    def _id(self) -> str:
        self.n += 1
        return f"20261201-{self.n:06x}"

    def new_domain(self) -> str:
        name = f"{self.rng.choice('abcxyz')}{self.rng.choice('ab')}{self.n}.example"
        self.n += 1
        self.domains[name] = {"boxes": {}, "aliases": {}, "catchall": "", "alias_of": "", "enabled": True, "format": 2}
        for _ in range(self.rng.randint(0, 4)):
            self.add_box(name)
        return name

    def add_box(self, domain: str) -> None:
        local = f"u{self.rng.randint(0, 30)}"
        self.domains[domain]["boxes"][local] = (self._id(), self.rng.choice((100, 1024)), self.rng.random() < 0.9)

    def step(self) -> str:
        """One random change; returns what it did."""
        rng, live = self.rng, [d for d, v in self.domains.items() if v["enabled"]]
        what = rng.choice(
            (
                "add_box",
                "add_box",
                "remove_box",
                "quota",
                "deactivate",
                "new_domain",
                "disable",
                "enable",
                "alias",
                "unalias",
                "catchall",
                "alias_domain",
                "many",
            )
        )
        if what == "new_domain" or not live:
            return "new domain " + self.new_domain()
        d = rng.choice(live)
        dom = self.domains[d]
        boxes = dom["boxes"]
        if what == "add_box":
            self.add_box(d)
        elif what == "remove_box" and boxes:
            del boxes[rng.choice(sorted(boxes))]
        elif what == "quota" and boxes:
            local = rng.choice(sorted(boxes))
            i, q, a = boxes[local]
            boxes[local] = (i, q + 1, a)
        elif what == "deactivate" and boxes:
            local = rng.choice(sorted(boxes))
            i, q, a = boxes[local]
            boxes[local] = (i, q, not a)
        elif what == "disable":
            dom["enabled"] = False
        elif what == "enable":
            for v in self.domains.values():
                v["enabled"] = True
        elif what == "alias":
            dom["aliases"][f"a{rng.randint(0, 9)}"] = sorted({f"x{rng.randint(0, 5)}@ext.example", f"y@{d}"})
        elif what == "unalias" and dom["aliases"]:
            del dom["aliases"][rng.choice(sorted(dom["aliases"]))]
        elif what == "catchall":
            dom["catchall"] = "" if dom["catchall"] else f"catch@{d}"
        elif what == "alias_domain":
            others = [o for o in live if o != d]
            dom["alias_of"] = "" if dom["alias_of"] or not others else rng.choice(others)
        elif what == "many":
            for _ in range(rng.randint(2, 6)):
                self.step()
        return f"{what} {d}"

    def files(self) -> dict[str, str]:
        out = {"rendered/settings": "format 2\npurge_after_days 7\n"}
        for d in sorted(self.domains):
            dom = self.domains[d]
            if not dom["enabled"]:
                continue
            base = f"rendered/domains/{d[:2]}/{d}"
            active = sorted((loc, b) for loc, b in dom["boxes"].items() if b[2])
            out[f"{base}/passwd"] = "".join(
                f"{loc}@{d}:{HASH}:5000:5000::{ROOT}/{d}/{loc}~{b[0]}::userdb_quota_rule=*:storage={b[1]}M\n"
                for loc, b in active
            )
            out[f"{base}/virtual_mailbox_maps"] = "".join(f"{loc}@{d} {d}/{loc}~{b[0]}/\n" for loc, b in active)
            out[f"{base}/virtual_mailbox_domains"] = f"{d} OK\n"
            out[f"{base}/mailboxes"] = "".join(
                f"{loc} {b[0]} {'active' if b[2] else 'inactive'}\n" for loc, b in sorted(dom["boxes"].items())
            )
            lines = []
            if dom["alias_of"]:
                lines.append(f"@{d} @{dom['alias_of']}")
            elif dom["catchall"]:
                lines.append(f"@{d} {dom['catchall']}")
            for local in sorted(set(dom["aliases"]) - set(dom["boxes"])):
                lines.append(f"{local}@{d} {','.join(dom['aliases'][local])}")
            if lines:
                out[f"{base}/virtual_alias_maps"] = "".join(line + "\n" for line in lines)
            # who may send as what: each active mailbox itself, and x@A for each enabled alias domain A -> d
            senders = {f"{loc}@{d}": f"{loc}@{d}" for loc, _b in active}
            for a, adom in self.domains.items():
                if adom["enabled"] and adom["alias_of"] == d:
                    own = {loc for loc, b in adom["boxes"].items() if b[2]}
                    senders.update({f"{loc}@{a}": f"{loc}@{d}" for loc, _b in active if loc not in own})
            if senders:
                out[f"{base}/sender_login_maps"] = "".join(f"{k} {senders[k]}\n" for k in sorted(senders))
        return out


def expected(files: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What the node must serve: every map's entries (sorted) and every passwd-file, from the fragments."""
    maps: dict[str, list[str]] = {m: [] for m in MAPS}
    passwd: dict[str, str] = {}
    for path, text in files.items():
        parts = path.split("/")
        if len(parts) != 5:
            continue
        if parts[4] in maps:
            maps[parts[4]] += text.splitlines()
        elif parts[4] == "passwd":
            passwd[parts[3]] = text
    return {m: sorted(v) for m, v in maps.items()}, passwd


# --------------------------------------------------------------------------- the node side, in process


class Node:
    """pipull's Releases on a real mirror: build a commit from the live release (or from nothing)."""

    def __init__(self, pp: ModuleType, root: Path, mirror: Path, postfix_etc: Path, buckets: int) -> None:
        self.pp = pp
        root.mkdir(parents=True)
        if not (root / "mirror.git").exists():
            (root / "mirror.git").symlink_to(mirror)
        cfg = pp.config.Config(
            remote_url=str(mirror),
            root=str(root),
            mail_root=ROOT,
            mail_uid=5000,
            mail_gid=5000,
            sync=False,
            map_type="hash",
            postmap=f"postmap -c {postfix_etc}",
            map_buckets=buckets,
        )
        self.cfg = cfg
        self.postfix_etc = postfix_etc
        self.root = root
        log = pp.log.make_logger(stream=io.StringIO())
        self.runner = pp.runner.Runner()
        self.log = log
        self.live: str | None = None
        self.history: list[str] = []

    def releases(self) -> Any:
        mirror = self.pp.mirror.Mirror(self.cfg, self.runner, self.log)
        return self.pp.release.Releases(self.cfg, self.runner, self.log, mirror)

    def apply(self, sha: str) -> dict[str, Any]:
        rel = self.releases()  # a new one per tick, as the agent makes one per process
        manifest: dict[str, Any] = rel.build(sha, self.live)
        rel.swap_to(sha)
        self.live = sha
        self.history.insert(0, sha)
        rel.prune({"history": self.history, "applied_commit": sha, "previous_commit": None})
        return manifest

    def tables(self, mapname: str) -> list[Path]:
        postfix = self.root / "current" / "postfix"
        if self.cfg.map_buckets == 0:
            return [postfix / mapname]
        return [postfix / f"{mapname}.{k:02x}" for k in range(self.cfg.map_buckets)]

    def dump(self) -> dict[str, list[str]]:
        """Every entry of every map (``postmap -s`` of each table), as sorted ``key value`` lines."""
        out: dict[str, list[str]] = {}
        for mapname in MAPS:
            lines: list[str] = []
            for table in self.tables(mapname):
                r = subprocess.run(
                    ["postmap", "-c", str(self.postfix_etc), "-s", f"hash:{table}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                lines += [" ".join(line.split(None, 1)) for line in r.stdout.splitlines()]
            out[mapname] = sorted(lines)
        return out

    def passwd(self) -> dict[str, str]:
        base = self.root / "current" / "dovecot" / "passwd.d"
        out = {}
        for dirpath, _dirs, names in os.walk(base, followlinks=True):
            for name in names:
                out[name] = Path(dirpath, name).read_text()
        return out

    def lookup(self, key: str) -> str:
        """What Postfix answers for ``key`` from the list of tables of virtual_mailbox_maps (first match)."""
        r = subprocess.run(
            [
                "postmap",
                "-c",
                str(self.postfix_etc),
                "-q",
                key,
                *(f"hash:{t}" for t in self.tables("virtual_mailbox_maps")),
            ],
            capture_output=True,
            text=True,
        )
        return r.stdout.strip()


def commit(work: Path, files: dict[str, str], message: str) -> str:
    for sub in ("rendered",):
        subprocess.run(["rm", "-rf", str(work / sub)], check=True)
    for rel, text in files.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "--allow-empty", "-m", message)
    sha = git(work, "rev-parse", "HEAD")
    git(work, "push", "--quiet", "--force", str(work.parent / "mirror.git"), f"{sha}:refs/pi-pull/applied")
    return sha


@pytest.fixture
def postfix_etc(tmp_path: Path) -> Path:
    require_binaries("git", "postmap")
    etc = tmp_path / "postfix-etc"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = pi-pull.test\n")
    age_file(etc / "main.cf")  # else each postmap waits ~2 s for a "hot" main.cf
    return etc


def make_repo(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    git(tmp_path, "init", "--quiet", "--bare", str(tmp_path / "mirror.git"))
    git(tmp_path, "init", "--quiet", "--initial-branch=main", str(work))
    git(work, "config", "user.name", "t")
    git(work, "config", "user.email", "t@example.invalid")
    return work


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_equals_full_rebuild(pipull: ModuleType, tmp_path: Path, postfix_etc: Path, seed: int) -> None:
    rng = random.Random(seed)
    state = State(rng)
    for _ in range(6):
        state.new_domain()
    work = make_repo(tmp_path)
    mirror = tmp_path / "mirror.git"
    node = Node(pipull, tmp_path / "inc", mirror, postfix_etc, buckets=4)
    legacy = Node(pipull, tmp_path / "legacy", mirror, postfix_etc, buckets=0)
    history = []
    for step in range(14):
        what = "initial" if step == 0 else state.step()
        history.append(what)
        files = state.files()
        sha = commit(work, files, what)
        manifest = node.apply(sha)
        legacy.apply(sha)
        want_maps, want_passwd = expected(files)
        got = node.dump()
        assert got == want_maps, f"seed {seed}, after {history}"
        assert node.passwd() == want_passwd, f"seed {seed}, after {history}"
        assert legacy.dump() == want_maps and legacy.passwd() == want_passwd
        assert manifest["domains"] == len(want_passwd)
        assert manifest["mailboxes"] == len(want_maps["virtual_mailbox_maps"])
        if step:
            assert manifest["changed_domains"] <= len(state.domains)
        if step % 5 == 4:  # a release built from nothing: the same entries, the same files
            full = Node(pipull, tmp_path / f"full{step}", mirror, postfix_etc, buckets=4)
            fm = full.apply(sha)
            assert full.dump() == got and full.passwd() == want_passwd
            assert (fm["domains"], fm["mailboxes"]) == (manifest["domains"], manifest["mailboxes"])
    # first match over the list of tables, as Postfix searches main.cf's list
    for line in want_maps["virtual_mailbox_maps"][:5]:
        key, value = line.split(" ", 1)
        assert node.lookup(key) == value
    assert node.lookup("nobody@nowhere.example") == ""
    # only the live release's passwd buckets (and those of the kept releases) stay in the store
    store = tmp_path / "inc" / "store"
    index = {
        os.readlink(p).rsplit("/", 1)[1]
        for r in (tmp_path / "inc" / "releases").iterdir()
        for p in (r / "dovecot" / "passwd.d").iterdir()
    }
    assert set(os.listdir(store / "index")) == index
    used = {os.readlink(p).rsplit("/", 1)[1] for name in index for p in (store / "index" / name).iterdir()}
    assert set(os.listdir(store / "passwd")) == used


def test_one_change_touches_one_table_and_one_passwd_bucket(
    pipull: ModuleType, tmp_path: Path, postfix_etc: Path
) -> None:
    """A one-mailbox change copies one table per changed map and one passwd bucket; the rest are hard links."""
    state = State(random.Random(7))
    for _ in range(20):
        state.new_domain()
    work = make_repo(tmp_path)
    node = Node(pipull, tmp_path / "n", tmp_path / "mirror.git", postfix_etc, buckets=8)
    first = commit(work, state.files(), "first")
    node.apply(first)
    d = sorted(state.domains)[3]
    state.domains[d]["boxes"]["fresh"] = ("20261201-ffffff", 1024, True)
    second = commit(work, state.files(), "one more mailbox")
    m = node.apply(second)
    assert m["changed_domains"] == 1
    a, b = tmp_path / "n" / "releases" / first, tmp_path / "n" / "releases" / second
    fresh = sorted(
        p.name for p in (b / "postfix").iterdir() if p.stat().st_ino != (a / "postfix" / p.name).stat().st_ino
    )
    k = pipull.buckets.bucket_of(d, 8)
    assert fresh == [f"sender_login_maps.{k:02x}.db", f"virtual_mailbox_maps.{k:02x}.db"]
    changed = [
        p.name
        for p in (b / "dovecot" / "passwd.d").iterdir()
        if os.readlink(p) != os.readlink(a / "dovecot" / "passwd.d" / p.name)
    ]
    assert changed == [d[0]]
    new_index, old_index = b / "dovecot" / "passwd.d" / d[0], a / "dovecot" / "passwd.d" / d[0]
    changed = [p.name for p in new_index.iterdir() if os.readlink(p) != os.readlink(old_index / p.name)]
    assert changed == [d[:2]]
    assert (new_index / d[:2] / d).read_text().count("\n") == (old_index / d[:2] / d).read_text().count("\n") + 1


def test_incremental_build_checks_sender_claims_across_domains(
    pipull: ModuleType, tmp_path: Path, postfix_etc: Path
) -> None:
    """x@A in T's sender-login fragment is taken only while A's alias map says @A @T, also when
    only A's alias map changes (T's fragment stays as it was)."""
    state = State(random.Random(3))
    t, a = state.new_domain(), state.new_domain()
    state.domains[t]["boxes"]["boss"] = ("20261201-aaaaaa", 100, True)
    state.domains[a]["alias_of"] = t
    work = make_repo(tmp_path)
    node = Node(pipull, tmp_path / "n", tmp_path / "mirror.git", postfix_etc, buckets=4)
    files = state.files()
    assert f"boss@{a} boss@{t}" in files[f"rendered/domains/{t[:2]}/{t}/sender_login_maps"]
    node.apply(commit(work, files, "alias domain"))
    # A stops being an alias domain of T, but T's fragment still claims boss@A: refused, nothing changes
    del files[f"rendered/domains/{a[:2]}/{a}/virtual_alias_maps"]
    bad = commit(work, files, "hostile: a claim without the alias domain")
    with pytest.raises(pipull.errors.Refused, match="not an alias domain"):
        node.apply(bad)
    assert node.live != bad and os.readlink(tmp_path / "n" / "current") != f"releases/{bad}"
    assert not (tmp_path / "n" / "releases" / bad).exists()


# --------------------------------------------------------------------------- rollback after a failed reload


def digest_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (symlinks followed), by relative path."""
    out = {}
    for dirpath, _dirs, names in os.walk(path, followlinks=True):
        for name in names:
            p = Path(dirpath, name)
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("buckets", [0, 4])
def test_rollback_after_failed_reload_restores_exact_maps(tmp_path: Path, postfix_etc: Path, buckets: int) -> None:
    require_binaries("git", "ssh-keygen", "postmap")
    key = make_signing_key(tmp_path / "keys", "trusted")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    repo = StateRepo(tmp_path / "repo", key, format=2)
    for i in range(12):
        repo.set_mailbox(f"u{i}@d{i % 5}.example", password_hash=HASH)
    root = tmp_path / "node"
    flag = tmp_path / "fail-reload"
    ini = tmp_path / "pi-pull.ini"
    ini.write_text(
        f"[remote]\nurl = {repo.bare}\n[node]\nname = pi-test\nallowed_signers = {signers}\n"
        f"[paths]\nroot = {root}\nsync = no\nkeep_releases = 2\nmail_root = {ROOT}\nmail_uid = 5000\nmail_gid = 5000\n"
        f"[services]\npostfix_reload = test ! -e {flag}\ndovecot_reload = true\nmap_type = hash\n"
        f"postmap = postmap -c {postfix_etc}\nmap_buckets = {buckets}\n[lifecycle]\npurge = no\nusage_interval = 0\n"
    )
    first = repo.commit("first")
    assert run_pi_pull(ini, "--once").returncode == EXIT_OK
    before = digest_tree(root / "current")
    assert any("virtual_mailbox_maps" in p for p in before) and any("passwd.d" in p for p in before)

    repo.set_mailbox("new@d1.example", password_hash=HASH)
    repo.remove_mailbox("u2@d2.example")
    second = repo.commit("second")
    flag.write_text("")
    r = run_pi_pull(ini, "--once")
    assert r.returncode == EXIT_ERROR and "rolled back" in r.stderr, r.stderr
    assert os.readlink(root / "current") == f"releases/{first}"
    assert digest_tree(root / "current") == before  # byte for byte: tables, passwd-files, manifest
    assert not (root / "releases" / second).exists()

    flag.unlink()
    r = run_pi_pull(ini, "--once")
    assert r.returncode == EXIT_OK, r.stderr
    assert os.readlink(root / "current") == f"releases/{second}"
    passwd = digest_tree(root / "current" / "dovecot" / "passwd.d")
    assert any(p.endswith("d1.example") for p in passwd)
    tables = [
        f"hash:{root}/current/postfix/virtual_mailbox_maps" + (f".{k:02x}" if buckets else "")
        for k in range(max(buckets, 1))
    ]
    q = subprocess.run(
        ["postmap", "-c", str(postfix_etc), "-q", "new@d1.example", *tables], capture_output=True, text=True
    )
    assert q.stdout.startswith("d1.example/new~")
    q = subprocess.run(
        ["postmap", "-c", str(postfix_etc), "-q", "u2@d2.example", *tables], capture_output=True, text=True
    )
    assert q.returncode == 1 and not q.stdout


# --------------------------------------------------------------------------- the bundle's side of the layout


def test_bundle_with_map_buckets_names_every_table(tmp_path: Path, postfix_etc: Path, pipull: ModuleType) -> None:
    """`mailstate node bundle --map-buckets N`: main.cf lists the N tables of each map, Dovecot reads
    passwd.d/%1d/%2d/%d, the ini says map_buckets = N, and real postconf takes the lines."""
    from mailstate.compiler.node_bundle import BundleOptions, render_node_bundle
    from mailstate.state.errors import InvalidInput

    signers = "mailstate ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIr8bOWhvrCaFv4cl4hI6YyCpJ8Mf1HvuDhlDW7A1jYN\n"
    files = render_node_bundle("pi-1", "https://mail.example.net", signers, BundleOptions(map_buckets=16))
    main_cf = str(files["postfix/main.cf.mailstate"])
    for mapname in MAPS:
        param = "smtpd_sender_login_maps" if mapname == "sender_login_maps" else mapname
        line = next(v for v in main_cf.splitlines() if v.startswith(param + " = "))
        tables = line.split(" = ", 1)[1].split(", ")
        assert tables == [f"hash:/var/lib/pi-pull/current/postfix/{mapname}.{k:02x}" for k in range(16)]
    dovecot = str(files["dovecot/conf.d/90-mailstate.conf"])
    assert dovecot.count("/var/lib/pi-pull/current/dovecot/passwd.d/%1d/%2d/%d") == 2
    ini = tmp_path / "pi-pull.ini"
    ini.write_text(str(files["pi-pull.ini"]).replace("passwd_group = dovecot", "passwd_group ="))
    assert pipull.config.load_config(str(ini)).map_buckets == 16
    (postfix_etc / "main.cf").write_text("compatibility_level = 3.6\n" + main_cf)
    r = subprocess.run(
        ["postconf", "-c", str(postfix_etc), "-h", "virtual_mailbox_maps"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.count("hash:") == 16, r.stderr
    # the default is 16 tables; 0 asks for one table per map (older nodes' main.cf); a bucketed layout needs an updatable map type
    assert render_node_bundle("pi-1", "https://mail.example.net", signers) == files
    plain = render_node_bundle("pi-1", "https://mail.example.net", signers, BundleOptions(map_buckets=0))
    assert "virtual_mailbox_maps = hash:/var/lib/pi-pull/current/postfix/virtual_mailbox_maps\n" in str(
        plain["postfix/main.cf.mailstate"]
    )
    assert "map_buckets = 0" in str(plain["pi-pull.ini"])
    with pytest.raises(InvalidInput):
        render_node_bundle(
            "pi-1", "https://mail.example.net", signers, BundleOptions(map_buckets=16, map_type="texthash")
        )


# --------------------------------------------------------------------------- a real node in the bucketed layout


def test_real_postfix_and_dovecot_serve_the_bucketed_layout(tmp_path: Path) -> None:
    """Postfix (16 tables per map, listed in main.cf) and Dovecot (passwd.d/%1d/%2d/%d) as the bundle
    configures them: logins, recipients and senders follow each incremental apply."""
    from tests.helpers.mailnode import running_mailnode

    key = make_signing_key(tmp_path / "keys", "k")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    with running_mailnode(map_buckets=16) as node:
        repo = StateRepo(tmp_path / "repo", key, mail_root=str(node.mail_root), uid=node.uid, gid=node.gid, format=2)
        for i in range(20):
            repo.set_mailbox(f"u{i}@d{i % 7}.example", "pw-secret-1")
        repo.commit("first")
        ini = node.write_pi_pull_config(tmp_path / "pi.ini", str(repo.bare), signers)
        r = run_pi_pull(ini, "--once")
        assert r.returncode == EXIT_OK, r.stderr
        assert (node.root / "current" / "postfix" / "virtual_mailbox_maps.0f.db").exists()
        assert node.can_login("u3@d3.example", "pw-secret-1") and not node.can_login("u3@d3.example", "wrong")
        try:
            node.rcpt_code("u3@d3.example")
        except Exception:
            raise AssertionError(node.postfix_log()[-3000:]) from None
        assert node.rcpt_code("u3@d3.example")[0] == 250 and node.rcpt_code("zz@d3.example")[0] == 550
        repo.set_mailbox("new@d2.example", "pw-secret-2")
        repo.remove_mailbox("u3@d3.example")
        repo.commit("second")
        r = run_pi_pull(ini, "--once")
        assert r.returncode == EXIT_OK, r.stderr
        assert node.can_login("new@d2.example", "pw-secret-2") and not node.can_login("u3@d3.example", "pw-secret-1")
        assert node.rcpt_code("new@d2.example")[0] == 250 and node.rcpt_code("u3@d3.example")[0] == 550
        assert "open database" not in node.postfix_log()  # every table main.cf names exists


def test_a_node_configured_before_buckets_keeps_its_one_table_layout(tmp_path: Path) -> None:
    """New bundles are bucketed (compiler/node_bundle.py DEFAULT_MAP_BUCKETS); a node whose pi-pull.ini
    has no map_buckets (a bundle from before) keeps one table per map and passwd.d/<domain>, which its
    main.cf and Dovecot config name, through this pi-pull's applies: real Postfix and Dovecot."""
    from tests.helpers.mailnode import running_mailnode

    key = make_signing_key(tmp_path / "keys", "k")
    signers = write_allowed_signers(tmp_path / "allowed_signers", [key])
    with running_mailnode(map_buckets=0) as node:
        repo = StateRepo(tmp_path / "repo", key, mail_root=str(node.mail_root), uid=node.uid, gid=node.gid, format=2)
        for i in range(6):
            repo.set_mailbox(f"u{i}@d{i % 3}.example", "pw-secret-1")
        repo.commit("first")
        ini = node.write_pi_pull_config(tmp_path / "pi.ini", str(repo.bare), signers)
        text = ini.read_text()
        assert "map_buckets = 0\n" in text
        ini.write_text(text.replace("map_buckets = 0\n", ""))  # as an older bundle wrote it
        for step in range(2):
            r = run_pi_pull(ini, "--once")
            assert r.returncode == EXIT_OK, r.stderr
            live = node.root / "current"
            assert (live / "postfix" / "virtual_mailbox_maps.db").is_file() and not (
                live / "postfix" / "virtual_mailbox_maps.00.db"
            ).exists()
            assert (live / "dovecot" / "passwd.d" / "d1.example").is_file()
            assert node.can_login("u1@d1.example", "pw-secret-1") and node.rcpt_code("u1@d1.example")[0] == 250
            if step == 0:
                repo.set_mailbox("new@d2.example", "pw-secret-2")
                repo.commit("second")
        assert node.can_login("new@d2.example", "pw-secret-2") and node.rcpt_code("new@d2.example")[0] == 250
