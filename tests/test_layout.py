"""The test suite's own rules (tests/README.md): no test module imports another test module, a
conftest or a fixture; and a test that starts a process without the e2e marker fails."""

from __future__ import annotations

import ast
import importlib
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers.spawnwatch import SpawnWatch

TESTS = Path(__file__).resolve().parent


def all_test_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "golden" not in p.parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in `path` (or in `source`, as if it were
    that file), inside functions too."""
    package = ".".join(path.relative_to(TESTS.parent).with_suffix("").parts[:-1])
    found: list[tuple[int, str, list[str]]] = []
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names = [alias.name for alias in node.names]
            found.append((node.lineno, module, names))
            # `from tests.state import test_ops` imports a test module as a name
            found += [(node.lineno, f"{module}.{name}", []) for name in names if name.startswith("test_")]
    return found


def is_test_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and (parts[-1].startswith("test_") or parts[-1] == "conftest")


def test_no_test_module_imports_another_test_module_or_a_conftest() -> None:
    offences = [
        f"{path.relative_to(TESTS.parent)}:{line}: imports {module}"
        for path in all_test_modules()
        for line, module, _names in imported_modules(path)
        if is_test_module(module)
    ]
    assert not offences, "move what they share to tests/helpers/ or a conftest.py:\n" + "\n".join(offences)


def test_no_test_module_imports_a_fixture() -> None:
    """Fixtures reach a test through conftest.py (pytest_plugins for a helper's own), never by
    import: an imported fixture shadows the registered one and needs a noqa to look used."""
    offences = []
    for path in all_test_modules():
        for line, module, names in imported_modules(path):
            if not module.startswith("tests."):
                continue
            mod = importlib.import_module(module)
            offences += [
                f"{path.relative_to(TESTS.parent)}:{line}: imports the fixture {name} from {module}"
                for name in names
                if is_fixture(getattr(mod, name, None))
            ]
    assert not offences, "\n".join(offences)


def is_fixture(obj: object) -> bool:
    return type(obj).__name__ == "FixtureFunctionDefinition" or hasattr(obj, "_pytestfixturefunction")


def test_the_rule_sees_every_form_of_importing_a_test_module() -> None:
    source = (
        "from tests.state.test_ops import linked\n"
        "from . import test_store\n"
        "from ..api.test_mcp import Env\n"
        "import tests.conftest\n"
        "def later():\n    from tests.e2e import test_githost\n"
        "from tests.helpers.store import show\n"
    )
    found = [m for _line, m, _n in imported_modules(TESTS / "state" / "test_never_written.py", source)]
    assert [m for m in found if is_test_module(m)] == [
        "tests.state.test_ops",
        "tests.state.test_store",
        "tests.api.test_mcp",
        "tests.conftest",
        "tests.e2e.test_githost",
    ]


def test_the_spawn_watch_fails_an_armed_test_and_names_the_program() -> None:
    watch = SpawnWatch()
    watch("subprocess.Popen", ("git", ["git", "-C", "/repo", "status"], None, None))
    watch.check("the test")  # not armed: an e2e test may start anything
    watch.armed = "tests/state/test_x.py::test_y"
    watch("open", ("/etc/hosts", "r", 0))
    watch.check("the test")  # no process: fine
    watch("subprocess.Popen", ("git", ["git", "-C", "/repo", "status"], None, None))
    with pytest.raises(pytest.fail.Exception, match=r"(?s)test_y started 1 process.*git -C /repo status"):
        watch.check("the test")


def test_the_spawn_watch_ignores_threads_that_ran_before_the_test() -> None:
    """An earlier test's background thread (a store's sync, a server's publisher) is not held
    against the next test; a thread the test starts itself is."""
    watch = SpawnWatch()

    def spawn_in_a_thread(started: threading.Event) -> threading.Thread:
        def run() -> None:
            started.wait()
            watch("subprocess.Popen", ("git", ["git", "fetch"], None, None))

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    go = threading.Event()
    older = spawn_in_a_thread(go)
    watch.begin("tests/state/test_x.py::test_y")
    go.set()
    older.join()
    watch.check("the test")  # nothing held against test_y
    newer = spawn_in_a_thread(go)
    newer.join()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)test_y started 1 .*git fetch"):
        watch.check("the test")


@pytest.mark.e2e
def test_a_process_or_server_started_for_an_unmarked_test_fails_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    e2e: end to end\n")
    pytester.makepyfile(
        test_spawns="""
        import socket
        import subprocess

        import pytest

        @pytest.fixture(scope="module")
        def server():
            subprocess.run(["true"], check=True)
            return "up"

        def test_unmarked():
            subprocess.run(["true"], check=True)

        def test_unmarked_binds():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))

        @pytest.mark.e2e
        def test_marked(server):
            subprocess.run(["true"], check=True)

        def test_unmarked_uses_a_fixture_that_started_one(server):
            assert server == "up"

        def test_no_process():
            assert True
        """
    )
    result = pytester.runpytest_inprocess("-p", "tests.helpers.spawnwatch")
    result.assert_outcomes(passed=2, failed=2, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_unmarked started 1 process(es) or server(s) in the test but is not marked e2e*",
            "*subprocess.Popen: true*",
            "*::test_unmarked_binds started 1 process(es) or server(s) in the test*",
            "*socket.bind: ('127.0.0.1', 0)*",
            "*::test_unmarked_uses_a_fixture_that_started_one uses fixtures that started processes or servers*",
        ]
    )
    assert subprocess.run(["true"]).returncode == 0  # and this e2e test itself may start one
