"""Node names and allowed_signers lines: one table each, every reader held to it.

tests/vectors/node_names.json drives the server (add-node's validate_node_name), the bundle
(`render_node_bundle`) and the agent (loading a bundle's pi-pull.ini with that name);
tests/vectors/allowed_signers.json drives the server's and the node's line parsers and the
bundle's check of the allowed_signers it ships.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mailstate.compiler.node_bundle import render_node_bundle
from mailstate.state import validate
from mailstate.state.errors import InvalidInput
from mailstate.state.signers import parse_signers_line
from tests.helpers.vectors import VECTORS

NODE_NAMES: dict[str, Any] = json.loads((VECTORS / "node_names.json").read_text())
SIGNER_LINES: list[dict[str, Any]] = json.loads((VECTORS / "allowed_signers.json").read_text())["lines"]
KEY = "mailstate ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
ALL_NAMES = [(name, True) for name in NODE_NAMES["valid"]] + [(name, False) for name in NODE_NAMES["invalid"]]


def _server_accepts(name: str) -> bool:
    try:
        return validate.validate_node_name(name) == name
    except InvalidInput:
        return False


def _bundle_accepts(name: str) -> bool:
    try:
        render_node_bundle(name, "http://127.0.0.1:8025", KEY)
    except InvalidInput as exc:
        assert exc.code == "invalid_node_name"
        return False
    return True


def _agent_accepts(pipull: Any, tmp_path: Path, name: str) -> bool:
    """A real bundle's pi-pull.ini (DKIM on, as every default bundle has it) with `name` in it."""
    ini = render_node_bundle("pi01", "http://127.0.0.1:8025", KEY)["pi-pull.ini"]
    assert "\nname = pi01\n" in ini
    path = tmp_path / "pi-pull.ini"
    path.write_text(ini.replace("\nname = pi01\n", f"\nname = {name}\n"), encoding="utf-8")
    try:
        cfg = pipull.config.load_config(str(path))
    except pipull.errors.ConfigError:
        return False
    return bool(cfg.node_name == name)


@pytest.mark.parametrize(("name", "valid"), ALL_NAMES, ids=[repr(n)[:30] for n, _ in ALL_NAMES])
def test_a_node_name_gets_one_verdict_everywhere(pipull: Any, tmp_path: Path, name: str, valid: bool) -> None:
    assert _server_accepts(name) is valid
    assert _bundle_accepts(name) is valid
    if "\n" not in name and name == name.strip():  # an ini line cannot carry these at all
        assert _agent_accepts(pipull, tmp_path, name) is valid


def test_every_valid_node_name_makes_dkim_selectors_that_are_dns_labels() -> None:
    longest = max(NODE_NAMES["valid"], key=len)
    assert len(f"ms1-{longest}") <= 63
    assert any(len(n) == 59 for n in NODE_NAMES["valid"]) and any(len(n) == 60 for n in NODE_NAMES["invalid"])


def _fields(parsed: Any) -> dict[str, Any] | None:
    if parsed is None:
        return None
    return {"principals": parsed.principals, "options": parsed.options, "key_type": parsed.key_type, "key": parsed.key}


@pytest.mark.parametrize("case", SIGNER_LINES, ids=[c["line"][:40] or "empty" for c in SIGNER_LINES])
def test_an_allowed_signers_line_is_read_the_same_by_server_and_node(pipull: Any, case: dict[str, Any]) -> None:
    assert _fields(parse_signers_line(case["line"])) == case["parsed"]
    assert _fields(pipull.rules.parse_signers_line(case["line"])) == case["parsed"]


# Blank lines and comments are dropped or kept, never refused: the next test covers them.
KEY_LINES = [c for c in SIGNER_LINES if c["line"].strip() and not c["line"].lstrip().startswith("#")]


@pytest.mark.parametrize("case", KEY_LINES, ids=[c["line"][:40] for c in KEY_LINES])
def test_the_bundle_ships_only_lines_that_name_a_key(case: dict[str, Any]) -> None:
    line = case["line"]
    try:
        shipped = render_node_bundle("pi01", "http://127.0.0.1:8025", line)["allowed_signers"]
    except InvalidInput:
        assert case["parsed"] is None
        return
    assert case["parsed"] is not None
    assert shipped == line.strip() + "\n"


def test_the_bundle_drops_comments_but_needs_a_key() -> None:
    shipped = render_node_bundle("pi01", "http://127.0.0.1:8025", f"# a comment\n\n{KEY}\n")["allowed_signers"]
    assert shipped == f"# a comment\n{KEY}\n"
    with pytest.raises(InvalidInput):
        render_node_bundle("pi01", "http://127.0.0.1:8025", "# only a comment\n")
