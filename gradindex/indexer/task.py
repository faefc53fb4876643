"""The task protocol (how users plug in a model and data) and loading a task from its spec.

A spec is ``package.module:Name`` or ``path/to/file.py:Name``; keyword arguments go to the
class's constructor. A task file may import modules that sit beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from .assets import record_task, resolve_task
from .errors import TaskError
from .fisher import FisherSupport

__all__ = ["Task", "TaskAdapter", "TaskSpec", "load_task", "task_class"]

log = logging.getLogger(__name__)

REQUIRED_METHODS = ("model", "examples", "collate", "loss")


@runtime_checkable
class Task(Protocol):
    """What a user implements so gradindex can attribute their model (DESIGN §5).

    The optional methods (``modules``, ``checkpoints``, ``logits``, ``metadata``, ``render``,
    ``queries``, ``__len__``) are resolved once by :class:`TaskAdapter`, which documents what
    each one buys and what stands in for it when a task lacks it.
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

    def record(self, data_dir: Path) -> dict[str, Any]:
        """What an index records of this task, with copies of its files in ``data_dir`` so the
        index serves from anywhere (:func:`gradindex.indexer.assets.record_task`)."""
        task_class(self.spec)  # import it: the modules it loads beside it are then known
        return record_task(self.spec, self.args, data_dir)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], data_dir: Path) -> TaskSpec:
        """The spec of a task an index recorded, loading from the copies in ``data_dir``."""
        spec, args = resolve_task(record, data_dir)
        return cls(spec, args)

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
    module_name = f"_gradindex_task_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise TaskError(f"cannot import task file {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    # A task file may import modules beside it: its folder comes first while it is imported,
    # then moves to the end of sys.path, where it can never shadow an installed package.
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskError(f"importing task file {path.name!r} failed: {exc!r}") from exc
    finally:
        sys.path.remove(folder)
        if folder not in sys.path:
            sys.path.append(folder)
    return module


def task_class(spec: str) -> type:
    """Import the class a spec names, checked to have the required methods.

    Raises:
        TaskError: the spec is malformed, the module or class does not exist, or the class
            lacks a required method.
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
    return cls


def load_task(spec: str, **kwargs: Any) -> Task:
    """Import the class a spec names and construct it with ``kwargs``.

    Raises:
        TaskError: the spec is malformed, the module or class does not exist, the class lacks a
            required method, or its constructor fails (rejected arguments, a missing file...).
    """
    cls = task_class(spec)
    name = spec.rpartition(":")[2]
    try:
        return cast(Task, cls(**kwargs))
    except TaskError:
        raise
    except TypeError as exc:
        raise TaskError(f"task {name} rejected its arguments {kwargs!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the user's constructor raised
        raise TaskError(f"task {name} failed to start: {type(exc).__name__}: {exc}") from exc


Checkpoint = str | None
"""A checkpoint name of ``task.checkpoints()``, or ``None`` for the task's one model."""


def _optional(task: Any, name: str) -> Any | None:
    fn = getattr(task, name, None)
    return fn if callable(fn) else None


class TaskAdapter:
    """A user's task with every optional method resolved once (DESIGN §5).

    The rest of gradindex talks to tasks only through this class, so what an optional method
    buys, and its default, is written down here and nowhere else:

    * ``modules(model)``: the modules to attribute; default every ``nn.Linear`` with a trainable
      weight.
    * ``checkpoints()``: several models to ensemble over (``model(checkpoint)`` loads one);
      default the one model of ``model()``.
    * ``logits(model, batch) -> [B, C]``: classifiers; enables the ``expected`` Fisher (the
      most faithful: digits LDS 0.949, exact influence's, against 0.771 for the empirical
      one) and the page's prediction. ``fisher="auto"`` uses it up to 1,024 classes.
    * ``loss(model, batch, sample=True)`` (required signature, optional behaviour): targets
      drawn from the model's own predictive distribution; enables the ``sampled`` Fisher, what
      ``auto`` uses without ``logits``. A loss that ignores ``sample`` gets the ``empirical``
      Fisher (:meth:`fisher_support` finds out).
    * ``metadata(payload) -> dict``: what filters match on; default ``{"label": payload["y"]}``
      when the payload has a ``y``, else nothing.
    * ``render(payload) -> dict``: how the web page shows an example; default none (the page
      shows the payload's fields).
    * ``queries() -> [(id, payload)]``: held-out examples for the page's gallery; default none.
    * ``__len__()``: how many examples ``examples()`` yields, for progress bars with an ETA
      when ``examples()`` is a generator.

    Args:
        task: the user's task object (anything with the four required methods).
    """

    def __init__(self, task: Any) -> None:
        missing = [m for m in REQUIRED_METHODS if _optional(task, m) is None]
        if missing:
            raise TaskError(f"task {type(task).__name__} lacks required methods: "
                            f"{', '.join(missing)}")
        self.task: Any = task
        self._modules = _optional(task, "modules")
        self._checkpoints = _optional(task, "checkpoints")
        self._logits = _optional(task, "logits")
        self._metadata = _optional(task, "metadata")
        self._render = _optional(task, "render")
        self._queries = _optional(task, "queries")
        self._len = _optional(task, "__len__")
        self._support: FisherSupport | None = None

    @classmethod
    def of(cls, task: Any) -> TaskAdapter:
        """``task`` itself when it is already adapted, else its adapter."""
        return task if isinstance(task, TaskAdapter) else cls(task)

    @property
    def name(self) -> str:
        return type(self.task).__name__

    # ------------------------------------------------------------------ required

    def examples(self) -> Iterable[tuple[str, Any]]:
        return self.task.examples()

    def collate(self, payloads: list[dict[str, Any]]) -> Any:
        return self.task.collate(payloads)

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        if sample:
            losses: torch.Tensor = self.task.loss(model, batch, sample=True)
        else:
            losses = self.task.loss(model, batch)
        return losses

    # ------------------------------------------------------------------ optional

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[B, C]`` logits.

        Raises:
            TaskError: the task defines no ``logits``.
        """
        if self._logits is None:
            raise TaskError(f"task {self.name} defines no logits(model, batch) -> [B, C]; "
                            "add it to use the `expected` Fisher")
        logits: torch.Tensor = self._logits(model, batch)
        return logits

    def fisher_support(self, model: nn.Module, batch: Any) -> FisherSupport:
        """What the task offers for the Fisher, probed once on ``batch`` and then remembered.

        ``logits`` counts when it returns ``[B, C]``; sampling counts when ``loss(...,
        sample=True)`` returns per-example losses that differ from the true-target ones under
        at least one of two seeds (a loss that ignores ``sample`` would silently give the
        empirical Fisher). The global random state is left as it was.
        """
        if self._support is not None:
            return self._support
        classes = None
        if self._logits is not None:
            with torch.no_grad():
                logits = self.logits(model, batch)
            if logits.dim() == 2:
                classes = int(logits.shape[1])
            else:
                log.info("task %s: logits have shape %s, not [B, C]; the expected Fisher is "
                         "unavailable", self.name, tuple(logits.shape))
        sampling, why = self._probe_sampling(model, batch)
        self._support = FisherSupport(classes=classes, sampling=sampling, why_not_sampling=why)
        return self._support

    def _probe_sampling(self, model: nn.Module, batch: Any) -> tuple[bool, str]:
        devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"]
        with torch.no_grad():
            true = self.task.loss(model, batch)
            for seed in (0, 1):
                with torch.random.fork_rng(devices=devices[:1]):
                    torch.manual_seed(seed)
                    try:
                        drawn = self.task.loss(model, batch, sample=True)
                    except TypeError as exc:
                        return False, f"is not accepted ({exc})"
                    except Exception as exc:  # noqa: BLE001 - any failure: no sampled Fisher
                        return False, f"fails ({type(exc).__name__}: {exc})"
                if not isinstance(drawn, torch.Tensor) or drawn.shape != true.shape:
                    return False, "does not return one loss per example"
                if not torch.equal(drawn, true):
                    return True, ""
        return False, "returns the true-target loss (it ignores `sample`)"

    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoints to ensemble over; ``[None]`` for the task's one model."""
        found: Sequence[str] = self._checkpoints() if self._checkpoints is not None else []
        return list(found) if found else [None]

    def model(self, checkpoint: Checkpoint = None) -> nn.Module:
        """The model of one checkpoint, in eval mode."""
        model = self.task.model() if checkpoint is None else self.task.model(checkpoint)
        if not isinstance(model, nn.Module):
            raise TaskError(f"task.model() returned {type(model).__name__}, not a "
                            "torch.nn.Module")
        return model.eval()

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules to attribute, by name."""
        if self._modules is not None:
            modules = dict(self._modules(model))
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

    def metadata(self, payload: Any) -> dict[str, Any]:
        """An example's metadata (what filters match on)."""
        if self._metadata is not None:
            meta = self._metadata(payload)
            if not isinstance(meta, dict):
                raise TaskError(f"task.metadata must return a dict, got {type(meta).__name__}")
            return meta
        if isinstance(payload, dict) and "y" in payload:
            return {"label": payload["y"]}
        return {}

    @property
    def has_render(self) -> bool:
        return self._render is not None

    def render(self, payload: Any) -> dict[str, Any] | None:
        """How the page shows ``payload``; None without ``render`` (or when it fails)."""
        if self._render is None:
            return None
        try:
            shown = self._render(payload)
        except Exception as exc:  # noqa: BLE001 - a page falls back to the raw payload
            log.warning("task.render failed on a payload: %s", exc)
            return None
        return shown if isinstance(shown, dict) else None

    def queries(self) -> list[tuple[str, Any]]:
        """Held-out ``(id, payload)`` pairs for the page's gallery (none by default)."""
        if self._queries is None:
            return []
        found = []
        for item in self._queries():
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise TaskError("task.queries() must yield (id, payload) pairs")
            found.append((str(item[0]), item[1]))
        return found

    def count(self, examples: Iterable[Any] | None = None) -> int | None:
        """How many training examples there are, when the task can say without iterating:
        ``len(task)``, else ``len(examples)`` of a sized ``examples()``."""
        if self._len is not None:
            return int(self._len())
        if isinstance(examples, Sized):
            return len(examples)
        return None
