"""Postscreen on port 25 (mailstate's docs/inbound.md): the bundle's DNSBL lines, and the clients
postscreen refused, for the report.

The bundle's main.cf names the DNS blocklists (``postscreen_dnsbl_sites``) and the score from which
a client is refused (``postscreen_dnsbl_threshold``). ``pi_pull.py install`` checks both lines with
the server's rules (mailstate's compiler/postscreen.py; tests/vectors/dnsbl_sites.json holds the
two to the same verdicts) before it sets anything: a hand-edited bundle cannot put a value
postscreen would misread, or a list of hundreds, into main.cf.

Postfix keeps no counters: postscreen logs ``DNSBL rank N for [ADDR]:PORT`` for each client it
refuses for the lists (521 at connect) and ``PREGREET N after ...`` for each that talked before
its turn (550 to every RCPT). Each tick reads what the log gained since the last one and adds it
to counters kept under ``<root>/postscreen``. ``[postscreen] log``: a file (its place kept by
inode and offset; a rotated log is read from its start), ``journal`` (``journalctl
--cursor-file``, postscreen's identifier only), or ``auto`` (the bundle's: /var/log/mail.log when
rsyslog writes it, else the journal, Debian 12's default). The report's ``postscreen`` entry: ``{"dnsbl_rejected", "pregreet_rejected", "error"}``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from typing import Any

from .config import Config
from .fsutil import atomic_write
from .runner import Runner, short

SITES_KEY = "postscreen_dnsbl_sites"
THRESHOLD_KEY = "postscreen_dnsbl_threshold"
MAX_SITES = 20
MAX_WEIGHT = 100
MAX_THRESHOLD = 1000
# [postscreen] log: a file, "journal" (journalctl), or "auto" (the mail log if there is one, else the journal).
AUTO = "auto"
JOURNAL = "journal"
MAIL_LOG = "/var/log/mail.log"
IDENTIFIER = "postfix/postscreen"  # the journal's SYSLOG_IDENTIFIER of postscreen's lines
JOURNAL_TIMEOUT = 60.0
# The most of the log one tick reads (the rest waits for the next): a first tick on a big log.
READ_BUDGET = 64 * 1024 * 1024

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_NUMBER = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_ITEM = rf"{_NUMBER}(?:\.\.{_NUMBER})?"
_OCTET = rf"(?:{_NUMBER}|\[{_ITEM}(?:;{_ITEM})*\])"
_SITE = re.compile(rf"(?P<domain>[^=*]+)(?:=(?P<filter>{_OCTET}(?:\.{_OCTET}){{3}}))?(?:\*(?P<weight>-?[0-9]{{1,3}}))?")
_THRESHOLD = re.compile(r"[1-9][0-9]{0,3}")
_DNSBL = re.compile(rb"/postscreen\[[0-9]+\]: DNSBL rank [0-9]+ for \[")
_PREGREET = re.compile(rb"/postscreen\[[0-9]+\]: PREGREET [0-9]+ after ")


def site_ok(site: str) -> bool:
    """One entry as the compiler writes it: ``domain[=filter][*weight]``, lower case."""
    found = _SITE.fullmatch(site)
    if found is None:
        return False
    domain, weight = found.group("domain"), found.group("weight")
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain) or domain.rsplit(".", 1)[1].isdigit():
        return False
    return weight is None or 0 < abs(int(weight)) <= MAX_WEIGHT


def check_sites(value: str) -> str | None:
    """Why a ``postscreen_dnsbl_sites`` value is refused, or None (empty: no DNSBL)."""
    sites = [s for s in re.split(r"[,\s]+", value.strip()) if s]
    if len(sites) > MAX_SITES:
        return f"{SITES_KEY} lists {len(sites)} sites; at most {MAX_SITES}"
    for site in sites:
        if not site_ok(site):
            return f"{SITES_KEY}: {site[:80]!r} is not domain[=filter][*weight] (lower case)"
    if len(set(sites)) != len(sites):
        return f"{SITES_KEY} lists a site twice"
    return None


def check_threshold(value: str) -> str | None:
    """Why a ``postscreen_dnsbl_threshold`` value is refused, or None."""
    if _THRESHOLD.fullmatch(value.strip()) and int(value) <= MAX_THRESHOLD:
        return None
    return f"{THRESHOLD_KEY} must be a whole number from 1 to {MAX_THRESHOLD}, not {value.strip()[:20]!r}"


def check_main_cf_lines(lines: Sequence[str]) -> str | None:
    """Why the bundle's main.cf lines are refused (their DNSBL settings), or None."""
    for line in lines:
        key, _, value = line.partition("=")
        key = key.strip()
        if key == SITES_KEY:
            why = check_sites(value)
        elif key == THRESHOLD_KEY:
            why = check_threshold(value)
        else:
            continue
        if why is not None:
            return why
    return None


# --------------------------------------------------------------------------- the counters


def _load(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def count_lines(data: bytes) -> tuple[int, int]:
    """(DNSBL refusals, pregreet refusals) in whole log lines."""
    dnsbl = pregreet = 0
    for line in data.splitlines():
        if _DNSBL.search(line):
            dnsbl += 1
        elif _PREGREET.search(line):
            pregreet += 1
    return dnsbl, pregreet


def _read_new(log: str, seen: dict[str, int]) -> tuple[bytes, dict[str, int]]:
    """The whole lines ``log`` gained since ``seen`` (its device, inode and offset), and where they end."""
    with open(log, "rb") as fh:
        st = os.fstat(fh.fileno())
        start = seen.get("offset", 0)
        if (st.st_dev, st.st_ino) != (seen.get("dev"), seen.get("ino")) or st.st_size < start:
            start = 0  # a new (rotated) log, or a first look
        fh.seek(start)
        data = fh.read(READ_BUDGET)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next tick
    return data[:end], {"dev": st.st_dev, "ino": st.st_ino, "offset": start + end}


def _read_journal(cfg: Config, runner: Runner, state_dir: str) -> bytes:
    """postscreen's journal entries since the last tick (journalctl keeps its place in a cursor file)."""
    argv = [
        *shlex.split(cfg.postscreen_journalctl),
        f"--cursor-file={os.path.join(state_dir, 'journal.cursor')}",
        f"--identifier={IDENTIFIER}",
        "--output=short",
        "--no-pager",
        "--quiet",
    ]
    r = runner.run(argv, timeout=JOURNAL_TIMEOUT)
    if r.returncode != 0:
        raise OSError(f"journalctl failed: {short(r.stderr + r.stdout) or f'rc={r.returncode}'}")
    return r.stdout


def log_source(cfg: Config) -> str:
    """Where this tick reads: ``[postscreen] log`` as set, with ``auto`` the mail log when there is one,
    else the journal."""
    if cfg.postscreen_log != AUTO:
        return cfg.postscreen_log
    return MAIL_LOG if os.path.exists(MAIL_LOG) else JOURNAL


def refusals(cfg: Config, runner: Runner) -> dict[str, Any] | None:
    """This tick's ``postscreen`` report entry (None when [postscreen] log is empty: not counted)."""
    source = log_source(cfg) if cfg.postscreen_log else ""
    if not source:
        return None
    state_dir = os.path.join(cfg.root, "postscreen")
    counts_file = os.path.join(state_dir, "counts.json")
    seen = _load(counts_file)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    where: dict[str, int] = {}
    try:
        if source == JOURNAL:
            data = _read_journal(cfg, runner, state_dir)
        else:
            data, where = _read_new(source, seen)
    except OSError as e:
        why = str(e) if source == JOURNAL else f"cannot read {source}: {e.strerror or e}"
        return {"dnsbl_rejected": seen.get("dnsbl"), "pregreet_rejected": seen.get("pregreet"), "error": why}
    dnsbl, pregreet = count_lines(data)
    counts = {**where, "dnsbl": seen.get("dnsbl", 0) + dnsbl, "pregreet": seen.get("pregreet", 0) + pregreet}
    if counts != seen:
        atomic_write(counts_file, json.dumps(counts, sort_keys=True).encode(), 0o600)
    return {"dnsbl_rejected": counts["dnsbl"], "pregreet_rejected": counts["pregreet"], "error": None}
