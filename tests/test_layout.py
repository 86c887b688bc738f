"""The repository's own rules. The test suite's (tests/README.md): no test module imports another
test module, a conftest or a fixture; a test that starts a process without the e2e marker fails.
The product's (docs/development.md, "Layers" and "Small units"): every module is in one layer of
the import-linter contract, no import inside a function closes a cycle or climbs a layer, and
no function runs over 80 lines."""

from __future__ import annotations

import ast
import importlib
import subprocess
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.helpers.spawnwatch import SpawnWatch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


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


# --- the product's layers --------------------------------------------------------------------

# The product packages: module name prefix -> source folder. pi-pull is its own package (stdlib
# only, run on the node); it has no layers, but its lazy imports may not close cycles either.
PACKAGES = {
    "mailstate.state": "state",
    "mailstate.compiler": "compiler",
    "mailstate.api": "api",
    "pipull": "pi-pull/pipull",
}

# (importer, imported) -> why an import inside a function may close a cycle or climb a layer.
# Empty: the deliberate lazy imports (pipull/agent.py's, for a tick's start-up cost; api/cli.py's,
# so `mailstate --help` does not load the server) go down the layers and close no cycle.
LAZY_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def layer_ranks() -> dict[str, int]:
    """{module or package: its layer, 0 at the bottom} from pyproject.toml's layers contract."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers: list[str] = contract["layers"]
    return {name.strip(): len(layers) - 1 - i for i, layer in enumerate(layers) for name in layer.split(":")}


def rank_of(module: str, ranks: Mapping[str, int]) -> int | None:
    while module:
        if module in ranks:
            return ranks[module]
        module = module.rpartition(".")[0]
    return None


def product_sources() -> dict[str, str]:
    """{module name: source} of every product module."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[prefix if path.stem == "__init__" else f"{prefix}.{path.stem}"] = path.read_text()
    return out


def import_edges(sources: Mapping[str, str]) -> Iterator[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of one module of `sources`
    by another: top level, inside functions and under TYPE_CHECKING alike."""

    def target(importer: str, node: ast.ImportFrom, name: str) -> str | None:
        package = importer if importer in PACKAGES else importer.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level else ""
        module = ".".join(part for part in (base, node.module or "") if part)
        return next((m for m in (f"{module}.{name}", module) if m in sources), None)

    def visit(importer: str, node: ast.AST, in_function: bool) -> Iterator[tuple[str, str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((importer, a.name, child.lineno, in_function) for a in child.names if a.name in sources)
            elif isinstance(child, ast.ImportFrom):
                for a in child.names:
                    found = target(importer, child, a.name)
                    if found is not None and found != importer:
                        yield importer, found, child.lineno, in_function
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(importer, child, inner)

    for module, source in sources.items():
        yield from visit(module, ast.parse(source), False)


def reach_check(edges: list[tuple[str, str, int, bool]]) -> Callable[[str, str], bool]:
    """reaches(a, b): whether module a imports b, directly or through others."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _line, _lazy in edges:
        graph.setdefault(importer, set()).add(imported)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return reaches


def lazy_import_offences(sources: Mapping[str, str], ranks: Mapping[str, int]) -> list[str]:
    """The imports inside functions that close an import cycle or import from a higher layer:
    import-linter sees them too, but a lazy import is how a cycle hides, so each is named here."""
    edges = list(import_edges(sources))
    reaches = reach_check(edges)
    offences = []
    for importer, imported, line, lazy in edges:
        if not lazy or (importer, imported) in LAZY_IMPORTS_ALLOWED:
            continue
        low, high = rank_of(importer, ranks), rank_of(imported, ranks)
        if reaches(imported, importer):
            offences.append(f"{importer}:{line}: imports {imported} in a function, which imports it back")
        elif low is not None and high is not None and high > low:
            offences.append(f"{importer}:{line}: imports {imported} in a function, from a higher layer")
    return offences


def test_every_product_module_is_in_exactly_one_layer() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    named = [name.strip() for layer in contract["layers"] for name in layer.split(":")]
    modules = [m for m in product_sources() if m.startswith("mailstate.")]
    unplaced = [m for m in modules if rank_of(m, layer_ranks()) is None and m != "mailstate.state"]
    twice = sorted({n for n in named if named.count(n) > 1})
    gone = [n for n in named if n not in modules]
    assert not unplaced, f"add them to a layer in pyproject.toml [tool.importlinter]: {unplaced}"
    assert not twice and not gone, f"named twice: {twice}; not a module: {gone}"


def test_no_import_inside_a_function_closes_a_cycle_or_climbs_a_layer() -> None:
    offences = lazy_import_offences(product_sources(), layer_ranks())
    assert not offences, "import it at the top, or move what both need down a layer:\n" + "\n".join(offences)


def test_the_lazy_import_rule_sees_a_hidden_cycle_and_an_upward_import() -> None:
    sources = {
        "pipull": "",
        "pipull.cli": "from .agent import Agent\ndef main():\n    from .install import run\n",
        "pipull.install": "def run():\n    from . import cli\n",
        "pipull.agent": "class Agent:\n    def tick(self):\n        from .dkim import Dkim\n",
        "pipull.dkim": "X = 1\n",
        "mailstate.state.models": "def later():\n    from mailstate.compiler.render import render\n",
        "mailstate.compiler.render": "from mailstate.state import models\n",
        "mailstate.state.files": "def later():\n    import mailstate.state.store\n",
        "mailstate.state.store": "import mailstate.state.files\nfrom mailstate.state.models import X\n",
    }
    ranks = {
        "mailstate.state.store": 2,
        "mailstate.compiler": 1,
        "mailstate.state.models": 0,
        "mailstate.state.files": 0,
    }
    assert lazy_import_offences(sources, ranks) == [
        "pipull.cli:3: imports pipull.install in a function, which imports it back",
        "pipull.install:2: imports pipull.cli in a function, which imports it back",
        "mailstate.state.models:2: imports mailstate.compiler.render in a function, which imports it back",
        "mailstate.state.files:2: imports mailstate.state.store in a function, which imports it back",
    ]
    del sources["mailstate.state.store"]
    sources["mailstate.state.store"] = "X = 1\n"
    assert lazy_import_offences(sources, ranks)[-1] == (
        "mailstate.state.files:2: imports mailstate.state.store in a function, from a higher layer"
    )


def test_the_node_agent_has_no_import_cycle() -> None:
    """lint-imports checks the server's packages for cycles; this is the same rule for pi-pull,
    TYPE_CHECKING imports included (a type that needs an import back is a Protocol instead)."""
    sources = {m: s for m, s in product_sources().items() if m.split(".")[0] == "pipull"}
    edges = list(import_edges(sources))
    reaches = reach_check(edges)
    cycles = sorted({f"{a} -> {b}" for a, b, _line, _lazy in edges if reaches(b, a)})
    assert not cycles, "\n".join(cycles)


# --- small units -----------------------------------------------------------------------------

MAX_FUNCTION_LINES = 80
# "path::function" -> why it is longer for now.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}  # function -> why it may run longer (none now)


def long_functions(path: str, source: str) -> list[str]:
    """ "path::name (N lines)" for every function or method of `source` over MAX_FUNCTION_LINES,
    nested ones too, decorators included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = (node.end_lineno or node.lineno) - first + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{path}::{node.name} ({lines} lines)")
    return out


def test_no_product_function_is_over_80_lines() -> None:
    found = [
        entry
        for folder in PACKAGES.values()
        for path in sorted((ROOT / folder).glob("*.py"))
        for entry in long_functions(str(path.relative_to(ROOT)), path.read_text())
        if entry.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED
    ]
    assert not found, "split them (docs/development.md, 'Small units'):\n" + "\n".join(found)


def test_the_length_rule_counts_nested_functions_and_decorators() -> None:
    def body(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    source = (
        f"@decorator\ndef fits():\n{body(78, '    ')}"  # 80 lines with its decorator
        f"@decorator\ndef decorated():\n{body(79, '    ')}"  # 81
        f"class C:\n    def outer(self):\n        def inner():\n{body(79, '            ')}"  # 81 and 80
    )
    assert long_functions("m.py", source) == ["m.py::decorated (81 lines)", "m.py::outer (81 lines)"]
