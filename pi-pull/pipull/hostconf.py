"""Edits of the host's Postfix and Dovecot configuration, computed as new file contents.

Every function here returns the bytes a file should have; nothing writes the live config, so
``install --dry-run`` can show what would change and a second install can see that nothing
does. Postfix edits go through the real ``postconf -c <temp copy> -e``, so main.cf keeps
Postfix's own formatting rules. Dovecot edits are line edits that carry a marker comment and
are exactly reversible.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence

from .errors import TickError
from .runner import Runner, short

MARKER = "# disabled by pi_pull.py install; pi_pull.py uninstall restores it"
INCLUDE_MARKER = "# added by pi_pull.py install; pi_pull.py uninstall removes it"
_AUTH_SYSTEM = re.compile(r"^\s*!include(_try)?\s+auth-system\.conf\.ext\s*$")
_CONF_D_GLOB = re.compile(r"^\s*!include(_try)?\s+(\S*/)?conf\.d/\*\.conf\s*$")


class HostConfigError(TickError):
    """A host configuration file cannot be edited (postconf failed, unreadable file)."""


def setting_lines(snippet: str) -> list[str]:
    """The ``name = value`` lines of a main.cf snippet (comments and blank lines dropped)."""
    return [line.strip() for line in snippet.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_main_cf(text: str) -> dict[str, str]:
    """main.cf parameters as written (``name = value``, continuation lines start with white space)."""
    params: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name:
            params[name] += " " + line.strip()
            continue
        key, eq, value = line.partition("=")
        if eq:
            name = key.strip()
            params[name] = value.strip()
    return params


def postconf_edit(
    runner: Runner,
    main_cf: bytes,
    argv_list: Sequence[Sequence[str]],
    master_cf: bytes | None = None,
    *,
    postconf: str = "postconf",
) -> bytes:
    """Apply ``postconf -c TMP <argv>`` for each argv to a temp copy of main.cf; return the new main.cf."""
    return _postconf(runner, main_cf, argv_list, master_cf, postconf=postconf)[0]


def _postconf(
    runner: Runner,
    main_cf: bytes,
    argv_list: Sequence[Sequence[str]],
    master_cf: bytes | None = None,
    *,
    postconf: str = "postconf",
) -> tuple[bytes, bytes, bytes]:
    """(main.cf, master.cf, the last command's stdout) after ``postconf -c TMP <argv>`` on temp copies."""
    out = b""
    with tempfile.TemporaryDirectory(prefix="pi-pull-postconf-") as tmp:
        path = os.path.join(tmp, "main.cf")
        with open(path, "wb") as fh:
            fh.write(main_cf)
        if master_cf is not None:
            with open(os.path.join(tmp, "master.cf"), "wb") as fh:
                fh.write(master_cf)
        for argv in argv_list:
            r = runner.run([postconf, "-c", tmp, *argv], timeout=60)
            if r.returncode != 0:
                detail = short(r.stderr) or f"rc={r.returncode}"
                raise HostConfigError(f"postconf {' '.join(argv[:2])} failed: {detail}")
            out = r.stdout
        with open(path, "rb") as fh:
            main = fh.read()
        master = b""
        if master_cf is not None:
            with open(os.path.join(tmp, "master.cf"), "rb") as fh:
                master = fh.read()
        return main, master, out


def master_names(lines: Sequence[str]) -> list[str]:
    """The ``service/type`` names of master.cf entry lines (``service/type = service type ... command``)."""
    return [line.partition("=")[0].strip() for line in lines]


def set_master_cf(
    runner: Runner, main_cf: bytes, master_cf: bytes, lines: Sequence[str]
) -> tuple[bytes, dict[str, str | None]]:
    """master.cf with each entry of ``lines`` set (``postconf -M -e``), and the entries it had before
    (None: absent), for uninstall."""
    if not lines:
        return master_cf, {}
    originals: dict[str, str | None] = {}
    for name in master_names(lines):
        _, _, out = _postconf(runner, main_cf, [["-M", name]], master_cf)
        text = " ".join(out.decode("utf-8", "replace").split())
        originals[name] = text or None
    _, master, _ = _postconf(runner, main_cf, [["-M", "-e", *lines]], master_cf)
    return master, originals


def revert_master_cf(runner: Runner, main_cf: bytes, master_cf: bytes, originals: dict[str, str | None]) -> bytes:
    """Put master.cf entries back as they were (``postconf -M -e``), or remove them (``-M -X``)."""
    argv: list[list[str]] = []
    restore = [f"{k} = {v}" for k, v in sorted(originals.items()) if v is not None]
    remove = sorted(k for k, v in originals.items() if v is None)
    if restore:
        argv.append(["-M", "-e", *restore])
    if remove:
        argv.append(["-M", "-X", *remove])
    return _postconf(runner, main_cf, argv, master_cf)[1] if argv else master_cf


def set_main_cf(runner: Runner, main_cf: bytes, lines: Sequence[str]) -> bytes:
    """main.cf with each ``name = value`` of ``lines`` set (``postconf -e``)."""
    return postconf_edit(runner, main_cf, [["-e", *lines]]) if lines else main_cf


def revert_main_cf(runner: Runner, main_cf: bytes, originals: dict[str, str | None]) -> bytes:
    """Put each parameter back to its original value, or remove it (``postconf -X``) if it had none."""
    restore = [f"{k} = {v}" for k, v in sorted(originals.items()) if v is not None]
    remove = sorted(k for k, v in originals.items() if v is None)
    argv: list[list[str]] = []
    if restore:
        argv.append(["-e", *restore])
    if remove:
        argv.append(["-X", *remove])
    return postconf_edit(runner, main_cf, argv) if argv else main_cf


def _lines(text: bytes) -> list[bytes]:
    return text.splitlines(keepends=True)


def disable_auth_system(text: bytes) -> bytes:
    """Comment out ``!include auth-system.conf.ext`` (10-auth.conf) with a marker; idempotent."""
    out = []
    for line in _lines(text):
        body = line.rstrip(b"\r\n")
        if _AUTH_SYSTEM.match(body.decode("utf-8", "replace")):
            line = b"#" + body + b"  " + MARKER.encode() + line[len(body) :]
        out.append(line)
    return b"".join(out)


def restore_auth_system(text: bytes) -> bytes:
    """Undo ``disable_auth_system`` exactly (the original line is kept inside the edited one)."""
    suffix = b"  " + MARKER.encode()
    out = []
    for line in _lines(text):
        body = line.rstrip(b"\r\n")
        if body.startswith(b"#") and body.endswith(suffix):
            line = body[1 : -len(suffix)] + line[len(body) :]
        out.append(line)
    return b"".join(out)


def auth_system_enabled(text: bytes) -> bool:
    """Whether 10-auth.conf still includes the system users (PAM, /etc/passwd) as a passdb."""
    return any(_AUTH_SYSTEM.match(line.decode("utf-8", "replace").rstrip("\r\n")) for line in _lines(text))


def include_snippet(dovecot_conf: bytes, snippet_rel: str) -> bytes:
    """dovecot.conf that includes ``snippet_rel``: unchanged when it includes conf.d/*.conf already."""
    if any(_CONF_D_GLOB.match(line.decode("utf-8", "replace").rstrip("\r\n")) for line in _lines(dovecot_conf)):
        return dovecot_conf
    line = f"!include {snippet_rel}  {INCLUDE_MARKER}\n".encode()
    if line in _lines(dovecot_conf):
        return dovecot_conf
    sep = b"" if not dovecot_conf or dovecot_conf.endswith(b"\n") else b"\n"
    return dovecot_conf + sep + line


def remove_include(dovecot_conf: bytes) -> bytes:
    """Undo ``include_snippet``: drop the line it added."""
    marker = INCLUDE_MARKER.encode()
    return b"".join(line for line in _lines(dovecot_conf) if not line.rstrip(b"\r\n").endswith(marker))
