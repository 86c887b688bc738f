"""Every error code mailstate can raise is drawn in the one tree, in state/errors.py's docstring,
under the class that raises it (so its HTTP status is the documented one).

The codes are read from the source itself (every `code="..."` literal, the classes'
`default_code`, the edges' `error_body("...")` / `HTTPError(status, "...")`, and the
`*_CODES` tables), so a new code that is not drawn in the tree fails this test.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from mailstate.state import errors

REPO = Path(__file__).resolve().parents[2]
SOURCES = [REPO / "state", REPO / "api", REPO / "compiler"]  # pi-pull has its own exit codes
ERROR_CLASSES = {
    c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MailstateError)
}


@dataclass(frozen=True)
class Raised:
    code: str
    cls: str | None  # the error class it is raised with, when the source says so
    where: str
    edge: bool = False


def tree() -> tuple[dict[str, set[str]], set[str]]:
    """(class name -> the words in its block of the tree, the words of the edges' paragraph)."""
    doc = errors.__doc__ or ""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("MailstateError"))
    blocks: dict[str, set[str]] = {}
    current = ""
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    for line in lines[start:end]:
        header = re.match(r"^\s*(?:[│ ]*[├└]── )?([A-Z]\w+)\s+(?:\d{3}(?:/\d{3})?)?(.*)$", line)
        if header and (line.strip().startswith("MailstateError") or "── " in line):
            current, text = header.group(1), header.group(2)
            assert current in ERROR_CLASSES, f"the tree draws {current}, which errors.py does not define"
        else:
            text = line
        blocks.setdefault(current, set()).update(re.findall(r"[a-z][a-z0-9_]*", text))
    edges = set(re.findall(r"[a-z][a-z0-9_]*", "\n".join(lines[end:])))
    return blocks, edges


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def raised_codes() -> list[Raised]:
    found: list[Raised] = []
    for base in SOURCES:
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Call):
                    name = _name(node.func)
                    for kw in node.keywords:
                        if kw.arg == "code":
                            cls = name if name in ERROR_CLASSES and isinstance(kw.value, ast.Constant) else None
                            found += [Raised(code, cls, f"{rel}:{node.lineno}") for code in _strings(kw.value)]
                    if name == "error_body" and node.args:
                        found += [
                            Raised(code, None, f"{rel}:{node.lineno}", edge=True) for code in _strings(node.args[0])
                        ]
                    if name == "HTTPError" and len(node.args) >= 2:
                        found += [
                            Raised(code, None, f"{rel}:{node.lineno}", edge=True) for code in _strings(node.args[1])
                        ]
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                    if any(isinstance(t, ast.Name) and t.id.endswith("_CODES") for t in node.targets):
                        for value in node.value.values:
                            found += [Raised(code, None, f"{rel}:{node.lineno}") for code in _strings(value)]
    for cls in ERROR_CLASSES.values():
        found.append(Raised(cls.default_code, cls.__name__, f"state/errors.py {cls.__name__}.default_code"))
    return found


def _block_of(cls: str, blocks: dict[str, set[str]]) -> str:
    """The nearest class in `cls`'s ancestry that has a block of its own in the tree."""
    return next(c.__name__ for c in ERROR_CLASSES[cls].__mro__ if c.__name__ in blocks)


def test_the_scan_sees_the_codes() -> None:
    codes = {r.code for r in raised_codes()}
    assert len(codes) > 40, codes  # the scan cannot pass by finding nothing
    assert {"token_not_found", "not_initialised", "revision_not_found", "internal_error", "invalid_domain"} <= codes


def test_every_raised_code_is_drawn_under_its_class() -> None:
    blocks, edges = tree()
    anywhere = set().union(*blocks.values())
    problems = []
    for r in raised_codes():
        if r.edge:
            ok = r.code in edges or r.code in anywhere
        elif r.cls is not None:
            ok = r.code in blocks[_block_of(r.cls, blocks)]
        else:
            ok = r.code in anywhere
        if not ok:
            home = f" under {_block_of(r.cls, blocks)}" if r.cls else ""
            problems.append(f"{r.where}: code {r.code!r} is not drawn in the tree in state/errors.py{home}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_error_class_is_drawn_or_documented_by_its_parent() -> None:
    blocks, _ = tree()
    for name, cls in ERROR_CLASSES.items():
        if name not in blocks:
            # A class without a line of its own (BranchMoved) has its code in its parent's block.
            assert cls.default_code in blocks[_block_of(name, blocks)], name
