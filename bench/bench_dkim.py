"""The DKIM signer's share of one submission's latency, on a real node.

    python -m bench.bench_dkim [--n 40]

One real Postfix + Dovecot node on loopback (tests.helpers.mailnode.running_mailnode, root needed) with
the bundle's submission entries, OpenDKIM from the bundle's opendkim.conf as their milter, and a
state applied by the real pi-pull (one mailbox, DKIM on). Each submission is timed from the TCP
connect to the 250 after DATA: STARTTLS, AUTH PLAIN (Dovecot SASL, bcrypt cost 4), MAIL, RCPT,
DATA. The DATA phase (end of data to 250, where the milter runs) is also timed on its own. In ONE
run, `--n` submissions (after 3 unmeasured) in each of:

  A. no milter on the submission service (postconf -P, reload): the baseline;
  B. OpenDKIM as milter, no active key (the node's key is still pending): the milter round trip;
  C. OpenDKIM signing with the node's active RSA-2048 key: what signing adds.

Results (median and p90 per configuration, and C-A, C-B) go to stdout; progress to stderr.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import isolate_env, ms, p50, p90

_HOME = isolate_env()  # before anything imports pygit2

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from mailstate.compiler.node_bundle import opendkim_snippet  # noqa: E402
from tests.helpers.mailnode import (  # noqa: E402
    AGENT_DIR,
    MailNode,
    StateRepo,
    bcrypt_hash,
    free_ports,
    make_signing_key,
    run_pi_pull,
    running_mailnode,
    wait_port,
    write_allowed_signers,
)

PASSWORD = "correct horse battery"
ADDRESS = "anna@shop.example"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def submit_timed(node: MailNode, subject: str) -> tuple[float, float]:
    """(connect to 250-after-DATA, DATA phase alone) in seconds for one authenticated submission."""
    msg = (
        f"From: {ADDRESS}\r\nTo: someone@faraway.example\r\nSubject: {subject}\r\n\r\n" + "a line of the body\r\n" * 40
    )
    t0 = time.perf_counter()
    s = node.submission()
    try:
        s.login(ADDRESS, PASSWORD)
        code, resp = s.mail(ADDRESS)
        assert code == 250, resp
        code, resp = s.rcpt("someone@faraway.example")
        assert code == 250, resp
        t1 = time.perf_counter()
        code, resp = s.data(msg.encode())
        t2 = time.perf_counter()
        assert code == 250, resp
    finally:
        with contextlib.suppress(Exception):
            s.quit()
    return t2 - t0, t2 - t1


def measure(node: MailNode, label: str, n: int) -> tuple[list[float], list[float]]:
    for i in range(3):
        submit_timed(node, f"{label} warm-up {i}")
    total, data = [], []
    for i in range(n):
        t, d = submit_timed(node, f"{label} {i}")
        total.append(t)
        data.append(d)
    node.wait_sink(f"{label} {n - 1}")
    say(f"{label}: {n} submissions, median {ms(p50(total))} ms")
    return total, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="measured submissions per configuration (default 40)")
    ap.add_argument(
        "--socket",
        choices=("inet", "unix"),
        default="inet",
        help="OpenDKIM's socket: inet:127.0.0.1:PORT (the bundle's default) or a unix socket",
    )
    args = ap.parse_args()
    if os.geteuid() != 0 or (shutil.which("opendkim") is None and not Path("/usr/sbin/opendkim").exists()):
        print("needs root and opendkim (apt-get install opendkim opendkim-tools)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-dkim-"))
    tmp.chmod(0o755)  # smtpd (user postfix) reaches the unix socket in here
    (milter_port,) = free_ports(1)
    milter = f"inet:127.0.0.1:{milter_port}" if args.socket == "inet" else f"unix:{tmp}/opendkim.sock"
    od_pid = None
    try:
        with running_mailnode(dkim_milter=milter) as node:
            key_dir = node.workdir / "dkim"
            pid = node.workdir / "opendkim.pid"
            conf = node.workdir / "opendkim.conf"
            conf.write_text(
                opendkim_snippet(
                    dkim_milter=milter,
                    key_dir=str(key_dir),
                    pid_file=str(pid),
                    user="",
                    syslog=False,
                    require_safe_keys=False,
                )
            )  # keys under /tmp
            signing = make_signing_key(tmp / "keys")
            repo = StateRepo(tmp / "repo", signing, mail_root=str(node.mail_root), uid=node.uid, gid=node.gid, format=2)
            repo.set_mailbox(ADDRESS, password_hash=bcrypt_hash(PASSWORD))
            repo.commit("bench")
            signers = write_allowed_signers(tmp / "allowed_signers", [signing])
            reload = f"[ ! -f {pid} ] || kill -USR1 $(cat {pid})"
            ini = node.write_pi_pull_config(
                tmp / "pi-pull.ini",
                str(repo.bare),
                signers,
                name="bench01",
                extra=f"[dkim]\nenabled = yes\nkey_dir = {key_dir}\nkey_owner =\npublish_wait = 0\nreload = {reload}\n",
            )
            r = run_pi_pull(ini)
            assert r.returncode == 0, r.stderr
            sender_map = node.root / "current" / "postfix" / "sender_login_maps"
            if (
                not sender_map.exists() or ADDRESS not in sender_map.read_text()
            ):  # tests.helpers.mailnode.StateRepo renders no sender map
                own = tmp / "sender_login_maps"
                own.write_text(f"{ADDRESS} {ADDRESS}\n")
                subprocess.run(["postmap", "-c", str(node.postfix_dir), f"hash:{own}"], check=True)
                subprocess.run(
                    ["postconf", "-c", str(node.postfix_dir), "-e", f"smtpd_sender_login_maps = hash:{own}"], check=True
                )
            subprocess.run(["opendkim", "-x", str(conf)], check=True)
            if args.socket == "inet":
                wait_port(milter_port)
            else:
                while not (tmp / "opendkim.sock").exists():
                    time.sleep(0.05)
                (tmp / "opendkim.sock").chmod(0o666)  # opendkim runs as root here; smtpd as postfix
            od_pid = int(pid.read_text().split()[0])
            subprocess.run(["postfix", "-c", str(node.postfix_dir), "reload"], check=True, capture_output=True)
            time.sleep(1)
            results = {"B. milter, no key (pending)": measure(node, "B", args.n)}

            # The node's key was never reported (no report URL here): mark it so through the module's own seam.
            sys.path.insert(0, str(AGENT_DIR))
            config = importlib.import_module("pipull.config")
            dkim_mod = importlib.import_module("pipull.dkim")
            runner = importlib.import_module("pipull.runner")
            d = dkim_mod.Dkim(config.load_config(str(ini)), runner.Runner(), logging.getLogger("bench"))
            d.reported(d.step())
            entries = d.step()
            assert [e["state"] for e in entries] == ["active"], entries
            time.sleep(1)  # OpenDKIM reloads on SIGUSR1
            c = measure(node, "C", args.n)
            signed = node.wait_sink(f"C {args.n - 1}")
            assert signed.header("DKIM-Signature"), "C: not signed"
            results["C. milter, signing (RSA-2048)"] = c

            service = f"127.0.0.1:{node.submission_port}/inet/smtpd_milters="
            subprocess.run(["postconf", "-c", str(node.postfix_dir), "-P", service], check=True)
            subprocess.run(["postfix", "-c", str(node.postfix_dir), "reload"], check=True, capture_output=True)
            time.sleep(1)
            a = measure(node, "A", args.n)
            assert not node.wait_sink(f"A {args.n - 1}").header("DKIM-Signature")
            results = {"A. no milter": a, **results}
    finally:
        if od_pid:
            with contextlib.suppress(OSError):
                os.kill(od_pid, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"one authenticated submission over STARTTLS on a real node, {args.n} per configuration (ms); milter socket {args.socket}"
    )
    print(f"{'configuration':34} {'total p50':>10} {'total p90':>10} {'DATA p50':>9} {'DATA p90':>9}")
    for name, (total, data) in results.items():
        print(f"{name:34} {ms(p50(total)):>10} {ms(p90(total)):>10} {ms(p50(data)):>9} {ms(p90(data)):>9}")
    a_t, b_t, c_t = (p50(results[k][0]) for k in results)
    a_d, b_d, c_d = (p50(results[k][1]) for k in results)
    print(
        f"signing share (C-B, p50): total {ms(c_t - b_t)} ms, DATA {ms(c_d - b_d)} ms; whole milter (C-A): total {ms(c_t - a_t)} ms, "
        f"DATA {ms(c_d - a_d)} ms; C/A total {c_t / a_t:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
