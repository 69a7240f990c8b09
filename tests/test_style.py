"""Style that keeps the scripts readable as a reference (CleanRL's): ruff's formatting at 127 columns and its
default lint rules (pyproject.toml), and no idiom a reader trips on: no statements joined by commas, no lambda
bound to a name, no writes through __dict__, no `global`. ruff is a development dependency, pinned in
requirements.txt."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("*.py"), *(p for d in ("tests", "benchmarks", "examples") for p in ROOT.glob(f"{d}/*.py"))])


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("ruff is not installed: pip install -r requirements.txt (it pins ruff, the formatter)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_code_is_formatted_with_ruff():
    out = ruff("format", "--check", "--diff", ".")
    assert out.returncode == 0, f"run `ruff format .` (pyproject.toml: 127 columns):\n{out.stdout[-3000:]}{out.stderr[-1000:]}"


def test_ruff_lint_passes():
    out = ruff("check", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def idioms(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
            found.append((node.lineno, "statements joined by commas (a tuple built and dropped)"))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            found.append((node.lineno, "lambda bound to a name (write a def)"))
        if isinstance(node, ast.Global):
            found.append((node.lineno, "global statement"))
        if isinstance(node, ast.Attribute) and node.attr == "__dict__" and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, "__dict__ access"))
    return found


def test_idioms_checker_finds_each_idiom():
    code = "a(), b()\nf = lambda x: x\ndef g():\n    global h\nself.__dict__['x'] = 1\nx, y = 1, 2\n"
    assert [line for line, _ in idioms(ast.parse(code))] == [1, 2, 4, 5]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_idioms_a_reader_trips_on(path):
    found = idioms(ast.parse(path.read_text()))
    assert not found, "\n".join(f"{path.name}:{line}: {what}" for line, what in found)


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_no_script_line_is_longer_than_127_columns(path):
    """The formatter cannot split long strings: a reader's screen and diff stay at 127 columns anyway."""
    long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 127]
    assert not long, f"{path.name}: lines {long} are over 127 columns"
