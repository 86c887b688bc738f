"""Logging: one line per event on stderr, prefixed ``pi-pull:``, known secrets masked.

The redaction is a filter on the logger itself (not on a handler), so every record logged
through it is masked whatever handlers are attached later.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, TYPE_CHECKING

LOGGER_NAME = "pi-pull"


class RedactFilter(logging.Filter):
    """Replaces every registered secret by ``***`` and folds the message onto one line."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def add(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for s in self.secrets:
            msg = msg.replace(s, "***")
        record.msg = " ".join(msg.split("\n"))
        record.args = None
        return True


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno == logging.INFO:
            return "pi-pull: " + msg
        return f"pi-pull: {record.levelname.lower()}: {msg}"


if TYPE_CHECKING:  # StreamHandler is generic for type checkers, but not subscriptable before 3.11
    _StreamHandler = logging.StreamHandler[IO[str]]
else:
    _StreamHandler = logging.StreamHandler


class _Handler(_StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """A closed or broken stderr must not stop a tick (the journal may be gone)."""


def make_logger(stream: IO[str] | None = None, verbose: bool = False) -> logging.Logger:
    """(Re)configure the ``pi-pull`` logger: one handler on ``stream`` (stderr), a fresh redactor."""
    logger = logging.getLogger(LOGGER_NAME)
    for f in list(logger.filters):
        logger.removeFilter(f)
    logger.addFilter(RedactFilter())
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Formatter())
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logger


def add_secret(logger: logging.Logger, secret: str) -> None:
    """Mask ``secret`` in every later line of ``logger`` (adds a redactor if it has none)."""
    redactor = next((f for f in logger.filters if isinstance(f, RedactFilter)), None)
    if redactor is None:
        redactor = RedactFilter()
        logger.addFilter(redactor)
    redactor.add(secret)
