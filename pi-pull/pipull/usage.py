"""Mailbox usage: bytes and messages per Maildir, measured cheaply from the file names.

Dovecot (and Postfix's virtual agent) name a delivered message ``<unique>,S=<size>[,W=<n>]:2,<flags>``:
the ``S=`` field is the message's size in bytes, so counting a mailbox needs one directory
listing per ``cur``/``new`` folder and no ``stat`` at all. A name without ``S=`` is measured
with ``lstat`` instead.

What is counted: every file in ``cur/`` and ``new/`` of the Maildir root and of each subfolder
(``.Sent``, ``.Trash``, ``.a.b`` ...), with the Maildir root at ``<home>/Maildir`` (Dovecot's
``mail_location = maildir:~/Maildir``, as the bundle ships) or at ``<home>`` itself (Postfix's
virtual delivery). ``tmp/`` (deliveries in progress) and Dovecot's own files (indexes,
uidlist) are not mail. Symlinks are never followed: a home or a folder that is a symlink
counts as empty, so nothing outside the mail root is ever read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator

_SIZE_RE = re.compile(r",S=([0-9]{1,15})(?:[,:]|$)")
MESSAGE_DIRS = ("cur", "new")

Usage = tuple[int, int]  # (bytes, messages)


def _count_dir(path: str) -> Usage:
    """(bytes, files) of one cur/ or new/ directory (not followed if it is a symlink)."""
    used = count = 0
    try:
        it = os.scandir(path)
    except OSError:
        return 0, 0
    with it:
        for entry in it:
            name = entry.name
            if name.startswith("."):
                continue
            m = _SIZE_RE.search(name)
            if m is not None:
                used += int(m.group(1))
                count += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                used += st.st_size
                count += 1
    return used, count


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _folder(path: str, subfolders: list[str] | None) -> Usage:
    """(bytes, messages) of one Maildir folder: one listing finds its cur/ and new/ (real
    directories only) and, for the root (``subfolders`` is a list), its ``.<name>`` subfolders."""
    used = count = 0
    try:
        it = os.scandir(path)
    except OSError:
        return 0, 0
    with it:
        for entry in it:
            name = entry.name
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if name in MESSAGE_DIRS:
                b, n = _count_dir(entry.path)
                used += b
                count += n
            elif subfolders is not None and name.startswith(".") and name not in (".", ".."):
                subfolders.append(entry.path)  # Maildir++: ".Sent", ".a.b"
    return used, count


def measure_maildir(home: str) -> Usage:
    """(bytes, messages) of the Maildir of one home; (0, 0) when it does not exist (yet)."""
    if not _is_real_dir(home):
        return 0, 0
    root = os.path.join(home, "Maildir")
    if not _is_real_dir(root):
        root = home
    subfolders: list[str] = []
    used, count = _folder(root, subfolders)
    for folder in subfolders:
        b, n = _folder(folder, None)
        used += b
        count += n
    return used, count


def measure(mail_root: str, mailboxes: Iterable[tuple[str, str, str]]) -> Iterator[dict[str, object]]:
    """The report's usage entries for ``(domain, local, id)`` triples (format 2 homes
    ``<mail_root>/<domain>/<local>~<id>``); a mailbox without a Maildir yet reports zeros.

    The triples come from the validated ``mailboxes`` fragments of the live release, so no
    path built here can leave the mail root."""
    for domain, local, box_id in mailboxes:
        used, count = measure_maildir(os.path.join(mail_root, domain, f"{local}~{box_id}"))
        yield {"email": f"{local}@{domain}", "id": box_id, "used_bytes": used, "messages": count}
