"""A node tick fetching from a real git host (sshd + git-shell, nginx + git-http-backend) vs the server's endpoint.

    python -m bench.bench_githost [--mailboxes 1000] [--ticks 10] [--changes 5]

In ONE run (root; sshd, nginx, fcgiwrap installed: tests/helpers/githost.py starts them on loopback):

* a data dir seeded with `--mailboxes` mailboxes (bench.seed, one signed commit, repacked) is
  served by `mailstate serve --upstream ssh://...` (a git-shell user on the sshd host); the
  server pushes every write and its accepted-head statement there;
* three stand-in nodes (real postmap, reloads `true`, no report) follow the same state:
  `server` through /v1/nodes/state.git with a sync key (the baseline), `ssh` from the sshd
  host, `http` from nginx + fcgiwrap + git http-backend (anonymous, read-only);
* figures, the three transports interleaved round by round so that a noisy machine hits them
  alike: the first apply (a full fetch), `--ticks` no-op ticks (`pi_pull.py --once`, nothing
  new: ls-remote of the statement only), `--changes` one-mailbox applies (remove-user through
  the API, then one tick per node: fetch + verify + build), and a bare `git ls-remote` of the
  statement ref over each transport. Ratios are against the server endpoint in the same run.

Every `GIT_*` variable is cleared and HOME points at a temp dir before anything loads pygit2
(bench.common.isolate_env); the ssh command (test key, the host's key only) is the one
variable put back. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2

import argparse  # noqa: E402
import base64  # noqa: E402
import grp  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import yaml  # noqa: E402

from bench.seed import pack, seed_state  # noqa: E402
from tests.helpers.githost import GitHost, running_githost  # noqa: E402
from tests.helpers.mailnode import age_file, pi_pull_script  # noqa: E402
from tests.helpers.server import LiveServer  # noqa: E402

API = "/v1/email-account"
TRANSPORTS = ("server", "ssh", "http")


def say(msg: str) -> None:
    print(f"[bench_githost] {msg}", file=sys.stderr, flush=True)


@dataclass
class Node:
    name: str
    url: str
    cfg: Path
    env: dict[str, str]  # for ls-remote: the sync key header (server) or the ssh command
    first: float = 0.0
    noop: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    ls_remote: list[float] = field(default_factory=list)


def postfix_dir(tmp: Path) -> Path:
    """A minimal Postfix config dir for `postmap -c` (a machine with Postfix unconfigured has no main.cf)."""
    d = tmp / "postfix"
    d.mkdir()
    (d / "main.cf").write_text("compatibility_level = 3.6\n")
    age_file(d / "main.cf")  # postmap re-reads a main.cf younger than a second until it cools down
    return d


def write_config(
    path: Path, root: Path, url: str, signers: Path, settings: dict[str, object], *, name: str, key_file: Path | None
) -> Path:
    root.mkdir(parents=True, mode=0o755)
    try:
        group = "dovecot" if grp.getgrnam("dovecot") else ""
    except KeyError:
        group = ""
    lines = ["[remote]", f"url = {url}"]
    if key_file is None and url.startswith("http"):
        lines.append("send_credentials = no")  # the sync key is for the server, not a git host
    lines += ["[node]", f"name = {name}", f"allowed_signers = {signers}"]
    if key_file is not None:
        lines.append(f"sync_key_file = {key_file}")
    postmap = f"postmap -c {root.parent / 'postfix'}"
    lines += [
        "[paths]", f"root = {root}", f"mail_root = {settings['mail_root']}", f"mail_uid = {settings['uid']}",
        f"mail_gid = {settings['gid']}", "keep_releases = 2", f"passwd_group = {group}", "sync = no",
        "[report]", "url = ", "[services]", "postfix_reload = true", "dovecot_reload = true", "map_type = hash", f"postmap = {postmap}",
        "[lifecycle]", "usage_interval = 0",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def tick(node: Node) -> float:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(pi_pull_script()), "--config", str(node.cfg), "--once"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    took = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{node.name} tick exited {r.returncode}: {r.stderr[-2000:]}")
    return took


def ls_remote(node: Node) -> float:
    t = time.perf_counter()
    r = subprocess.run(
        ["git", "ls-remote", node.url, "refs/mailstate/accepted"],
        capture_output=True,
        text=True,
        env=node.env,
        timeout=60,
    )
    took = time.perf_counter() - t
    if r.returncode != 0 or "refs/mailstate/accepted" not in r.stdout:
        raise RuntimeError(f"{node.name} ls-remote: {r.stderr[-1000:]}")
    return took


def rounds(
    nodes: list[Node],
    n: int,
    each: Callable[[Node], float],
    into: Callable[[Node], list[float]],
    before: Callable[[], None] | None = None,
) -> None:
    """n rounds; each round runs `each` once per node, starting with a different node each time."""
    for i in range(n):
        if before is not None:
            before()
        for node in nodes[i % len(nodes) :] + nodes[: i % len(nodes)]:
            into(node).append(each(node))


def run(args: argparse.Namespace, tmp: Path, host: GitHost) -> list[Node]:
    host.create_repo()
    os.environ["GIT_SSH_COMMAND"] = host.ssh_command  # pi-pull keeps it; nothing else of GIT_* is set
    say(f"seeding {args.mailboxes} mailboxes")
    info = seed_state(tmp / "srv" / "data", args.mailboxes)
    pack(info)
    server = LiveServer(tmp / "srv")
    token = server.create_token(name="admin")
    server.env.update(host.ssh_env)
    server.extra_args = ["--upstream", host.ssh_url()]
    t = time.perf_counter()
    server.start(timeout=600)  # pushes the seeded history to the empty host over ssh
    say(f"server up in upstream mode over ssh ({time.perf_counter() - t:.1f}s, incl. the first push)")
    admin = server.client(token)
    try:
        settings = yaml.safe_load(server.git("show", "main:mailstate.yaml"))
        etc = tmp / "etc"
        etc.mkdir()
        postfix_dir(tmp)
        signers = etc / "allowed_signers"
        shutil.copy(server.data.allowed_signers, signers)
        r = admin.post(f"{API}/add-node", json={"name": "bench-srv", "ip_address": "127.0.0.1"})
        assert r.status_code == 201, r.text
        key = r.json()["sync_key"]
        key_file = etc / "sync_key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        auth = base64.b64encode(f"bench-srv:{key}".encode()).decode()
        basic = {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {auth}",
        }
        urls = {"server": f"{server.url}/v1/nodes/state.git", "ssh": host.ssh_url(), "http": host.http_url()}
        nodes = []
        for name in TRANSPORTS:
            cfg = write_config(
                etc / f"{name}.ini", tmp / f"node-{name}", urls[name], signers, settings,
                name="bench-srv" if name == "server" else f"bench-{name}", key_file=key_file if name == "server" else None,
            )  # fmt: skip
            nodes.append(Node(name, urls[name], cfg, {**os.environ, **(basic if name == "server" else {})}))
        say("first apply (full fetch) per transport")
        for node in nodes:
            node.first = tick(node)
        say(f"{args.ticks} no-op ticks and ls-remotes per transport")
        rounds(nodes, args.ticks, tick, lambda n: n.noop)
        rounds(nodes, args.ticks, ls_remote, lambda n: n.ls_remote)
        emails = iter(info.emails)

        def change() -> None:
            r = admin.post(f"{API}/remove-user", json={"email": next(emails)})
            assert r.status_code == 200, r.text

        say(f"{args.changes} one-mailbox applies per transport")
        rounds(nodes, args.changes, tick, lambda n: n.apply, before=change)
        return nodes
    finally:
        admin.close()
        server.stop()


def report(args: argparse.Namespace, nodes: list[Node]) -> None:
    base = nodes[0]
    print(f"bench_githost: {args.mailboxes} mailboxes; node tick (`pi_pull.py --once`, whole process) per transport")
    print(
        "  server = mailstate's /v1/nodes/state.git (sync key); ssh = sshd + git-shell; http = nginx + fcgiwrap + git http-backend"
    )
    print()
    print(
        "| transport | first apply | no-op tick p50 / p90 | one-mailbox apply p50 / p90 | ls-remote p50 | no-op vs server | apply vs server |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in nodes:
        print(
            f"| {n.name} | {ms(n.first, 0)} ms | {ms(p50(n.noop), 0)} / {ms(p90(n.noop), 0)} ms | {ms(p50(n.apply), 0)} / {ms(p90(n.apply), 0)} ms"
            f" | {ms(p50(n.ls_remote), 0)} ms | {p50(n.noop) / p50(base.noop):.2f}x | {p50(n.apply) / p50(base.apply):.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mailboxes", type=int, default=1000)
    ap.add_argument("--ticks", type=int, default=10)
    ap.add_argument("--changes", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_githost needs root (sshd and nginx run as root from temp configs)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-githost-"))
    tmp.chmod(0o755)
    try:
        import pytest

        try:
            with running_githost(ssh=True, http=True) as host:
                nodes = run(args, tmp, host)
        except pytest.skip.Exception as exc:  # a missing program: say which, as the tests do
            sys.exit(f"bench_githost: {exc}")
        report(args, nodes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
