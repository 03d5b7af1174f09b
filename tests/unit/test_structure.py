"""The code's shape (issue 21): small modules and classes, or a stated reason.

A module over 600 lines, or a class over 400 lines or 30 methods, says why in one line of its
docstring that starts with "Size:"; the layers' import direction is import-linter's contract
(pyproject.toml), run by .ci/run.
"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
MAX_CLASS_METHODS = 30


def _says_why(docstring: str | None) -> bool:
    return any(line.strip().startswith("Size:") for line in (docstring or "").splitlines())


def oversized() -> list[str]:
    found = []
    for path in sorted(GATEWAY.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        name = str(path.relative_to(GATEWAY.parent))
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and not _says_why(ast.get_docstring(tree)):
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            methods = sum(
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) for item in node.body
            )
            if (size > MAX_CLASS_LINES or methods > MAX_CLASS_METHODS) and not _says_why(
                ast.get_docstring(node)
            ):
                found.append(f"{name}: class {node.name}: {size} lines, {methods} methods")
    return found


def test_modules_and_classes_are_small_or_say_why():
    assert oversized() == []
