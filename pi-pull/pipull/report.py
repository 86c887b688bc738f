"""Status reports to the server: ``POST [report] url``, queued in state.json when undeliverable."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import TickError

PENDING_MAX = 20


class Reporter:
    """Sends ``{name, sync_key, applied_commit, status, error, statement_issued_at[, usage]}`` with HTTP
    Basic auth (``statement_issued_at``: Issued-At of the newest verified statement kept; status
    ``stale`` when it is older than [freshness] max_staleness).

    ``credentials()`` returns (sync key, Basic token); it is only called when a report is sent,
    so a node without a report URL never reads its key file for reporting.
    """

    def __init__(self, cfg: Config, log: logging.Logger, credentials: Callable[[], tuple[str, str]]) -> None:
        self.cfg = cfg
        self.log = log
        self.credentials = credentials

    def post(self, report: dict[str, Any]) -> None:
        """Deliver one report; TickError (with a human reason) when it is not accepted."""
        sync_key, token = self.credentials()
        body = dict(report)
        body["name"] = self.cfg.node_name
        body["sync_key"] = sync_key
        req = urllib.request.Request(
            self.cfg.report_url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + token,
                "User-Agent": "pi-pull",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.report_timeout) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as e:
            reason = {401: "bad node name or sync key", 403: "address not on the node's whitelist"}.get(e.code, "")
            if e.code == 400:  # the server says what it refused (e.g. a dkim_keys entry), in its one error shape
                reason = _server_message(e)
            raise TickError(f"report rejected: HTTP {e.code} {reason or e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            why: object = e.reason if isinstance(e, urllib.error.URLError) else e
            raise TickError(f"report to {self.cfg.report_url} failed: {why}") from None

    def send(
        self,
        st: dict[str, Any],
        status: str,
        error: str | None,
        usage: list[dict[str, object]] | None = None,
        dkim_keys: list[dict[str, Any]] | None = None,
        app_uses: list[dict[str, Any]] | None = None,
        sending: list[dict[str, Any]] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> bool:
        """Send pending reports, then this tick's (unless it repeats the last pending one).
        True when the last report of the queue (the one carrying this tick's extras) was delivered.

        ``usage`` (lifecycle.py, every ``usage_interval``) rides on the last report sent this
        tick only; it is never queued in state.json (100k mailboxes weigh ~9 MB): a report that
        cannot be delivered drops it, and the next measurement comes one interval later.
        ``dkim_keys`` (dkim.py: public keys only) rides the same way, every tick, and so do the
        ``sending`` figures of the logins whose figures changed (policy.py) and ``extras``
        (fleet.py: a new TLS certificate, move-domain steps); so does ``app_uses`` (ownerfiles.py:
        app passwords that logged in), which the caller keeps queued in state.json until a report
        that carried it was delivered."""
        if not self.cfg.report_url:
            return False
        known = st.get("statement")
        issued = known.get("issued_at") if isinstance(known, dict) else None
        current = {
            "applied_commit": st.get("applied_commit"),
            "status": status,
            "error": error,
            "statement_issued_at": issued if isinstance(issued, int) else None,
        }
        pending = [r for r in st.get("pending_reports", []) if isinstance(r, dict)]
        queue = pending + ([current] if not pending or pending[-1] != current else [])
        sent = 0
        extras = dict(extras or {})
        if usage is not None:
            extras["usage"] = usage
        if dkim_keys is not None:
            extras["dkim_keys"] = dkim_keys
        if app_uses:
            extras["app_passwords_used"] = app_uses
        if sending:
            extras["sending"] = sending  # the policy service's figures (policy.py); never queued either
        for i, rep in enumerate(queue):
            try:
                self.post({**rep, **extras} if extras and i == len(queue) - 1 else rep)
            except TickError as e:
                self.log.warning(f"{e}; keeping {len(queue) - sent} report(s) to send next tick")
                break
            sent += 1
        st["pending_reports"] = queue[sent:][-PENDING_MAX:]
        if pending and sent:
            self.log.info(f"delivered {min(sent, len(pending))} pending report(s)")
        return sent == len(queue)


def _server_message(err: urllib.error.HTTPError) -> str:
    """The ``error.message`` of the server's JSON error body, shortened; "" when there is none."""
    try:
        body = json.loads(err.read(16384) or b"{}")
        message = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
    except (OSError, ValueError, AttributeError):
        return ""
    return " ".join(str(message).split())[:300]
