"""Fixtures of the node stage: the pi-pull test bench (tests/helpers/pipull.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.pipull import Setup, isolate_env, make_setup


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """A signed state repo and a node root for ``pi_pull.py`` ticks (see tests/helpers/pipull.py)."""
    return make_setup(tmp_path)


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No GIT_* at all (not even conftest's identity), a fresh HOME, no ssh agent."""
    isolate_env(monkeypatch, tmp_path_factory.mktemp("home"))
