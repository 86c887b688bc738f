"""pi_pull.py's code cache (compiler/node_bundle.py's zipapp __main__): a root run unpacks
the archive's sources once and imports them with bytecode; anything it cannot trust is not used."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="the code cache is for root runs")]

POISON = 'import sys\nprint("POISONED")\nsys.exit(0)\n'


def run(pi_pull: Path, cache: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PI_PULL_CODE_CACHE": cache}
    return subprocess.run([sys.executable, str(pi_pull), *args], capture_output=True, text=True, env=env, timeout=60)


def key(pi_pull: Path) -> str:
    return hashlib.sha256(pi_pull.read_bytes()).hexdigest()[:32]


def test_first_run_unpacks_sources_and_bytecode_root_owned(pi_pull: Path, tmp_path: Path) -> None:
    cache = tmp_path / "code"
    r = run(pi_pull, str(cache), "--help")
    assert r.returncode == 0 and "exit codes" in r.stdout.lower()
    here = cache / key(pi_pull) / "pipull"
    names = {p.name for p in here.glob("*.py")}
    assert {"agent.py", "cli.py", "buckets.py", "bulkwrite.py"} <= names
    assert (here / "cli.py").read_bytes() == (Path(__file__).parents[2] / "pi-pull" / "pipull" / "cli.py").read_bytes()
    pycs = {p.name.split(".")[0] for p in (here / "__pycache__").glob("*.pyc")}
    assert names == {f"{n}.py" for n in pycs}
    for p in (cache, here.parent, here, here / "__pycache__", here / "cli.py"):
        st = p.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, p
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    r = run(pi_pull, str(cache), "--help")
    assert r.returncode == 0 and "exit codes" in r.stdout.lower()


def test_the_cache_is_used_only_when_nobody_else_can_write_it(pi_pull: Path, tmp_path: Path) -> None:
    cache = tmp_path / "code"
    assert run(pi_pull, str(cache), "--help").returncode == 0
    here = cache / key(pi_pull) / "pipull"
    (here / "cli.py").write_text(POISON)  # what only root could do, while the directories are 0755
    for pyc in (here / "__pycache__").glob("cli.*.pyc"):
        pyc.unlink()
    assert "POISONED" in run(pi_pull, str(cache), "--help").stdout  # the cache is what runs
    for writable in (cache, here.parent, here, here / "__pycache__"):
        os.chmod(writable, 0o777)
        r = run(pi_pull, str(cache), "--help")
        assert r.returncode == 0 and "POISONED" not in r.stdout and "exit codes" in r.stdout.lower(), writable
        os.chmod(writable, 0o755)


def test_off_and_relative_paths_leave_no_cache(pi_pull: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for value in ("off", "relative/code"):
        r = run(pi_pull, value, "--help")
        assert r.returncode == 0 and "exit codes" in r.stdout.lower()
    assert not (tmp_path / "relative").exists() and not (tmp_path / "off").exists()


def test_another_version_gets_its_own_directory(pi_pull: Path, tmp_path: Path) -> None:
    cache = tmp_path / "code"
    other = tmp_path / "other_pi_pull.py"
    other.write_bytes(pi_pull.read_bytes() + b"\n")  # a zipapp still (trailing bytes), another digest
    other.chmod(stat.S_IRWXU)
    assert run(pi_pull, str(cache), "--help").returncode == 0
    assert run(other, str(cache), "--help").returncode == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted([key(pi_pull), key(other)])
