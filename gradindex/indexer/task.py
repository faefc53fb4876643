"""The task protocol (how users plug in a model and data) and loading a task from its spec.

A spec is ``package.module:Name`` or ``path/to/file.py:Name``; keyword arguments go to the
class's constructor. A task file may import modules that sit beside it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from .errors import TaskError

__all__ = ["Task", "TaskSpec", "attributed_modules", "load_task", "task_checkpoints"]

REQUIRED_METHODS = ("model", "examples", "collate", "loss")


@runtime_checkable
class Task(Protocol):
    """What a user implements so gradindex can attribute their model (DESIGN §5).

    Optional methods, looked up with ``getattr``: ``modules(model)`` (what to attribute; default
    every ``nn.Linear`` with a trainable weight), ``render(payload)``, ``checkpoints()`` (several
    models to ensemble over; ``model(checkpoint)`` then loads one) and ``logits(model, batch)``
    (``[B, C]`` for classifiers, which enables the ``expected`` Fisher).
    """

    def model(self) -> nn.Module: ...

    def examples(self) -> Iterable[tuple[str, dict[str, Any]]]: ...

    def collate(self, payloads: list[dict[str, Any]]) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor: ...


class TaskSpec:
    """A task spec string with its keyword arguments, resolved to an absolute form.

    Args:
        spec: ``package.module:Name`` or ``path/to/file.py:Name``.
        args: keyword arguments for the task's constructor (JSON-serialisable).
    """

    def __init__(self, spec: str, args: Mapping[str, Any] | None = None) -> None:
        self.spec = _absolute_spec(spec)
        self.args = dict(args or {})

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "args": self.args}

    def load(self) -> Task:
        return load_task(self.spec, **self.args)

    def __repr__(self) -> str:
        return f"TaskSpec({self.spec!r}, {self.args!r})"


def _split(spec: str) -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise TaskError(
            f"task spec {spec!r} must look like 'package.module:ClassName' or "
            "'path/to/file.py:ClassName'"
        )
    return target, name


def _absolute_spec(spec: str) -> str:
    target, name = _split(spec)
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{name}"
    return spec


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    module_name = f"_gradindex_task_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    folder = str(path.parent)
    if folder not in sys.path:  # a task file may import modules that sit beside it
        sys.path.insert(0, folder)
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise TaskError(f"cannot import task file {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskError(f"importing task file {str(path)!r} failed: {exc!r}") from exc
    return module


def load_task(spec: str, **kwargs: Any) -> Task:
    """Import the class a spec names and construct it with ``kwargs``.

    Raises:
        TaskError: the spec is malformed, the module or class does not exist, the class lacks a
            required method, or its constructor rejects the arguments.
    """
    target, name = _split(spec)
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser().resolve())
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise TaskError(
                f"cannot import module {target!r} of task spec {spec!r}: {exc}"
            ) from exc
    cls = getattr(module, name, None)
    if cls is None:
        raise TaskError(f"module {target!r} has no attribute {name!r} (task spec {spec!r})")
    if not inspect.isclass(cls):
        raise TaskError(f"{spec!r} names {type(cls).__name__}, not a task class")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise TaskError(f"task class {spec!r} lacks required methods: {', '.join(missing)}")
    try:
        task = cast(Task, cls(**kwargs))
        return task
    except TypeError as exc:
        raise TaskError(f"task {spec!r} rejected its arguments {kwargs!r}: {exc}") from exc


def task_checkpoints(task: Task) -> list[str | None]:
    """The checkpoints to ensemble over: ``task.checkpoints()``, or one default (``None``) when
    the task has no such method or it returns nothing."""
    fn = getattr(task, "checkpoints", None)
    checkpoints: Sequence[str] = fn() if fn is not None else []
    return list(checkpoints) if checkpoints else [None]


def load_model(task: Task, checkpoint: str | None) -> nn.Module:
    """The task's model for one checkpoint, in eval mode."""
    model = task.model() if checkpoint is None else task.model(checkpoint)  # type: ignore[call-arg]
    if not isinstance(model, nn.Module):
        raise TaskError(f"task.model() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def attributed_modules(task: Task, model: nn.Module) -> dict[str, nn.Module]:
    """The modules to attribute, by name: ``task.modules(model)`` or every trainable Linear."""
    fn = getattr(task, "modules", None)
    if fn is not None:
        modules = dict(fn(model))
    else:
        modules = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad
        }
    if not modules:
        raise TaskError(
            "no module to attribute: the model has no nn.Linear with a trainable weight; "
            "define task.modules(model) to choose them"
        )
    for name, module in modules.items():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            raise TaskError(f"attributed module {name!r} has no trainable parameter")
    return modules
