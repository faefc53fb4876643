"""Each package has one small, curated public surface, and its ``__all__`` is exactly that."""

from __future__ import annotations

import importlib
import inspect

import pytest

import gradindex

API = [
    "BuildConfig",
    "CompressionConfig",
    "ExactInfluence",
    "FaissConfig",
    "Featurizer",
    "GradindexError",
    "InMemoryIndex",
    "PreconditionerConfig",
    "Settings",
    "Task",
    "TaskError",
    "__version__",
    "build",
    "lds",
    "load_task",
    "open_index",
    "refinalize",
]
"""What a user of the library imports from ``gradindex``; a change here is an API change."""

CLIENT_API = [
    "DEFAULT_URL",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "Example",
    "ExamplePage",
    "GradindexHTTPError",
    "Health",
    "IndexDetail",
    "IndexSummary",
    "InfluenceResponse",
    "InfluenceResult",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ScoresResponse",
    "SelectResponse",
    "SelfInfluencePage",
    "ServiceUnavailable",
    "TrainingExample",
    "Whoami",
    "__version__",
]


def test_gradindex_exports_exactly_the_curated_api() -> None:
    assert gradindex.__all__ == API
    assert gradindex.__all__ == sorted(gradindex.__all__, key=lambda n: (n[0].islower(), n))


@pytest.mark.parametrize("name", API)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(gradindex, name) is not None
    assert name in dir(gradindex)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Index'"):
        gradindex.Index  # noqa: B018 - the access is the test


def test_the_indexer_package_reexports_nothing() -> None:
    indexer = importlib.import_module("gradindex.indexer")
    importlib.import_module("gradindex.indexer.build")  # submodules become attributes, no more
    names = [n for n, v in vars(indexer).items()
             if not n.startswith("_") and not inspect.ismodule(v)]
    assert names == []


def test_client_exports_exactly_its_api() -> None:
    client = importlib.import_module("gradindex_client")
    assert client.__all__ == CLIENT_API
    for name in client.__all__:
        assert hasattr(client, name), name


@pytest.mark.parametrize("package", ["gradindex.server", "gradindex.indexer.tasks"])
def test_other_packages_declare_their_surface(package: str) -> None:
    module = importlib.import_module(package)
    assert isinstance(module.__all__, list)
    for name in module.__all__:
        assert hasattr(module, name), name
