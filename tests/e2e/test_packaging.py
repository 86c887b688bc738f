"""The product as people install it: a built wheel in a fresh venv, used from outside the checkout.

Builds the wheel from a copy of the checkout (`pip wheel --no-deps`, so the shared tree gets no
build/ folder), installs it with its dependencies into a fresh venv of its own (no
`--system-site-packages`: CI's system Python has none of them, and a user's venv starts empty),
and from a temp cwd runs `mailstate --help`, `serve`, `init`, `call add-node` and `node bundle`,
then the bundled pi_pull.py under `python3 -I -S`. Every command must import mailstate from the
venv, not from the checkout. pip resolves the dependencies as configured on the machine (the
package registry); its download cache is the one the test run's own install filled, so they are
not fetched again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import clean_env, free_port

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
_SKIP_COPY = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "data", "out"
)


@dataclass
class Installed:
    wheel: Path
    venv: Path
    cwd: Path  # outside the checkout
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one command of the venv's bin/ (e.g. ``mailstate``) from the temp cwd."""
        exe = self.venv / "bin" / args[0]
        return subprocess.run(
            [str(exe), *args[1:]], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(REPO_ROOT, src, symlinks=True, ignore=_SKIP_COPY)
    env = clean_env(base / "home")
    (base / "home").mkdir()
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    r = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(base / "wheels"), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (base / "wheels").glob("mailstate-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    # HOME is a temp dir here: keep pip's cache where the test run's own install left it.
    env.setdefault("PIP_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"))
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet", "install", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cwd = base / "cwd"
    cwd.mkdir()
    yield Installed(wheel, venv, cwd, env)


def test_wheel_installs_under_one_namespace(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"mailstate", "mailstate-0.2.0.dist-info"}, tops
    for generic in ("state", "api", "compiler", "templates", "pipull"):
        assert generic not in tops
    assert "mailstate/node_agent/pipull/cli.py" in names and "mailstate/node_agent/pi-pull.example.ini" in names
    assert "mailstate/templates/node/pi-pull.service" in names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(installed.wheel).read(top_level).decode().split() == ["mailstate"]


def test_installed_package_is_the_one_imported(installed: Installed) -> None:
    r = installed.run(
        "python",
        "-c",
        "import mailstate.compiler.node_bundle as b, ruamel.yaml, pydantic; "
        "print(b.__file__); print(b.AGENT_DIR); print(ruamel.yaml.__file__); print(pydantic.__file__)",
    )
    assert r.returncode == 0, r.stderr
    module, agent, *deps = r.stdout.split()
    assert module.startswith(str(installed.venv)) and agent.startswith(str(installed.venv)), r.stdout
    # The dependencies too: the venv is self-contained, nothing comes from the base interpreter.
    assert all(dep.startswith(str(installed.venv)) for dep in deps), r.stdout
    assert "include-system-site-packages = false" in (installed.venv / "pyvenv.cfg").read_text()


def test_help_serve_init_call_and_bundle_from_outside_the_checkout(installed: Installed) -> None:
    r = installed.run("mailstate", "--help")
    assert r.returncode == 0 and "node" in r.stdout, r.stderr

    _serve_briefly(installed)

    data = installed.cwd / "data"
    r = installed.run("mailstate", "init", "--data", str(data), "--bcrypt-cost", "4")
    assert r.returncode == 0, r.stderr
    r = installed.run("mailstate", "call", "--data", str(data), "add-node", "name=pi-01", "ip_address=192.0.2.1")
    assert r.returncode == 0, r.stderr
    assert "sync_key" in r.stdout

    out = installed.cwd / "bundle"
    r = installed.run(
        "mailstate",
        "node",
        "bundle",
        "--data",
        str(data),
        "--name",
        "pi-01",
        "--server-url",
        "https://mail.example.net",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    agent = out / "pi_pull.py"
    assert agent.read_bytes().startswith(b"#!/usr/bin/env python3\n") and os.access(agent, os.X_OK)
    assert "sync_key_file = /etc/pi-pull/sync_key" in (out / "pi-pull.ini").read_text()

    # The node's way to run it: isolated, no site-packages (so nothing but the file itself).
    r = subprocess.run(
        [sys.executable, "-I", "-S", str(agent), "--help"],
        cwd=installed.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "exit codes:" in r.stdout, r.stderr
    r = subprocess.run(
        [sys.executable, "-I", "-S", str(agent), "--config", str(installed.cwd / "nope.ini"), "--once"],
        cwd=installed.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("pi-pull: error: cannot read config") and "Traceback" not in r.stderr


def test_bad_bundle_arguments_are_clear_errors(installed: Installed) -> None:
    data = installed.cwd / "data-bad"
    assert installed.run("mailstate", "init", "--data", str(data), "--bcrypt-cost", "4").returncode == 0
    common = [
        "mailstate",
        "node",
        "bundle",
        "--data",
        str(data),
        "--name",
        "pi-02",
        "--allow-unregistered",
        "--out",
        str(installed.cwd / "b2"),
    ]
    r = installed.run(*common, "--server-url", "ftp://mail.example.net")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error [invalid_request]" in r.stderr and "http:// or https://" in r.stderr
    (installed.cwd / "a-file").write_text("")
    r = installed.run(
        "mailstate",
        "node",
        "bundle",
        "--data",
        str(data),
        "--name",
        "pi-02",
        "--allow-unregistered",
        "--server-url",
        "https://x.example",
        "--out",
        str(installed.cwd / "a-file"),
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr and "Cannot write the bundle" in r.stderr


def _serve_briefly(installed: Installed) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(installed.venv / "bin" / "mailstate"),
            "serve",
            "--data",
            str(installed.cwd / "served"),
            "--port",
            str(port),
            "--bcrypt-cost",
            "4",
        ],
        cwd=installed.cwd,
        env=installed.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        health: dict[str, object] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1.0)
                if resp.status_code == 200:
                    health = json.loads(resp.text)
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert health, f"serve did not become healthy: rc={proc.poll()}"
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert "Traceback" not in output, output
