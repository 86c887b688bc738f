"""The test suite's own rules (tests/README.md): no test module imports another test module, a
conftest or a fixture."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

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
