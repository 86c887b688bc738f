"""The node's report of its inbound filter (pi-pull/pipull/spam.py): what a tick says about rspamd.

The real `rspamc` asks a controller that is not there (a closed loopback port) and the report
says the filter is down; the running-rspamd side (the counters of real scans, list-nodes and
/metrics) is tests/e2e/test_inbound_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.mailnode import free_ports
from tests.helpers.rspamd import require_rspamd

# `rspamc -j stat` of rspamd 3.4 (Debian 12) after three scans: one rejected, one junked.
STAT = {
    "version": "3.4",
    "scanned": 3,
    "learned": 0,
    "actions": {"reject": 1, "soft reject": 0, "rewrite subject": 0, "add header": 1, "greylist": 0, "no action": 1},
    "spam_count": 2,
    "ham_count": 1,
}


def write_ini(tmp: Path, spam: str) -> Path:
    ini = tmp / "pi-pull.ini"
    ini.write_text(
        f"[remote]\nurl = {tmp / 'none.git'}\n[node]\nallowed_signers = /dev/null\n[paths]\nroot = {tmp}\nmail_root = {tmp / 'vmail'}\nmail_uid = 5000\nmail_gid = 5000\n{spam}"
    )
    return ini


def test_the_counters_come_from_rspamc_stat(pipull: ModuleType) -> None:
    from pipull.spam import parse_stat

    assert parse_stat(json.dumps(STAT).encode()) == {"running": True, "scanned": 3, "rejected": 1, "junked": 1}
    # a counter rspamd leaves out, or one that is not a count, is 0; output that is not rspamd's is an error
    assert parse_stat(b'{"actions": {"reject": -4, "add header": true}}') == {
        "running": True, "scanned": 0, "rejected": 0, "junked": 0,
    }  # fmt: skip
    for text in (b"", b"Results for command: stat", b"[]", b'{"scanned": 3}'):
        entry = parse_stat(text)
        assert entry["running"] is False and "rspamc stat did not answer" in entry["error"], text


@pytest.mark.e2e
def test_a_controller_that_does_not_answer_is_reported_down(pipull: ModuleType, tmp_path: Path) -> None:
    require_rspamd()
    from pipull.config import load_config
    from pipull.runner import Runner
    from pipull.spam import filter_state

    (port,) = free_ports(1)  # nothing listens there
    cfg = load_config(str(write_ini(tmp_path, f"[spam]\nenabled = yes\ncontroller = 127.0.0.1:{port}\n")))
    entry = filter_state(cfg, Runner())
    assert entry is not None and entry["running"] is False, entry
    assert entry["error"].startswith(f"rspamd does not answer on 127.0.0.1:{port}: "), entry
    # a node that does not filter reports nothing about it
    assert filter_state(load_config(str(write_ini(tmp_path, ""))), Runner()) is None
    assert shutil.which("rspamc")


@pytest.mark.parametrize(
    "spam",
    ["controller = 11334\n", "controller = 127.0.0.1:0\n", "controller = host name:11334\n", "rspamc = 'unclosed\n"],
)
def test_a_bad_spam_section_is_refused_when_the_config_loads(pipull: ModuleType, tmp_path: Path, spam: str) -> None:
    from pipull.config import load_config
    from pipull.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[spam\]"):
        load_config(str(write_ini(tmp_path, "[spam]\nenabled = yes\n" + spam)))
