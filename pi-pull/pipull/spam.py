"""Inbound filtering on the node (mailstate's docs/inbound.md): the state of rspamd, for the report.

rspamd's proxy is the milter of Postfix's port 25 (the bundle's main.cf.mailstate), with
``milter_default_action = tempfail``: while rspamd does not answer, port 25 answers 4xx and mail
waits at the sender, never passes unfiltered and never bounces. The report says so: each tick asks
rspamd's controller (``rspamc -h CONTROLLER -j stat``) and reports ``spam_filter``:
``{"running": true, "scanned", "rejected", "junked"}`` (rspamd's counters since it started), or
``{"running": false, "error": "<why>"}``.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from .config import Config
from .runner import Runner, short

STAT_TIMEOUT = 10.0
# rspamd's action names -> the report's counters.
COUNTERS = (("rejected", "reject"), ("junked", "add header"))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_stat(text: bytes) -> dict[str, Any]:
    """The report entry from ``rspamc -j stat``'s output (an error entry when it is not rspamd's JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return {"running": False, "error": "rspamc stat did not answer JSON"}
    if not isinstance(data, dict) or not isinstance(data.get("actions"), dict):
        return {"running": False, "error": "rspamc stat did not answer rspamd's statistics"}
    actions = data["actions"]
    entry: dict[str, Any] = {"running": True, "scanned": _count(data.get("scanned"))}
    for key, action in COUNTERS:
        entry[key] = _count(actions.get(action))
    return entry


def filter_state(cfg: Config, runner: Runner) -> dict[str, Any] | None:
    """This tick's ``spam_filter`` report entry; None when the node does not filter ([spam] off)."""
    if not cfg.spam:
        return None
    argv = [*shlex.split(cfg.spam_rspamc), "-h", cfg.spam_controller, "-t", str(int(STAT_TIMEOUT)), "-j", "stat"]
    r = runner.run(argv, timeout=STAT_TIMEOUT + 5)
    if r.returncode != 0:
        why = short(r.stderr + r.stdout) or f"rc={r.returncode}"
        return {"running": False, "error": f"rspamd does not answer on {cfg.spam_controller}: {why}"}
    return parse_stat(r.stdout)
