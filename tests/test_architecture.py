"""Dependencies point one way: the import-linter contracts of pyproject.toml ([tool.importlinter])
hold for the package, imports inside functions included. The layers of top-level units (app.cli
over app.cluster over app.main over app.api over app.imaging over app.engine over the shared
modules over app.errors), no import cycle between the modules of any package, the API dialects
independent of each other, and the web framework and Ray imported only at their edges.

The second test shows that each contract can fail: the same configuration, run on a copy of the
package with one offending import added, reports that contract broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ("layers", "acyclic", "dialects", "http-edge", "ray-edge")


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`lint-imports` with the interpreter running the tests, reading `cwd`/pyproject.toml and
    analysing the `app` package found in `cwd` (the linter puts its working directory first on
    sys.path). No cache: it would leave an .import_linter_cache folder behind."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout, done.stdout


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's Python files and pyproject.toml in a temporary folder."""
    folder = tmp_path_factory.mktemp("import-contracts")
    skip = shutil.ignore_patterns("__pycache__", "configs", "static")
    shutil.copytree(ROOT / "app", folder / "app", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    return folder


def test_the_copy_keeps_the_contracts(package_copy: Path) -> None:
    done = lint_imports(package_copy)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("engine/tiny.py", "from app.api import deps", "layers"),  # the engine reaches up to the HTTP layer
        ("errors.py", "import app.registry", "layers"),  # the bottom module imports a shared one
        ("newunit.py", "import app.errors", "layers"),  # a top-level module the layers do not name
        ("engine/jobs.py", "from app.engine import worker", "acyclic"),  # jobs ↔ worker
        ("api/visioncraft.py", "from app.api import a1111", "dialects"),
        ("engine/engine.py", "import fastapi", "http-edge"),
        ("auth.py", "import uvicorn", "http-edge"),
        ("api/health.py", "import ray", "ray-edge"),
    ],
)
def test_a_contract_breaks(package_copy: Path, module: str, line: str, contract: str) -> None:
    """One offending import (inside a function, where imports hide best) and the contract is
    reported broken, naming the importing module (the cycle report names it relative to its
    package: `.worker -> .jobs`)."""
    path = package_copy / "app" / module
    original = path.read_text(encoding="utf-8") if path.exists() else None
    path.write_text((original or "") + f"\n\ndef _offending():\n    {line}  # noqa\n", encoding="utf-8")
    try:
        done = lint_imports(package_copy, "--contract", contract)
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_text(original, encoding="utf-8")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "BROKEN" in output and "0 kept, 1 broken" in output, output
    assert module.removesuffix(".py").rpartition("/")[2] in output, output
