"""Lint and import order (ruff, configured in pyproject.toml) run with the tests, so CI checks them."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    assert ruff, 'ruff is not installed: pip install -e ".[dev]" (the README\'s test command does)'
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_over_500_lines_and_no_function_over_80():
    """The size limits the code keeps (#24): a module or function past them is doing two jobs."""
    import ast

    too_big = []
    for path in sorted([*ROOT.glob("bench/**/*.py"), *ROOT.glob("models/*.py")]):
        text = path.read_text()
        if text.count("\n") > 500:
            too_big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                               f"{node.end_lineno - node.lineno + 1} lines")
    assert too_big == []
