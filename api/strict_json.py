"""JSON from clients, read strictly: one value per key.

Python's json (and pydantic's parser, which the MCP SDK uses) keeps the LAST value of a key
given twice in one object, so `{"email": "a@x", "email": "b@x"}` would act on b@x while a log,
a proxy or a person reading the body sees a@x first. Every edge that reads a client's JSON
(the HTTP API and node report bodies, `/mcp` and stdio MCP messages, `mailstate call --json`)
reads it here and refuses a repeated key with `duplicate_key`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mailstate.state.errors import InvalidInput

MAX_KEY_IN_MESSAGE = 64


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def loads(text: str | bytes) -> Any:
    """`json.loads`, refusing a repeated key (DuplicateKey) and NaN/Infinity (ValueError)."""
    return json.loads(text, object_pairs_hook=_unique, parse_constant=_reject_constant)


def duplicate_key_error(key: str) -> InvalidInput:
    """The one error for a repeated key, on every surface."""
    shown = (
        key
        if len(key) <= MAX_KEY_IN_MESSAGE and key.isprintable()
        else key[:MAX_KEY_IN_MESSAGE].encode("ascii", "backslashreplace").decode("ascii")
    )
    return InvalidInput(
        f"The key '{shown}' is given more than once in one JSON object; send each key once.",
        code="duplicate_key",
        field=shown,
    )


class _Recorded(dict[str, Any]):
    """An object that held a repeated key (the first one found)."""

    duplicate: str | None = None


def _record(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = _Recorded()
    for key, value in pairs:
        if key in out and out.duplicate is None:
            out.duplicate = key
        out[key] = value
    return out


@dataclass(frozen=True)
class Duplicate:
    """A repeated key: the key, the path of the object holding it, and the whole parsed value."""

    key: str
    path: tuple[str | int, ...]
    root: Any


def _walk(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str, tuple[str | int, ...]]]:
    if isinstance(value, dict):
        if isinstance(value, _Recorded) and value.duplicate is not None:
            yield value.duplicate, path
        for key, item in value.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, (*path, i))


def find_duplicate(text: str | bytes) -> Duplicate | None:
    """The first repeated key in `text`, or None: none, or `text` is not JSON at all (the
    caller's own parser then answers as it always does)."""
    try:
        value = json.loads(text, object_pairs_hook=_record, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    for key, path in _walk(value, ()):
        return Duplicate(key, path, value)
    return None
