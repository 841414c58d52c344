"""The layers import in one direction only: problems -> bilevel -> hypergrad -> torch.

Checked twice: dynamically, by importing a package (and every submodule) in a fresh interpreter
and looking at ``sys.modules``; and statically, by parsing the source of every ``hypergrad``
module (found with importlib) and listing what it imports.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HYPERGRAD_ALLOWED = frozenset(sys.stdlib_module_names) | {"torch", "hypergrad", "__future__", "typing"}


def submodules(package: str) -> list[str]:
    """The package and every module under it, by name (imports the package itself)."""
    pkg = importlib.import_module(package)
    return [package, *sorted(info.name for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."))]


def modules_after_import(names: list[str]) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``names``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def loaded(modules: set[str], package: str) -> list[str]:
    """The entries of ``modules`` that are ``package`` or inside it."""
    return sorted(m for m in modules if m == package or m.startswith(f"{package}."))


def top_level_imports(source: str) -> dict[str, int]:
    """{top-level package: first line} of every absolute import in ``source`` (relative ones skipped)."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin).read_text()


# -- dynamic: a fresh interpreter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def after_hypergrad() -> set[str]:
    return modules_after_import(submodules("hypergrad"))


@pytest.mark.parametrize("forbidden", ["lightning", "pytorch_lightning", "bilevel", "problems"])
def test_importing_hypergrad_loads_no_upper_layer(after_hypergrad: set[str], forbidden: str) -> None:
    assert loaded(after_hypergrad, forbidden) == []


def test_the_fresh_interpreter_did_import_hypergrad(after_hypergrad: set[str]) -> None:
    assert {"hypergrad", "hypergrad.engine", "hypergrad.solvers", "torch"} <= after_hypergrad


def test_importing_bilevel_does_not_load_problems() -> None:
    modules = modules_after_import(submodules("bilevel"))
    assert "bilevel.problem" in modules and "hypergrad" in modules
    assert loaded(modules, "problems") == []


# -- static: the source of every hypergrad module ------------------------------------------------


def test_import_scanner_sees_absolute_imports_only() -> None:
    source = "import os.path\nfrom lightning import Trainer\nfrom . import tree\nif True:\n    import bilevel\n"
    assert top_level_imports(source) == {"os": 1, "lightning": 2, "bilevel": 5}


@pytest.mark.parametrize("name", submodules("hypergrad"))
def test_hypergrad_modules_import_only_stdlib_and_torch(name: str) -> None:
    imports = top_level_imports(module_source(name))
    offenders = {package: line for package, line in imports.items() if package not in HYPERGRAD_ALLOWED}
    assert offenders == {}, f"{name} imports {offenders} (package: line)"


def test_hypergrad_engine_module_imports_torch() -> None:
    assert "torch" in top_level_imports(module_source("hypergrad.engine"))


# -- bilevel.learned: a problem family beside the DSL and the loop, not inside them ---------------


@pytest.mark.parametrize("name", submodules("bilevel.learned"))
def test_learned_family_imports_only_torch_and_itself(name: str) -> None:
    imports = {}
    for node in ast.walk(ast.parse(module_source(name))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imports.setdefault(node.module, node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imports.setdefault(alias.name, node.lineno)
    offenders = {m: line for m, line in imports.items() if m.split(".")[0] not in HYPERGRAD_ALLOWED
                 and not (m == "bilevel.learned" or m.startswith("bilevel.learned."))}
    assert offenders == {}, f"{name} imports {offenders} (module: line)"
