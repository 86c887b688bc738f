"""Fixtures of the API stage."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.helpers.openapi import generated_client
from tests.helpers.server import LiveServer


@pytest.fixture(scope="module")
def client_pkg(srv: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """A client generated from the module's live server (its ``srv`` fixture), imported."""
    with generated_client(srv, tmp_path_factory.mktemp("generated")) as pkg:
        yield pkg
