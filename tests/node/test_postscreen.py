"""Port 25's postscreen on the node: the bundle's DNSBL lines held to the server's verdicts
(tests/vectors/dnsbl_sites.json), and the refusals counted from Postfix's log for the report."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.mailnode import require_binaries
from tests.helpers.vectors import VECTORS as VECTOR_DIR

VECTORS = json.loads((VECTOR_DIR / "dnsbl_sites.json").read_text())
# Lines as Postfix 3.7 logs them (maillog_file; syslog's are the same after the time stamp).
DNSBL = "Dec  7 22:01:02 mx postfix/postscreen[811]: DNSBL rank 3 for [203.0.113.9]:40312\n"
PREGREET = "Dec  7 22:01:03 mx postfix/postscreen[811]: PREGREET 11 after 0.1 from [203.0.113.10]:40313: EHLO x\\r\\n\n"
OTHER = "Dec  7 22:01:04 mx postfix/postscreen[811]: CONNECT from [203.0.113.11]:40314 to [192.0.2.1]:25\n"
FORGED = "Dec  7 22:01:05 mx postfix/smtpd[812]: NOQUEUE: reject: RCPT from x: DNSBL rank 3 for [\n"


@pytest.mark.parametrize("case", VECTORS["sites"]["valid"], ids=lambda c: c["written"][:40])
def test_the_node_takes_what_the_compiler_writes(pipull: ModuleType, case: dict[str, str]) -> None:
    assert pipull.postscreen.site_ok(case["written"])
    assert pipull.postscreen.check_main_cf_lines([f"postscreen_dnsbl_sites = {case['written']}"]) is None


@pytest.mark.parametrize("site", VECTORS["sites"]["hostile"], ids=lambda s: repr(s[:30]))
def test_the_node_refuses_every_hostile_site(pipull: ModuleType, site: str) -> None:
    assert not pipull.postscreen.site_ok(site)


@pytest.mark.parametrize("case", VECTORS["lists"], ids=lambda c: f"{len(c['sites'])}-{c['ok']}")
def test_the_node_judges_whole_lists_as_the_server_does(pipull: ModuleType, case: dict[str, Any]) -> None:
    why = pipull.postscreen.check_main_cf_lines(["postscreen_dnsbl_sites = " + ", ".join(case["sites"])])
    assert (why is None) == case["ok"], why


def test_the_node_judges_thresholds_as_the_server_does(pipull: ModuleType) -> None:
    check = pipull.postscreen.check_main_cf_lines
    for value in VECTORS["thresholds"]["valid"]:
        assert check([f"postscreen_dnsbl_threshold = {value}"]) is None, value
    for value in [*VECTORS["thresholds"]["hostile"], "3.5", "03", "", "3 # three", "$x"]:
        assert "from 1 to 1000" in (check([f"postscreen_dnsbl_threshold = {value}"]) or ""), value
    assert check(["smtpd_milters = inet:127.0.0.1:11332", "postscreen_dnsbl_action = drop"]) is None


def _config(pipull: ModuleType, tmp_path: Path, log: Path) -> Any:
    return pipull.config.Config(remote_url="x", root=str(tmp_path / "root"), postscreen_log=str(log))


def test_refusals_are_counted_across_ticks_rotation_and_half_lines(pipull: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text(OTHER + DNSBL + PREGREET + FORGED + DNSBL)
    cfg = _config(pipull, tmp_path, log)
    assert pipull.postscreen.refusals(cfg, pipull.runner.Runner()) == {
        "dnsbl_rejected": 2,
        "pregreet_rejected": 1,
        "error": None,
    }
    # nothing new: the same counts; a line still being written waits for the next tick
    assert pipull.postscreen.refusals(cfg, pipull.runner.Runner()) == {
        "dnsbl_rejected": 2,
        "pregreet_rejected": 1,
        "error": None,
    }
    with open(log, "a") as fh:
        fh.write(DNSBL[:30])
    assert pipull.postscreen.refusals(cfg, pipull.runner.Runner())["dnsbl_rejected"] == 2
    with open(log, "a") as fh:
        fh.write(DNSBL[30:] + PREGREET)
    assert pipull.postscreen.refusals(cfg, pipull.runner.Runner()) == {
        "dnsbl_rejected": 3,
        "pregreet_rejected": 2,
        "error": None,
    }
    # logrotate: a new file under the name, read from its start; the counts go on
    os.rename(log, tmp_path / "mail.log.1")
    log.write_text(DNSBL)
    assert pipull.postscreen.refusals(cfg, pipull.runner.Runner()) == {
        "dnsbl_rejected": 4,
        "pregreet_rejected": 2,
        "error": None,
    }
    counts = tmp_path / "root" / "postscreen" / "counts.json"
    assert json.loads(counts.read_text())["dnsbl"] == 4 and counts.stat().st_mode & 0o777 == 0o600
    # no log (rsyslog removed): the counts so far, and why they stopped
    log.unlink()
    entry = pipull.postscreen.refusals(cfg, pipull.runner.Runner())
    assert entry["dnsbl_rejected"] == 4 and entry["error"].startswith(f"cannot read {log}: No such file")


def test_no_log_configured_reports_nothing(pipull: ModuleType, tmp_path: Path) -> None:
    cfg = pipull.config.Config(remote_url="x", root=str(tmp_path))
    assert cfg.postscreen_log == "" and pipull.postscreen.refusals(cfg, pipull.runner.Runner()) is None


JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"


def _journal(path: Path, *messages: tuple[str, str]) -> None:
    """Append entries (identifier, message) to a real journal file, as journald would write them
    (systemd-journal-remote from the export format)."""
    now = int(time.time() * 1e6)
    data = b"".join(
        f"__CURSOR=s=0;i={i}\n__REALTIME_TIMESTAMP={now + i}\n__MONOTONIC_TIMESTAMP={now + i}\n"
        f"_BOOT_ID=0123456789abcdef0123456789abcdef\n_HOSTNAME=mx\nPRIORITY=6\n_PID=811\n"
        f"SYSLOG_IDENTIFIER={ident}\nMESSAGE={message}\n\n".encode()
        for i, (ident, message) in enumerate(messages)
    )
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=data, check=True, capture_output=True)


@pytest.mark.e2e
def test_refusals_are_counted_from_the_journal(pipull: ModuleType, tmp_path: Path) -> None:
    """A node without rsyslog (Debian 12's default): the real journalctl reads a real journal file,
    postscreen's lines only, each once (its cursor file under <root>/postscreen)."""
    require_binaries("journalctl", JOURNAL_REMOTE)
    journal = tmp_path / "system.journal"
    screen = "postfix/postscreen"
    _journal(journal, (screen, DNSBL.split(": ", 1)[1].strip()), ("postfix/smtpd", "DNSBL rank 3 for [x]"))
    cfg = pipull.config.Config(
        remote_url="x", root=str(tmp_path / "root"), postscreen_log="journal",
        postscreen_journalctl=f"journalctl --file={journal}",
    )  # fmt: skip
    runner = pipull.runner.Runner()
    assert pipull.postscreen.refusals(cfg, runner) == {"dnsbl_rejected": 1, "pregreet_rejected": 0, "error": None}
    assert pipull.postscreen.refusals(cfg, runner) == {"dnsbl_rejected": 1, "pregreet_rejected": 0, "error": None}
    _journal(journal, (screen, PREGREET.split(": ", 1)[1].strip()), (screen, DNSBL.split(": ", 1)[1].strip()))
    assert pipull.postscreen.refusals(cfg, runner) == {"dnsbl_rejected": 2, "pregreet_rejected": 1, "error": None}
    assert (tmp_path / "root" / "postscreen" / "journal.cursor").is_file()
    # journalctl failing: the counts so far, and its own words
    broken = pipull.config.Config(
        remote_url="x",
        root=str(tmp_path / "root"),
        postscreen_log="journal",
        postscreen_journalctl="journalctl --nonsense",
    )
    entry = pipull.postscreen.refusals(broken, runner)
    assert entry["dnsbl_rejected"] == 2 and entry["error"].startswith("journalctl failed: "), entry
    # auto: the mail log when there is one, else the journal
    auto = pipull.config.Config(remote_url="x", postscreen_log="auto")
    expected = "/var/log/mail.log" if os.path.exists("/var/log/mail.log") else "journal"
    assert pipull.postscreen.log_source(auto) == expected


def test_the_ini_reads_postscreen_settings(pipull: ModuleType, tmp_path: Path) -> None:
    base = f"[remote]\nurl = x\n[node]\nallowed_signers = /dev/null\n[paths]\nroot = {tmp_path}\nsync = no\nmail_root = /var/vmail\nmail_uid = 5000\nmail_gid = 5000\n"
    ini = tmp_path / "pi-pull.ini"
    for value, expected in (
        ("auto", "auto"),
        ("journal", "journal"),
        ("mail.log", str(tmp_path / "mail.log")),
        ("", ""),
    ):
        ini.write_text(base + f"[postscreen]\nlog = {value}\n")
        assert pipull.config.load_config(str(ini)).postscreen_log == expected
    ini.write_text(base + "[postscreen]\nlog = journal\njournalctl = 'unclosed\n")
    with pytest.raises(pipull.errors.ConfigError, match=r"\[postscreen\] journalctl"):
        pipull.config.load_config(str(ini))
