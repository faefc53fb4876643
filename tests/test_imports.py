"""How the package imports: every module alone (no cycles, no import-order bugs), layers that
point down, torch-free modules that stay so, and the strategy registry's lazy classes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradindex.indexer.errors import ConfigError
from gradindex.indexer.registry import COMPRESSORS, SHAPES, Registry

from .conftest import REPO

PACKAGE = REPO / "gradindex"

SCRIPTS = {"gradindex.__main__", "gradindex.migrations.env"}
"""Modules that do their work on import (the command line; Alembic's environment, which only
Alembic can run), so they are not imported alone."""

TORCH_FREE = ["gradindex", "gradindex.cli", "gradindex.indexer.admin",
              "gradindex.indexer.config", "gradindex.indexer.errors",
              "gradindex.indexer.registry", "gradindex.indexer.settings",
              "gradindex.indexer.store"]
"""What the light commands (``--help``, ``list``, ``info``, ``keys``, ``db``) load."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _run(code: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


# Each module is imported in a child forked from an interpreter that has loaded the
# third-party libraries gradindex uses but no gradindex module: as fresh as a new interpreter
# for gradindex's own imports, without paying torch's start-up once per module.
IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in preload:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # a name, not a module, or an optional dependency its importer reports
assert not [m for m in sys.modules if m.split('.')[0] == 'gradindex']
failures, running, pending = {}, {}, list(modules)
while pending or running:
    while pending and len(running) < (os.cpu_count() or 1):
        name = pending.pop()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                os._exit(0)
            except BaseException:
                os.write(write, traceback.format_exc()[-30000:].encode())  # fits the pipe
                os._exit(1)
        os.close(write)
        running[pid] = (name, read)
    pid, status = os.wait()
    name, read = running.pop(pid)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    if status != 0:
        failures[name] = report or f"exit status {status}"
print(json.dumps(failures))
"""


def third_party() -> list[str]:
    """What gradindex imports from outside itself and the standard library (modules, and
    names imported from modules: those fail to import and are skipped)."""
    names = {name for path in PACKAGE.rglob("*.py") for name in _imports(path)}
    top = set(sys.stdlib_module_names) | {"gradindex", ""}
    return sorted(name for name in names if name.split(".")[0] not in top)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the import check forks")
def test_every_module_imports_alone() -> None:
    modules = [m for m in all_modules() if m not in SCRIPTS]
    assert len(modules) > 40 and "gradindex.indexer.registry" in modules
    preload = third_party()
    assert {"torch", "sqlalchemy.orm", "fastapi"} <= set(preload)
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, json.dumps(modules), json.dumps(preload)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failures = json.loads(done.stdout.splitlines()[-1])
    assert failures == {}, "\n".join(f"--- {k}\n{v}" for k, v in failures.items())


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved, ``import_module("x")``
    calls included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found += [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            found.append(node.args[0].value)
    return found


def test_the_indexer_never_imports_the_server_or_the_cli() -> None:
    offending = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in (PACKAGE / "indexer").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[:2] in (["gradindex", "server"], ["gradindex", "cli"])
    }
    assert offending == set()


def test_the_import_walk_sees_relative_imports() -> None:
    """The check above would be vacuous if relative imports were not resolved."""
    names = _imports(PACKAGE / "indexer" / "store" / "vectors.py")
    assert "gradindex.indexer.registry.FAISS_KINDS" in names
    assert "gradindex.indexer.store.files" in names
    assert "gradindex.indexer.store.db" in _imports(PACKAGE / "indexer" / "store" / "__init__.py")


def test_light_modules_never_import_torch() -> None:
    heavy = ("torch", "faiss", "scipy")
    code = (f"import importlib, sys\nfor m in {TORCH_FREE!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    assert _run(code).splitlines()[-1] == "[]"


def test_strategy_names_are_validated_without_torch() -> None:
    code = """
import sys
from gradindex.indexer.config import CompressionConfig, PreconditionerConfig
from gradindex.indexer.errors import ConfigError
for make in (lambda: CompressionConfig(compressor="pca"), lambda: PreconditionerConfig(shape="x"),
             lambda: PreconditionerConfig(fisher="true")):
    try:
        make()
    except ConfigError as exc:
        print(exc)
print("torch" in sys.modules)
"""
    assert _run(code).splitlines() == [
        "`compressor` must be one of ['auto', 'dropout', 'dropout-sjlt', 'factorized-dropout', "
        "'gaussian'], got 'pca'",
        "`shape` must be one of ['block', 'full', 'identity'], got 'x'",
        "`fisher` must be one of ['auto', 'empirical', 'expected', 'sampled'], got 'true'",
        "False",
    ]


def test_builtin_strategies_resolve_to_their_classes() -> None:
    from gradindex.indexer import compress, precondition

    assert list(COMPRESSORS) == ["factorized-dropout", "dropout", "dropout-sjlt", "gaussian"]
    assert COMPRESSORS["dropout-sjlt"] is compress.SjltCompressor
    assert SHAPES["full"] is precondition.FullShape
    assert compress.COMPRESSORS is COMPRESSORS and precondition.SHAPES is SHAPES
    assert all(COMPRESSORS[name].name == name for name in COMPRESSORS)
    with pytest.raises(KeyError):
        COMPRESSORS["pca"]


class _Toy:
    name = "toy"


def test_a_registered_strategy_is_accepted_and_a_taken_name_is_refused() -> None:
    registry: Registry[_Toy] = Registry("toy", {"builtin": "tests.test_imports:_Toy"})
    with pytest.raises(ConfigError, match="toy 'builtin' points at tests.test_imports:_Toy, "
                                          "whose name is 'toy'"):
        registry["builtin"]
    assert registry.register(_Toy) is _Toy and registry["toy"] is _Toy
    assert registry.register(_Toy) is _Toy  # the same class again (a module reloaded): fine

    class Other:
        name = "toy"

    with pytest.raises(ConfigError, match="toy 'toy' is already registered to "
                                          "tests.test_imports:_Toy"):
        registry.register(Other)


def test_a_new_compressor_registers_itself_for_the_settings() -> None:
    """One class, and the settings accept its name (in a new interpreter: registering is for
    the life of the process)."""
    code = """
from gradindex.indexer.compress import COMPRESSORS, DropoutCompressor, register_compressor
from gradindex.indexer.config import CompressionConfig
from gradindex.indexer.errors import ConfigError
try:
    CompressionConfig(compressor="dropout-copy")
except ConfigError as exc:
    print(exc)

@register_compressor
class DropoutCopy(DropoutCompressor):
    name = "dropout-copy"

print(CompressionConfig(compressor="dropout-copy").compressor,
      COMPRESSORS["dropout-copy"] is DropoutCopy)
"""
    assert _run(code).splitlines() == [
        "`compressor` must be one of ['auto', 'dropout', 'dropout-sjlt', 'factorized-dropout', "
        "'gaussian'], got 'dropout-copy'",
        "dropout-copy True",
    ]
