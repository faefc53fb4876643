"""Each package has one public surface, and its ``__all__`` is complete and importable."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import indexer


def test_indexer_all_names_exist() -> None:
    for name in indexer.__all__:
        assert hasattr(indexer, name), name
    assert len(set(indexer.__all__)) == len(indexer.__all__)


def test_indexer_all_is_complete() -> None:
    """Every public class or function that a submodule exports reaches the package surface."""
    missing = []
    for info in pkgutil.iter_modules(indexer.__path__):
        if info.name.startswith("_") or info.ispkg or info.name == "cli":
            continue
        module = importlib.import_module(f"indexer.{info.name}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            exported = inspect.isclass(obj) or inspect.isfunction(obj)
            if exported and name not in indexer.__all__ and not name.startswith("_"):
                missing.append(f"indexer.{info.name}.{name}")
    assert not missing, f"exported by a module but not by indexer: {missing}"


@pytest.mark.parametrize("package", ["client", "server", "indexer.tasks"])
def test_other_packages_declare_their_surface(package: str) -> None:
    module = importlib.import_module(package)
    assert isinstance(module.__all__, list)
    for name in module.__all__:
        assert hasattr(module, name), name
