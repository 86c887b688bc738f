"""Log output for `mailstate serve` (and `mailstate mcp`): text lines, or one JSON object per
line with `--log-format json` / $MAILSTATE_LOG_FORMAT=json, for log shippers.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger` and `message`; uvicorn's access
lines add `client`, `method`, `path` and `status`; an exception adds `exception` (its
traceback as text). Messages never carry a password, sync key or token (state.errors), and
access lines never show headers, so a bearer token never reaches a log.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # uvicorn.access passes (client, method, path, http_version, status) as its arguments.
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _version, status = record.args
            out.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_format(value: str | None = None) -> str:
    """The format asked for (an option, else $MAILSTATE_LOG_FORMAT, else text); ValueError if unknown."""
    chosen = (value or os.environ.get("MAILSTATE_LOG_FORMAT") or "text").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {chosen[:20]!r}")
    return chosen


def logging_config(fmt: str, level: str = "info") -> dict[str, Any]:
    """A logging.config dict for uvicorn.run(log_config=...): everything to stderr in `fmt`."""
    formatter: dict[str, Any] = {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": lvl},
        "loggers": {
            name: {"handlers": [], "level": lvl, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "mailstate")
        },
    }


def configure(fmt: str, level: str = "info") -> None:
    """Apply `logging_config` to this process (for commands that run no uvicorn)."""
    import logging.config

    logging.config.dictConfig(logging_config(fmt, level))
