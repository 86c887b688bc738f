"""Postfix and Dovecot as services: is it configured, is it running, and what a failed reload means.

Why this module exists: ``postfix reload`` (and ``postfix status``/``start``) print their
messages on stderr only when stderr is a terminal; otherwise they go to syslog or
``maillog_file`` alone. Under a timer, stderr is a pipe or a file, so a reload of a Postfix
that is unconfigured ("No configuration" on Debian: no main.cf) or not running fails with
rc=1 and no text at all. ``explain_reload_failure()`` turns such a result into a sentence that
says what is wrong and what to do.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import subprocess
import time
from collections.abc import Mapping

from .runner import Runner, short

DEFAULT_POSTFIX_DIR = "/etc/postfix"


def systemd_running() -> bool:
    """True when systemd is PID 1 (sd_booted(3): /run/systemd/system exists); false in most containers."""
    return os.path.isdir("/run/systemd/system")


def start_hint(service: str) -> str:
    """How to start ``service`` on this machine."""
    if systemd_running():
        return f"`systemctl start {service}`"
    return "`postfix start`" if service == "postfix" else "`dovecot` (systemd is not running here)"


def postfix_config_dir(command: str) -> str:
    """The config directory a postfix command line uses: its ``-c DIR``, else $MAIL_CONFIG, else /etc/postfix."""
    try:
        argv = shlex.split(command)
    except ValueError:
        argv = []
    for i, arg in enumerate(argv[:-1]):
        if arg == "-c":
            return argv[i + 1]
    return os.environ.get("MAIL_CONFIG") or DEFAULT_POSTFIX_DIR


def postfix_running(runner: Runner, config_dir: str) -> bool | None:
    """Whether Postfix's master runs for ``config_dir`` (its pid file under queue_directory); None if unknown."""
    r = runner.run(["postconf", "-c", config_dir, "-h", "queue_directory"], timeout=30)
    queue = r.stdout.decode("utf-8", "replace").strip()
    if r.returncode != 0 or not queue:
        return None
    try:
        with open(os.path.join(queue, "pid", "master.pid"), encoding="ascii") as fh:
            pid = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def explain_reload_failure(
    service: str, command: str, result: subprocess.CompletedProcess[bytes], runner: Runner | None = None
) -> str:
    """One sentence for a failed reload of ``service``: what is wrong and what to do. Never empty."""
    text = short(result.stderr + result.stdout, 200)
    rc = result.returncode
    head = f"{service} reload failed (rc={rc})"
    if rc == 127:
        return f"{head}: {text or 'command not found'}; check [services] {service}_reload in the config"
    if service == "postfix" and _names(command, "postfix"):
        runner = runner or Runner()
        found = _explain_postfix(command, runner)
        if found:
            return f"{head}: {found}" + (f" ({text})" if text else "")
        if not text:  # configured and running, yet failing: ask postfix itself, on a terminal
            text = output_on_tty(command, runner.env)
    elif service == "dovecot" and (rc == 75 or "not running" in text.lower() or "not active" in text.lower()):
        return (
            f"{head}: dovecot is not running: start it with {start_hint('dovecot')}; the new release is used "
            f"once it runs" + (f" ({text})" if text else "")
        )
    if text:
        return f"{head}: {text}"
    return (
        f"{head} and printed nothing: run `{command}` in a terminal to see why, and check the service's log "
        f"(`journalctl -u {service}`, /var/log/mail.log)"
    )


def output_on_tty(command: str, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> str:
    """Run ``command`` (a shell command) with stdout and stderr on a pseudo-terminal; its output, shortened.

    Postfix commands print their messages only to a terminal. Running the failed reload again
    this way costs nothing (a reload is idempotent) and gives its own reason, e.g.
    ``postfix: fatal: ...``. Empty if no terminal can be had.
    """
    try:
        master, slave = pty.openpty()
    except OSError:
        return ""
    try:
        proc = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    except OSError:
        os.close(master)
        return ""
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return short(b"".join(chunks).replace(b"\r", b""), 200)


def _names(command: str, program: str) -> bool:
    """Whether ``command`` runs ``program`` (``postfix reload``, ``/usr/sbin/postfix -c DIR reload``)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == program


def _explain_postfix(command: str, runner: Runner) -> str:
    config_dir = postfix_config_dir(command)
    if not os.path.isfile(os.path.join(config_dir, "main.cf")):
        return (
            f'postfix is not configured: {config_dir}/main.cf does not exist (installed with "No configuration"?); '
            "run `pi_pull.py install --bundle DIR` (it writes a minimal main.cf) or write main.cf yourself, then start "
            f"postfix with {start_hint('postfix')}"
        )
    if postfix_running(runner, config_dir) is False:
        return f"postfix is not running: start it with {start_hint('postfix')}; the new release is used once it runs"
    return ""
