"""``pi_pull.py install ...`` and ``pi_pull.py uninstall ...`` (see install.py for what they do)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence

from .agent import Agent, run_once
from .certs import LETS_ENCRYPT, check_options
from .config import load_config
from .errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError, TickError
from .install import DIR_KEYS, Bundle, Installer, Options, read_sync_key_input, resolve_dirs
from .log import add_secret, make_logger
from .uninstall import Uninstaller

COMMANDS = ("install", "uninstall")
DEFAULT_ETC_DIR = "/etc/pi-pull"

INSTALL_EXIT_CODES = """exit codes:
  0  installed (or already installed) and the first tick applied or found nothing new
  1  a step failed (the steps before it are done and recorded: run uninstall to undo them),
     or the first tick failed (the files are installed; the message says what to fix)
  2  usage error, a bad or damaged bundle, or no sync key
  3  the first tick refused the fetched commit (signature, rollback, invalid content)
  4  another pi-pull run holds the lock
"""
UNINSTALL_EXIT_CODES = """exit codes:
  0  uninstalled (or nothing was installed)
  1  a step failed (the message names it; run uninstall again after fixing it)
  2  usage error, or a damaged install record
"""


def _dir_options(p: argparse.ArgumentParser) -> None:
    defaults = {
        "etc_dir": DEFAULT_ETC_DIR,
        "lib_dir": "/usr/local/lib/pi-pull",
        "systemd_dir": "/etc/systemd/system",
        "postfix_dir": "/etc/postfix",
        "dovecot_dir": "/etc/dovecot",
        "rspamd_dir": "/etc/rspamd",
    }
    for key in DIR_KEYS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, metavar="DIR", help=f"default {defaults[key]}")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "install":
        p = argparse.ArgumentParser(
            prog="pi_pull.py install",
            description="Install a node bundle (from `mailstate node bundle`) on this machine: files, sync key (0600), "
            "Postfix main.cf lines, Dovecot snippet and auth, mail root, systemd units and timer, then a "
            "first tick. Idempotent: a second run changes nothing. Undo with `pi_pull.py uninstall`.",
            epilog=INSTALL_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder (holds bundle.json)")
        key = p.add_mutually_exclusive_group()
        key.add_argument(
            "--sync-key-stdin",
            action="store_true",
            help="read the sync key from stdin (a terminal prompts without echo)",
        )
        key.add_argument("--sync-key-file", metavar="FILE", help="read the sync key from FILE")
        _dir_options(p)
        p.add_argument("--mail-root", metavar="DIR", help="create this mail root instead of the state's (tests)")
        p.add_argument("--no-tick", action="store_true", help="do not run the first tick")
        _tls_options(p)
    else:
        p = argparse.ArgumentParser(
            prog="pi_pull.py uninstall",
            description="Undo `pi_pull.py install` as recorded in <etc-dir>/install.json: restores the Postfix and Dovecot "
            "files byte for byte, removes the installed files, units, sync key and certificate (and deletes it from "
            "certbot when install got it there). Keeps the mail root "
            "(Maildirs) and the release root.",
            epilog=UNINSTALL_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--etc-dir",
            dest="etc_dir",
            metavar="DIR",
            help=f"where install put pi-pull.ini (default {DEFAULT_ETC_DIR})",
        )
    p.add_argument("--dry-run", action="store_true", help="print every action and change nothing")
    p.add_argument(
        "--no-start",
        action="store_true",
        help="do not call systemctl (no daemon-reload, no service (re)start, no timer enable/disable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also log the first tick's debug lines")
    return p


def _tls_options(p: argparse.ArgumentParser) -> None:
    tls = p.add_argument_group(
        "certificate",
        "Postfix and Dovecot need one. With --acme-email, certbot (apt-get install certbot) gets it for --mail-host "
        "over HTTP-01 and renews it (Debian's certbot.timer); its deploy hook puts each new one in place and reloads "
        "both. Without --acme-email, install makes a self-signed one when there is none (and says so); a certificate "
        "already at the bundle's TLS paths is kept.",
    )
    tls.add_argument("--acme-email", metavar="E", help="the ACME account's address (expiry notices go there)")
    tls.add_argument(
        "--mail-host", metavar="H", help="the name clients and servers reach this node by (e.g. mx1.example.net)"
    )
    tls.add_argument("--acme-server", metavar="URL", help=f"the ACME directory URL (default {LETS_ENCRYPT})")
    tls.add_argument(
        "--acme-ca-bundle", metavar="FILE", help="CA certificates to trust for the ACME server (a private one)"
    )
    tls.add_argument(
        "--acme-http-port",
        metavar="N",
        type=int,
        help="the port certbot answers HTTP-01 on (default 80; the ACME server "
        "must reach H on port 80, e.g. forwarded to N)",
    )
    tls.add_argument(
        "--acme-webroot",
        metavar="DIR",
        help="answer HTTP-01 through DIR, served on port 80 by a web server that runs here",
    )
    tls.add_argument(
        "--acme-dir", metavar="DIR",
        help="certbot's directories DIR/config, DIR/work, DIR/logs instead of Debian's /etc/letsencrypt, "
        "/var/lib/letsencrypt, /var/log/letsencrypt (whose certificates certbot.timer renews)",
    )  # fmt: skip


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    hint = " (run as root)" if e.errno in (errno.EACCES, errno.EPERM) else ""
    return f"{where}{e.strerror or e}{hint}"


def main(argv: Sequence[str]) -> int:
    """Run ``install`` or ``uninstall`` (argv[0]); returns the exit code."""
    command = argv[0]
    parser = build_parser(command)
    try:
        args = parser.parse_args(list(argv[1:]))
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    try:
        return _install(args) if command == "install" else _uninstall(args)
    except ConfigError as e:
        print(f"pi-pull {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TickError as e:
        print(f"pi-pull {command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"pi-pull {command}: error: {_os_error(e)}", file=sys.stderr)
        return EXIT_ERROR


def _options(args: argparse.Namespace, dirs: dict[str, str]) -> Options:
    acme, host = None, ""
    if hasattr(args, "acme_email"):  # install
        acme, host = check_options(
            args.acme_email,
            args.mail_host,
            args.acme_server,
            args.acme_ca_bundle,
            args.acme_http_port,
            args.acme_webroot,
            args.acme_dir,
        )
    return Options(
        dirs=dirs,
        mail_root=getattr(args, "mail_root", None) or "",
        dry_run=args.dry_run,
        start=not args.no_start,
        tick=not getattr(args, "no_tick", True),
        acme=acme,
        mail_host=host,
    )


def _install(args: argparse.Namespace) -> int:
    bundle = Bundle.load(os.path.abspath(args.bundle))
    overrides = {k: os.path.abspath(getattr(args, k)) for k in DIR_KEYS if getattr(args, k)}
    opts = _options(args, resolve_dirs(bundle, overrides))
    log = make_logger(verbose=args.verbose)
    key = read_sync_key_input("-" if args.sync_key_stdin else args.sync_key_file)
    if key:
        add_secret(log, key)
    node = bundle.manifest.get("node", "?")
    print(
        f"pi-pull install: node {node} from {bundle.path}" + (" (dry run: nothing is changed)" if opts.dry_run else "")
    )
    installer = Installer(bundle, opts, sync_key=key)
    changes = installer.run()
    code = EXIT_OK
    if opts.dry_run:
        print("would run a first tick" if opts.tick else "--no-tick: no first tick")
    elif opts.tick:
        code = _first_tick(installer, log)
    else:
        print("--no-tick: the first tick is left to the timer")
    installer.enable_timer()
    changes = installer.steps.changes
    if opts.dry_run:
        print(f"dry run: {changes} change(s) would be made" if changes else "already installed: nothing would change")
    else:
        print(f"installed node {node}: {changes} change(s)" if changes else "already installed: nothing changed")
    return code


def _first_tick(installer: Installer, log: logging.Logger) -> int:
    print(f"first tick: pi_pull.py --config {installer.config_file} --once")
    cfg = load_config(installer.config_file)
    code = run_once(Agent(cfg, runner=installer.runner, log=log), log)
    if code != EXIT_OK:
        print(
            f"installed, but the first tick failed (exit {code}): see the error above; the timer retries every minute",
            file=sys.stderr,
        )
    return code


def _uninstall(args: argparse.Namespace) -> int:
    etc_dir = os.path.abspath(args.etc_dir or DEFAULT_ETC_DIR)
    opts = _options(args, {"etc_dir": etc_dir})
    print(f"pi-pull uninstall: {etc_dir}" + (" (dry run: nothing is changed)" if opts.dry_run else ""))
    changes = Uninstaller(opts).run()
    if opts.dry_run:
        print(f"dry run: {changes} change(s) would be made")
    elif changes:
        print(f"uninstalled: {changes} change(s)")
    return EXIT_OK
