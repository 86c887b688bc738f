"""Command line: ``pi_pull.py --config FILE [--once | --follow] [-v]``; exit codes in errors.py."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from .agent import Agent, run_once
from .config import Config, load_config
from .errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, ConfigError, Locked, TickError
from .log import make_logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi_pull.py",
        description="mailstate node agent: fetch the signed state repo, verify, and apply rendered/ "
        "Postfix/Dovecot files atomically. To set up a node from its bundle: "
        "`pi_pull.py install --bundle DIR --sync-key-stdin [--dry-run]`; to undo it: "
        "`pi_pull.py uninstall` (each has its own --help). To rotate this node's DKIM key: "
        "`pi_pull.py dkim-rotate --config FILE`. The outbound policy service: `pi_pull.py policy --config FILE`.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="INI config file (see pi-pull.example.ini)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one tick and exit (what the systemd timer does)")
    mode.add_argument(
        "--follow",
        action="store_true",
        help="run until stopped, ticking within about a second of a change on the server (long poll, or "
        "ls-remote polling for a git host) and at least every [agent] interval (pi-pull-follow.service)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also log debug lines")
    return p


def run_loop(agent: Agent, cfg: Config, log: logging.Logger) -> int:
    """Tick every ``[agent] interval`` seconds until SIGTERM/SIGINT."""
    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["flag"]:
        code = run_once(agent, log)
        if code == EXIT_USAGE:
            return code
        deadline = time.monotonic() + cfg.interval
        while not stop["flag"] and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return EXIT_OK


def dkim_rotate(argv: Sequence[str]) -> int:
    """``pi_pull.py dkim-rotate --config FILE``: a new pending key on the idle selector (dkim.py)."""
    p = argparse.ArgumentParser(
        prog="pi_pull.py dkim-rotate",
        description="Make a new DKIM key on this node's idle selector. It is reported as pending on the "
        "next tick and signs only once the server accepted that report and [dkim] "
        "publish_wait has passed; the old key stays published until the next rotation.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="INI config file")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code == 0 else EXIT_USAGE
    log = make_logger()
    try:
        cfg = load_config(args.config)
        if not cfg.dkim:
            raise ConfigError(f"config {args.config}: [dkim] enabled is not yes on this node")
        agent = Agent(cfg, log=log)
        agent.lock.acquire()
        try:
            log.info("dkim: " + agent.dkim.rotate())
        finally:
            agent.lock.release()
    except Locked as e:
        log.error(str(e))
        return EXIT_LOCKED
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except (OSError, TickError) as e:
        log.error(f"dkim-rotate failed: {e}")
        return EXIT_ERROR
    return EXIT_OK


def policy(argv: Sequence[str]) -> int:
    """``pi_pull.py policy --config FILE``: the outbound policy service (policy.py), until SIGTERM."""
    p = argparse.ArgumentParser(
        prog="pi_pull.py policy",
        description="Run the outbound policy service Postfix's submission services ask (check_policy_service): "
        "the state's sending limits and suspensions, counted per login. Listens on [policy] listen.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="INI config file")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code == 0 else EXIT_USAGE
    log = make_logger()
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    import threading

    from .policy import serve

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return serve(cfg, log, stop)
    except (OSError, ValueError) as e:
        log.error(f"policy service failed: {e}")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "policy":
        return policy(args_list[1:])
    if args_list and args_list[0] in ("install", "uninstall"):
        from .install_cli import main as install_main

        return install_main(args_list)
    if args_list and args_list[0] == "dkim-rotate":
        return dkim_rotate(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
        return EXIT_USAGE if code not in (0,) else 0
    log = make_logger(verbose=args.verbose)
    try:
        cfg = load_config(args.config)
        agent = Agent(cfg, log=log)
        if cfg.needs_key:
            _ = agent.sync_key  # fail early on a missing/unsafe key file
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    if args.follow:
        import importlib

        from .follow import follow

        # Everything a tick may import later, now: a long-lived process must not depend on the
        # code cache (pi_pull.py's __main__) keeping an old version's files.
        for name in (
            "apppass", "bulkwrite", "buckets", "chain", "dkim", "ownerfiles", "services", "sieve", "statement", "trust",
            "usage", "verify",
        ):  # fmt: skip
            importlib.import_module(f"{__package__}.{name}")

        return follow(agent, cfg, log, lambda: run_once(agent, log))
    return run_once(agent, log) if args.once else run_loop(agent, cfg, log)
