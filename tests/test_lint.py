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


# Which wings a wing may import (ARCHITECTURE.md's "Rules the layout keeps"): dependencies point one
# way, so the runner can run any scenario and the report reads any results file.
FORBIDDEN = {
    "running": ("melt_bench.scenarios", "melt_bench.commands", "melt_bench.reporting", "melt_bench.training"),
    "reporting": ("melt_bench.scenarios", "melt_bench.commands", "melt_bench.training"),
    "trackers": ("melt_bench.scenarios", "melt_bench.commands", "melt_bench.running", "melt_bench.reporting"),
    "scenarios": ("melt_bench.commands",),
    "models": ("melt_bench.running", "melt_bench.scenarios", "melt_bench.commands", "melt_bench.reporting",
               "melt_bench.trackers", "melt_bench.training", "melt_bench.evaluation"),
}


def test_imports_point_one_way():
    import ast

    wrong = []
    for wing, forbidden in FORBIDDEN.items():
        folder = ROOT / ("models" if wing == "models" else f"bench/{wing}")
        for path in sorted(folder.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names
                          if name.startswith(forbidden)]
    assert wrong == []


def test_scenario_modules_load_without_torch():
    """The command line builds a command's options and points before torch loads (seconds)."""
    import sys

    code = ("import sys\nfrom melt_bench.scenarios import accuracy, capacity, latency, memory\n"
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_package_folder_is_installed():
    """pyproject lists the packages (bench/ installs as melt_bench): a folder left out works in an
    editable install and breaks a wheel (melt_bench.commands once did)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"melt_bench" + ("." + init.parent.name if init.parent.name != "bench" else "")
               for init in ROOT.glob("bench/**/__init__.py")}
    assert folders | {"melt_bench.models", "melt_bench.suites"} == set(setuptools["packages"])
