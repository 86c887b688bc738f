"""A client generated from a live server's /openapi.json by `openapi-python-client` (offline),
imported from a temp dir, and one call through it checked against the documented model."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from tests.helpers.server import LiveServer

PACKAGE = "mailstate_generated_client"


def _generator() -> list[str]:
    exe = shutil.which("openapi-python-client")
    return [exe] if exe else [sys.executable, "-m", "openapi_python_client"]


@contextmanager
def generated_client(srv: LiveServer, root: Path) -> Iterator[ModuleType]:
    """The client package generated into `root` from `srv`'s OpenAPI, importable while in use."""
    spec = root / "openapi.json"
    spec.write_bytes(httpx.get(f"{srv.url}/openapi.json").content)
    proc = subprocess.run(
        [*_generator(), "generate", "--path", str(spec), "--output-path", str(root / PACKAGE), "--meta", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def client_module(name: str) -> Any:
    """A module of the generated package (``models``, ``types``, ``api.<tag>.<op>``)."""
    return importlib.import_module(f"{PACKAGE}.{name}")


def call_endpoint(client: Any, api: str, op: str, status: int, model: str, **kwargs: Any) -> Any:
    """Call one generated endpoint; its answer must be `status` and parse into `model` exactly."""
    module = client_module(f"api.{api}.{op.replace('-', '_')}")
    resp = module.sync_detailed(client=client, **kwargs)
    assert resp.status_code == status, (op, resp.status_code, resp.content)
    parsed = resp.parsed
    assert type(parsed).__name__ == model, (op, type(parsed), resp.content)
    # Every field the server sent is one the schema names (nothing undocumented).
    assert getattr(parsed, "additional_properties", {}) == {}, (op, parsed.additional_properties)
    return parsed
