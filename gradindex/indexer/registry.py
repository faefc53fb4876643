"""The names users type for each build strategy, and where each one's class lives.

A leaf module: it imports nothing of gradindex but the errors, and no torch. The settings
(:mod:`.config`) validate names against it and the command line lists its choices from it
without loading a model library. The built-in strategies are ``"module:Class"`` strings,
resolved on first look-up; :func:`register_compressor` and :func:`register_shape` add classes
(the built-in ones register themselves the same way when their module loads).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:  # for annotations only: those modules import torch
    from .compress import Compressor
    from .precondition import Shape

__all__ = [
    "COMPRESSORS",
    "FAISS_KINDS",
    "FISHER_CHOICES",
    "FISHER_KINDS",
    "SHAPES",
    "Registry",
    "check_choice",
    "register_compressor",
    "register_shape",
]

T = TypeVar("T")
C = TypeVar("C", bound="Compressor")
S = TypeVar("S", bound="Shape")

FISHER_KINDS = ("empirical", "sampled", "expected")
"""Which gradients estimate the Fisher; see :meth:`.featurize.Featurizer.fisher`."""

FISHER_CHOICES = ("auto", *FISHER_KINDS)
"""What a build may ask for: a kind, or ``auto`` (:func:`.fisher.resolve_kind`), the default."""

FAISS_KINDS = ("flat", "hnsw", "ivf")
"""The FAISS indexes a build can publish; see :class:`.store.vectors.FaissConfig`."""


def check_choice(value: object, choices: Mapping[str, object] | tuple[str, ...],
                 field: str) -> None:
    """Raise a :class:`ConfigError` naming ``field`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"`{field}` must be one of {sorted(choices)}, got {value!r}")


class Registry(Mapping[str, type[T]], Generic[T]):
    """Strategy classes by the name users type, each imported only when first looked up.

    Args:
        kind: what the strategies are (``"compressor"``), for error messages.
        builtins: name → ``"package.module:Class"`` of the strategies gradindex ships.
    """

    def __init__(self, kind: str, builtins: Mapping[str, str]) -> None:
        self.kind = kind
        self._entries: dict[str, str | type[T]] = dict(builtins)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> type[T]:
        """The class registered as ``name``, importing its module on first use.

        Raises:
            KeyError: no strategy of that name.
        """
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            cls: type[T] = getattr(importlib.import_module(module), attr)
            if getattr(cls, "name", None) != name:
                raise ConfigError(f"{self.kind} {name!r} points at {entry}, whose name is "
                                  f"{getattr(cls, 'name', None)!r}")
            self._entries[name] = entry = cls
        return entry

    def register(self, cls: type[T]) -> type[T]:
        """Make ``cls`` available under ``cls.name``; a built-in's own class may re-register.

        Raises:
            ConfigError: another class already holds that name.
        """
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} class needs a `name`; {cls.__qualname__} has none")
        held = self._entries.get(name)
        if held is not None and _spec(held) != _spec(cls):
            raise ConfigError(f"{self.kind} {name!r} is already registered to {_spec(held)}")
        self._entries[name] = cls
        return cls


def _spec(entry: str | type) -> str:
    """``"module:Class"`` of a registry entry (a class or its spec string)."""
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


COMPRESSORS: Registry[Compressor] = Registry("compressor", {
    "factorized-dropout": "gradindex.indexer.compress:FactorizedDropoutCompressor",
    "dropout": "gradindex.indexer.compress:DropoutCompressor",
    "dropout-sjlt": "gradindex.indexer.compress:SjltCompressor",
    "gaussian": "gradindex.indexer.compress:GaussianCompressor",
})
"""Compressors (:mod:`.compress`), the default first."""

SHAPES: Registry[Shape] = Registry("shape", {
    "block": "gradindex.indexer.precondition:BlockShape",
    "full": "gradindex.indexer.precondition:FullShape",
    "identity": "gradindex.indexer.precondition:IdentityShape",
})
"""Preconditioner shapes (:mod:`.precondition`), the default first."""


def register_compressor(cls: type[C]) -> type[C]:
    """Class decorator: make a compressor available under ``cls.name``."""
    COMPRESSORS.register(cls)
    return cls


def register_shape(cls: type[S]) -> type[S]:
    """Class decorator: make a preconditioner shape available under ``cls.name``."""
    SHAPES.register(cls)
    return cls
