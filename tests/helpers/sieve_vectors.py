"""The owners' shared vector tables (tests/vectors/sieve_scripts.json, sieve_values.json,
app_password_lines.json) and how a test turns an entry into a rendered fragment."""

from __future__ import annotations

import json
from typing import Any

from mailstate.compiler.sieve import container_header
from tests.helpers.vectors import VECTORS

SCRIPTS: dict[str, Any] = json.loads((VECTORS / "sieve_scripts.json").read_text())
VALUES: list[dict[str, Any]] = json.loads((VECTORS / "sieve_values.json").read_text())["vectors"]
APP_LINES: dict[str, Any] = json.loads((VECTORS / "app_password_lines.json").read_text())
ADDR = "info@example.com"
SIEVE = "rendered/domains/ex/example.com/sieve_scripts"
APP = "rendered/domains/ex/example.com/app_passwords"
APP_HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def script_of(vec: dict[str, Any]) -> bytes:
    """A script vector's text, for the mailbox ``ADDR``."""
    return str(vec["script"]).replace("{addr}", ADDR).encode("utf-8")


def fragment(script: bytes, local: str = "info") -> bytes:
    """One mailbox's entry of a sieve_scripts fragment, as the compiler writes it."""
    return container_header(local, script) + script


def value_of(vec: dict[str, Any]) -> str:
    return str(vec["value"]) * int(vec.get("repeat", 1))


def text_of(vec: dict[str, Any]) -> bytes:
    """An app_passwords vector's text, with a real-looking hash."""
    return str(vec["text"]).replace("{hash}", APP_HASH).encode("utf-8")
