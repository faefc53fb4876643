"""Featurize: payloads → compressed per-example gradients, for every checkpoint and mask.

This is the one code path the build pipeline (index vectors) and the server (query vectors)
share. Gradients are of the task's per-example loss, so ``score = g̃(z)ᵀ P g̃(z_i) > 0`` means
up-weighting ``z_i`` lowers the loss on ``z`` (a proponent).

The output vector concatenates one group per (checkpoint, mask), each group its compressor's
blocks in layer order. A query divides by the number of groups so that one inner product is
the ensemble mean of the per-group scores (DESIGN §1).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_map

from .compress import (
    COMPRESSORS,
    Compressor,
    Layer,
    SjltCompressor,
    describe_layers,
    is_linear,
    select_modules,
)
from .config import CompressionConfig, PreconditionerConfig
from .errors import NonFiniteLoss, TaskError
from .fisher import FisherPlan, FisherSupport, plan_fisher
from .hooks import LayerCapture
from .task import Task, TaskAdapter

__all__ = [
    "Block", "Featurizer", "FisherBatcher", "batch_fisher_rows", "expected_cotangents",
    "featurize",
]

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]
Cotangents = Callable[[torch.Tensor], torch.Tensor]
"""The output's ``[B, ...]`` → ``[R, B, ...]`` cotangents: row ``r`` of an example is the
gradient of ``⟨v_r, output⟩``."""

ROWS_PER_PASS = 512
"""Most Fisher rows (examples × rows per example) one batched backward computes: bounds the
``[R·B, ..., D_out]`` output gradients held at once."""

BATCHED_FROM = 2
"""Rows per batch from which one batched backward (a ``vmap``) beats plain ones in turn."""

COMPRESS_FLOATS = 1 << 20
"""Floats a compressor forms at once from batched output gradients (rows × its width before
any folding): a wider slice falls out of cache (measured on the MNIST MLP: `dropout-sjlt`
k=4096 at 320 rows a slice cost 1.8× what 32 did; `factorized-dropout` k=2048 ×2 was
fastest at 320)."""

FULL_FLOATS_PER_PASS = 1 << 26
"""Most floats of full per-example gradients (rows × attributed parameters) one batched
``vjp`` holds (256 MiB of float32)."""


@dataclass(frozen=True)
class Block:
    """A contiguous slice of the feature vector: one layer of one (checkpoint, mask) group."""

    group: int
    checkpoint: int
    mask: int
    layer: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Pass:
    """One forward of the model and the per-example objectives differentiated after it."""

    forward: Forward
    heads: Sequence[Head]
    rng_seed: int | None = None
    cotangents: Cotangents | None = None
    """Instead of ``heads``: the rows of every cotangent from one batched backward."""


def _to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _check_per_example(values: torch.Tensor, b: int, what: str, finite: bool = True) -> None:
    """Shape ``[B, ...]``, and (one device sync) every value finite."""
    if not isinstance(values, torch.Tensor):
        raise TaskError(f"{what} must return a tensor, got {type(values).__name__}")
    if values.dim() == 0 or values.shape[0] != b:
        raise TaskError(
            f"{what} must return one value per example, shape [{b}, ...], got "
            f"{tuple(values.shape)}; return per-example losses (reduction='none'), not their mean"
        )
    if not finite:
        return
    bad = ~torch.isfinite(values.detach().reshape(b, -1)).all(dim=1)
    if bool(bad.any()):
        positions = bad.nonzero().flatten().tolist()
        raise NonFiniteLoss(
            f"{what} is NaN or infinite for the example(s) at batch position(s) {positions}; "
            "such an example has no gradient to attribute",
            positions,
        )


class Featurizer:
    """Owns a task's models (one per checkpoint) and compressors (one per checkpoint × mask).

    Args:
        task: the task to featurize.
        config: compression settings; masks derive from its seed alone.
        device: where gradients are computed (default: cuda when available, else cpu).
        compressors: ready-made compressors ``[checkpoint][mask]`` instead of drawing them from
            ``config`` (a test hands the flat path the factorized path's coordinates this way).
    """

    def __init__(
        self,
        task: Task,
        config: CompressionConfig | None = None,
        *,
        device: str | torch.device | None = None,
        compressors: Sequence[Sequence[Compressor]] | None = None,
    ) -> None:
        self.task = TaskAdapter.of(task)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.checkpoints = self.task.checkpoints()
        self.config = (config or CompressionConfig()).resolve(len(self.checkpoints))
        self.models: list[nn.Module] = []
        self.modules: list[dict[str, nn.Module]] = []
        for checkpoint in self.checkpoints:
            model = self.task.model(checkpoint)
            if any(p.device != self.device for p in model.parameters()):
                # a copy: the task may cache its model, and other users expect it where it was
                model = copy.deepcopy(model).to(self.device)
            self.models.append(model)
            self.modules.append(select_modules(model, self.config.modules) if self.config.modules
                                else self.task.modules(model))
        self.layers: list[Layer] = describe_layers(self.modules[0])
        for modules in self.modules[1:]:
            if describe_layers(modules) != self.layers:
                raise TaskError("every checkpoint must have the same attributed layers and shapes")
        self.total_params = sum(layer.numel for layer in self.layers)
        self.keep = self.config.resolve_keep(self.total_params)
        cls = COMPRESSORS[self.config.compressor]
        masks = self.config.masks or 1
        if masks > 1 and self.keep >= 1.0 and cls.exact_at_full_keep:
            log.info("keep = 1: the %d masks would be identical; using one", masks)
            masks = 1
        if compressors is None:
            compressors = [
                [
                    cls(self.layers, self.keep, self.config, checkpoint=c, mask=m)
                    for m in range(masks)
                ]
                for c in range(len(self.checkpoints))
            ]
        self.compressors = [list(row) for row in compressors]
        self.blocks: list[Block] = []
        offset = 0
        for c, row in enumerate(self.compressors):
            for m, comp in enumerate(row):
                for layer, size in comp.blocks:
                    group = c * len(row) + m
                    self.blocks.append(Block(group, c, m, layer, offset, offset + size))
                    offset += size
        self.dim = offset
        self.groups = sum(len(row) for row in self.compressors)
        self._param_names = [self._layer_params(model, mods) for model, mods in
                             zip(self.models, self.modules, strict=True)]
        self._last_batch: tuple[tuple[dict[str, Any], ...], Any] | None = None

    # ----------------------------------------------------------------- public surface

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the vector layout."""
        return {
            "compressor": self.config.compressor,
            "keep": self.keep,
            "dim": self.dim,
            "groups": self.groups,
            "checkpoints": len(self.checkpoints),
            "masks": len(self.compressors[0]),
            "total_params": self.total_params,
            "layers": [
                {"name": ly.name, "rows": ly.rows, "cols": ly.cols, "bias": ly.bias}
                for ly in self.layers
            ],
            "dims": {b.layer: b.size for b in self.blocks if b.group == 0},
        }

    def fingerprint(self) -> list[str]:
        """sha256 of each checkpoint's state dict (names, dtypes, shapes and bytes, by name): an
        index records it, and refuses to serve models whose weights differ."""
        digests = []
        for model in self.models:
            h = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            digests.append(h.hexdigest())
        return digests

    def collate(self, payloads: Sequence[dict[str, Any]]) -> Any:
        """The task's batch for ``payloads``, on the featurizer's device."""
        if not payloads:
            raise TaskError("no examples to featurize")
        try:
            batch = self.task.collate(list(payloads))
        except TaskError:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise TaskError(f"the task rejected the payload: {exc}") from exc
        return _to_device(batch, self.device)

    def _collated(self, payloads: Sequence[dict[str, Any]]) -> Any:
        """:meth:`collate`, remembered for the last payloads: a batch's Fisher rows, computed
        right after its vectors, reuse its batch (collating is most of a small model's pass:
        two thirds on the MNIST MLP). Payloads are compared by identity, and held so that
        identity stays theirs; they are not expected to change in between."""
        last = self._last_batch
        if last is not None and len(last[0]) == len(payloads) and all(
                a is b for a, b in zip(last[0], payloads, strict=True)):
            return last[1]
        batch = self.collate(payloads)
        self._last_batch = (tuple(payloads), batch)
        return batch

    def raw(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Compressed loss gradients at the true targets, ``[B, dim]`` float32 on cpu."""
        passes = [_Pass(self._loss, [lambda losses: losses])]
        return self._run(payloads, passes)[0]

    def query(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Query vectors: raw gradients scaled so one inner product is the ensemble mean."""
        return self.raw(payloads) / self.groups

    def fisher(
        self, payloads: Sequence[dict[str, Any]], kind: str, samples: int = 1,
        *, rank: int | None = None, reference: bool = False,
    ) -> torch.Tensor:
        """Rows ``r`` with ``F̃ = (1/n) Σ r rᵀ`` over the ``n`` examples, ``[R·B, dim]``.

        ``expected`` rows come from one forward and one batched backward of all the rows'
        output cotangents (``torch.autograd.grad(..., is_grads_batched=True)``, or a ``vmap``
        over ``vjp`` for full-gradient compressors).

        Args:
            kind: ``empirical`` (true targets), ``sampled`` (``samples`` targets drawn from the
                model per example), ``expected`` (every class, weighted by its probability).
            rank: ``expected`` only: rows per example, the top eigen-directions of each
                example's output Hessian ``diag(p) - p pᵀ`` (None: one row per class, exact).
            reference: compute ``expected`` rows one backward per row, as before the batched
                path: the reference the tests and benchmarks compare with.
        """
        if kind == "empirical":
            return self.raw(payloads)
        if kind == "sampled":
            # the draws depend on the batch's payloads alone (shards and resumed builds draw
            # alike); pickled, not JSON-encoded: 1.5 ms against 45 ms for 128 MNIST payloads
            key = hashlib.sha256(pickle.dumps(list(payloads), protocol=4))
            base = int.from_bytes(key.digest()[:6], "little") + self.config.seed
            passes = [
                _Pass(self._sampled_loss, [lambda losses: losses], rng_seed=base + s)
                for s in range(samples)
            ]
            rows = self._run(payloads, passes)
            return torch.cat(rows) / samples**0.5
        if kind == "expected":
            cotangents = functools.partial(expected_cotangents, rank=rank)
            if not reference:
                return self._run(payloads, [_Pass(self._logits, [], cotangents=cotangents)])[0]
            n_classes = self._n_classes(payloads)
            heads = ([self._class_head(c) for c in range(n_classes)] if rank is None
                     or rank >= n_classes else
                     [self._cotangent_head(cotangents, j) for j in range(rank)])
            return torch.cat(self._run(payloads, [_Pass(self._logits, heads)]))
        raise TaskError(f"unknown Fisher kind {kind!r}")

    def plan_fisher(
        self, config: PreconditionerConfig, payloads: Sequence[dict[str, Any]],
        examples: int | None,
    ) -> FisherPlan:
        """Resolve ``config.fisher`` (``auto``) against the task, probed on ``payloads`` (a
        few training examples), and spend its budget over ``examples`` training examples."""
        if config.fisher == "empirical":
            support = FisherSupport(classes=None, sampling=False)
        else:
            support = self.task.fisher_support(self.models[0], self.collate(payloads))
        return plan_fisher(config, support, examples, self.config.seed)

    def fisher_rows(self, payloads: Sequence[dict[str, Any]], plan: FisherPlan) -> torch.Tensor:
        """Per example its Fisher rows under ``plan``, ``[B, R, dim]`` (R classes or samples)."""
        rows = self.fisher(payloads, plan.kind, plan.samples or 1, rank=plan.rank)
        r = rows.shape[0] // len(payloads)
        return rows.reshape(r, len(payloads), -1).transpose(0, 1)

    # ------------------------------------------------------------ objectives

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.loss(model, batch)

    def _sampled_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.loss(model, batch, sample=True)

    def _logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.logits(model, batch)

    @staticmethod
    def _class_head(c: int) -> Head:
        # Σ_c p_c g_c g_cᵀ = Σ_c (√p_c g_c)(√p_c g_c)ᵀ: the GGN of softmax cross-entropy.
        def head(logits: torch.Tensor) -> torch.Tensor:
            logp = torch.log_softmax(logits.float(), dim=-1)[:, c]
            return -logp * (0.5 * logp.detach()).exp()

        return head

    @staticmethod
    def _cotangent_head(cotangents: Cotangents, j: int) -> Head:
        # row j alone: ⟨v_j, output⟩ with v_j computed from the (detached) output
        def head(out: torch.Tensor) -> torch.Tensor:
            v = cotangents(out.detach())[j]
            return (out * v).reshape(out.shape[0], -1).sum(dim=1)

        return head

    def _n_classes(self, payloads: Sequence[dict[str, Any]]) -> int:
        batch = self.collate(payloads[:1])
        with torch.no_grad():
            logits = self._logits(self.models[0], batch)
        if logits.dim() != 2:
            raise TaskError(f"task.logits must return [B, C], got {tuple(logits.shape)}")
        return int(logits.shape[1])

    # ------------------------------------------------------------ engines

    def _run(
        self, payloads: Sequence[dict[str, Any]], passes: Sequence[_Pass]
    ) -> list[torch.Tensor]:
        """One ``[B, dim]`` tensor per (pass, head), each the concatenation of every group; a
        pass with cotangents gives one ``[R·B, dim]`` (cotangent-major) instead."""
        batch = self._collated(payloads)
        b = len(payloads)
        per_head: list[list[torch.Tensor]] = []
        for c, (model, modules) in enumerate(zip(self.models, self.modules, strict=True)):
            head_blocks: list[list[torch.Tensor]] = []
            for p in passes:
                with contextlib.ExitStack() as stack:
                    if p.rng_seed is not None:  # sampled targets: reproducible, RNG untouched
                        stack.enter_context(torch.random.fork_rng(devices=self._rng_devices()))
                        torch.manual_seed(p.rng_seed + 7919 * c)
                    if self.compressors[c][0].uses_hooks:
                        outs = self._hooked(model, c, modules, batch, b, p)
                    else:
                        outs = self._full(model, c, batch, payloads, b, p)
                head_blocks.extend(outs)
            if not per_head:
                per_head = [[] for _ in head_blocks]
            for acc, blocks in zip(per_head, head_blocks, strict=True):
                acc.extend(blocks)
        return [torch.cat(blocks, dim=1).float().cpu() for blocks in per_head]

    def _rng_devices(self) -> list[int]:
        if self.device.type == "cuda":
            return [self.device.index or 0]
        return []

    def _hooked(
        self, model: nn.Module, c: int, modules: dict[str, nn.Module], batch: Any, b: int,
        p: _Pass,
    ) -> list[list[torch.Tensor]]:
        """Per head, the blocks of every mask, from hooked inputs and output gradients only; a
        pass with cotangents gives one entry, every cotangent's rows (``[R·B, size]``)."""
        result = []
        with torch.enable_grad(), LayerCapture(modules) as cap:
            out = p.forward(model, batch)
            _check_per_example(out, b, "task.loss" if p.forward != self._logits else "task.logits")
            graph = cap.graph_outputs()
            heads = p.heads
            if p.cotangents is not None:
                cot = p.cotangents(out.detach())
                rows = self._hooked_rows(c, cap, out, graph, b, cot)
                if rows is not None:
                    return [rows]
                heads = [self._cotangent_head(p.cotangents, j) for j in range(cot.shape[0])]
            for i, head in enumerate(heads):
                values = head(out)
                _check_per_example(values, b, "task.loss", finite=False)
                grads = torch.autograd.grad(
                    values.sum(), graph, retain_graph=i + 1 < len(heads), allow_unused=True
                )
                captures = cap.per_layer(list(grads))
                blocks = []
                for comp in self.compressors[c]:
                    blocks.extend(comp.from_captures(captures))
                result.append(blocks)
        return _rows_of(result) if p.cotangents is not None else result

    def _hooked_rows(
        self, c: int, cap: LayerCapture, out: torch.Tensor, graph: list[torch.Tensor], b: int,
        cotangents: torch.Tensor,
    ) -> list[torch.Tensor] | None:
        """The blocks of every mask for cotangents ``[R, B, ...]``, each ``[R·B, size]``
        (cotangent-major), from batched backwards of up to :data:`ROWS_PER_PASS` rows each;
        None when the model's backward cannot be batched (the caller then runs one backward
        per head)."""
        per = max(1, ROWS_PER_PASS // b)
        total = cotangents.shape[0]
        chunks: list[list[torch.Tensor]] = []
        for lo in range(0, total, per):
            v = cotangents[lo : lo + per]
            r = v.shape[0]
            try:
                if r < BATCHED_FROM:  # a few plain backwards: no vmap to pay for
                    each = [torch.autograd.grad(out, graph, grad_outputs=v[j], retain_graph=True,
                                                allow_unused=True) for j in range(r)]
                    grads = tuple(None if parts[0] is None else torch.stack(parts)
                                  for parts in zip(*each, strict=True))
                else:
                    grads = torch.autograd.grad(
                        out, graph, grad_outputs=v, retain_graph=True, allow_unused=True,
                        is_grads_batched=True,
                    )
            except RuntimeError as exc:
                log.info("the model's backward cannot be batched (%s); one per row", exc)
                return None
            # compress a few cotangents at a time: their outer products stay in cache
            step = max(1, COMPRESS_FLOATS // (b * self._width(c)))
            for i in range(0, r, step):
                captures = cap.per_layer([None if g is None else g[i : i + step]
                                          for g in grads], repeats=min(step, r - i))
                blocks = []
                for comp in self.compressors[c]:
                    blocks.extend(comp.from_captures(captures))
                chunks.append(blocks)
        return _stack_chunks(chunks)

    def _width(self, c: int) -> int:
        """Floats checkpoint ``c``'s compressors form per row (before `dropout-sjlt` folds)."""
        return max(1, sum(
            sum(len(v) for v in comp.buckets.values()) if isinstance(comp, SjltCompressor)
            else comp.dim for comp in self.compressors[c]))

    def _full(
        self, model: nn.Module, c: int, batch: Any, payloads: Sequence[dict[str, Any]], b: int,
        p: _Pass,
    ) -> list[list[torch.Tensor]]:
        """Per head, the blocks of every mask, from full per-example gradients (torch.func); a
        pass with cotangents gives one entry, every cotangent's rows (``[R·B, size]``)."""
        result = []
        with torch.no_grad():
            out = p.forward(model, batch)
        _check_per_example(out, b, "task.loss" if p.forward != self._logits else "task.logits")
        heads = p.heads
        if p.cotangents is not None:
            cot = p.cotangents(out)
            rows = self._full_rows(model, c, batch, b, p.forward, cot)
            if rows is not None:
                return [rows]
            heads = [self._cotangent_head(p.cotangents, j) for j in range(cot.shape[0])]
        for head in heads:
            grads = self._per_example_grads(model, c, batch, payloads, p.forward, head)
            blocks = []
            for comp in self.compressors[c]:
                blocks.extend(comp.from_gradients(grads))
            result.append(blocks)
        return _rows_of(result) if p.cotangents is not None else result

    def _full_rows(
        self, model: nn.Module, c: int, batch: Any, b: int, forward: Forward,
        cotangents: torch.Tensor,
    ) -> list[torch.Tensor] | None:
        """The blocks of every mask for cotangents ``[R, B, ...]``, each ``[R·B, size]``, from
        one ``vjp`` per example pulled back along several cotangents at once (``vmap`` over
        both); None when the task's code cannot be vmapped (the caller then runs one head at a
        time)."""
        flat_names = [n for names in self._param_names[c] for n in names]
        named = dict(model.named_parameters())
        params = {n: named[n].detach() for n in flat_names}
        wrapper = _Objective(model, forward)

        def one(attr: dict[str, torch.Tensor], example: Any, v: torch.Tensor) -> Any:
            one_batch = tree_map(
                lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example
            )

            def output(a: dict[str, torch.Tensor]) -> torch.Tensor:
                prefixed = {"model." + n: t for n, t in a.items()}
                value: torch.Tensor = functional_call(wrapper, prefixed, (one_batch,))
                return value[0]

            pull = vjp(output, attr)[1]
            return vmap(pull)(v)[0]

        numel = max(1, sum(ly.numel for ly in self.layers))
        per = max(1, min(ROWS_PER_PASS // b, FULL_FLOATS_PER_PASS // (b * numel)))
        chunks: list[list[torch.Tensor]] = []
        for lo in range(0, cotangents.shape[0], per):
            v = cotangents[lo : lo + per]
            r = v.shape[0]
            try:
                with torch.no_grad():
                    per_ex = vmap(one, in_dims=(None, 0, 1), randomness="different")(
                        params, batch, v)
            except Exception as exc:  # noqa: BLE001 - any vmap failure: one head at a time
                log.info("vmap over the task's logits failed (%s); one row at a time", exc)
                return None
            # [B, R, ...] → [R·B, ...], row-major in the cotangent
            grads = self._assemble(c, {
                n: t.transpose(0, 1).reshape(r * b, *t.shape[2:]) for n, t in per_ex.items()
            })
            blocks = []
            for comp in self.compressors[c]:
                blocks.extend(comp.from_gradients(grads))
            chunks.append(blocks)
        return _stack_chunks(chunks)

    @staticmethod
    def _layer_params(model: nn.Module, modules: dict[str, nn.Module]) -> list[list[str]]:
        """Full parameter names of each attributed layer, in the layer's gradient layout."""
        where = {id(m): name for name, m in model.named_modules()}
        names = []
        for name, module in modules.items():
            if id(module) not in where:
                raise TaskError(f"attributed module {name!r} is not a submodule of the model")
            prefix = where[id(module)] + "." if where[id(module)] else ""
            if is_linear(module):
                own = ["weight"] + (["bias"] if module.bias is not None and
                                    module.bias.requires_grad else [])
            else:
                own = [n for n, q in module.named_parameters() if q.requires_grad]
            names.append([prefix + n for n in own])
        return names

    def _per_example_grads(
        self, model: nn.Module, c: int, batch: Any, payloads: Sequence[dict[str, Any]],
        forward: Forward, head: Head,
    ) -> dict[str, torch.Tensor]:
        """Each layer's full per-example gradient ``[B, numel]`` via ``vmap(grad(...))``.

        Falls back to a loop over single-example batches when the task's code cannot be
        vmapped (data-dependent control flow, non-tensor batch leaves).
        """
        flat_names = [n for names in self._param_names[c] for n in names]
        named = dict(model.named_parameters())
        params = {n: named[n].detach() for n in flat_names}

        wrapper = _Objective(model, lambda m, batch_: head(forward(m, batch_)))

        def one(attr: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            one_batch = tree_map(
                lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example
            )
            prefixed = {"model." + n: t for n, t in attr.items()}
            value: torch.Tensor = functional_call(wrapper, prefixed, (one_batch,))
            return value[0]

        try:
            # grad() ignores an outer no_grad, which here keeps the outer autograd from
            # recording the per-example gradients through the model's other parameters
            with torch.no_grad():
                per = vmap(grad(one), in_dims=(None, 0), randomness="different")(params, batch)
        except Exception as exc:  # noqa: BLE001 - any vmap failure means: do it one by one
            log.info("vmap over the task's loss failed (%s); looping over examples", exc)
            per = self._looped_grads(model, payloads, forward, head, flat_names)
        return self._assemble(c, per)

    def _looped_grads(
        self, model: nn.Module, payloads: Sequence[dict[str, Any]], forward: Forward, head: Head,
        names: list[str],
    ) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        tensors = [named[n] for n in names]
        rows: list[tuple[torch.Tensor, ...]] = []
        for payload in payloads:
            one_batch = self.collate([payload])
            with torch.enable_grad():
                value = head(forward(model, one_batch))[0]
                rows.append(torch.autograd.grad(value, tensors, allow_unused=True))
        out = {}
        for j, n in enumerate(names):
            out[n] = torch.stack(
                [r[j] if r[j] is not None else torch.zeros_like(tensors[j]) for r in rows]
            )
        return out

    def _assemble(self, c: int, per: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grads = {}
        for layer, names in zip(self.layers, self._param_names[c], strict=True):
            parts = [per[n] for n in names]
            b = parts[0].shape[0]
            if layer.linear:
                w = (parts[0].reshape(b, layer.d_in, layer.rows).transpose(1, 2)
                     if layer.transposed else parts[0].reshape(b, layer.rows, -1))
                if layer.bias:
                    w = torch.cat([w, parts[1].reshape(b, layer.rows, 1)], dim=2)
                grads[layer.name] = w.reshape(b, -1)
            else:
                grads[layer.name] = torch.cat([q.reshape(b, -1) for q in parts], dim=1)
        return grads


def expected_cotangents(logits: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """``[B, C]`` logits → ``[R, B, C]`` output cotangents of the expected Fisher's rows.

    The softmax cross-entropy's Hessian in the logits, ``H = diag(p) - p pᵀ``, is the sum of
    the outer products of ``v_c = -√p_c (e_c - p)`` (the gradient of ``-√p_c log p_c``, √p_c
    held fixed; :meth:`Featurizer._class_head` differentiates one class at a time), so the
    rows ``Jᵀ v_c`` over the classes give the GGN exactly (Martens 2014, §9). With ``rank``
    below ``C`` the rows are instead ``Jᵀ √λ_j u_j`` for H's top eigenpairs: the
    best rank-``rank`` approximation of each example's H (on the digits models 2 directions
    hold 83-89% of its trace, 4 hold 95-98%).
    """
    p = torch.softmax(logits.detach().float(), dim=-1)
    c = p.shape[1]
    if rank is None or rank >= c:
        eye = torch.eye(c, dtype=p.dtype, device=p.device)
        v = -p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])
    else:
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        vals, vecs = torch.linalg.eigh(h.double())  # ascending
        top = vals[:, -rank:].clamp(min=0).sqrt()[:, None, :] * vecs[:, :, -rank:]
        v = top.permute(2, 0, 1).flip(0).to(p.dtype)  # [R, B, C], largest first
    return v.to(logits.dtype)


def _stack_chunks(chunks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each block's rows of every chunk, in order (no copy for a single chunk)."""
    if len(chunks) == 1:
        return chunks[0]
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def _rows_of(per_head: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Blocks of several heads ``[B, size]`` as the one ``[R·B, size]`` entry a batched
    pass returns."""
    return [_stack_chunks(per_head)]


class _Objective(nn.Module):
    """Wraps ``fn(model, batch)`` so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


class FisherBatcher:
    """Fisher rows of a bounded Fisher's subset, featurized in full batches of members.

    The subset's members, in position order, are grouped ``batch_size`` at a time; a group is
    featurized once its last member has been seen, by whoever owns that member (the shard whose
    batch holds it, if that batch is not staged yet). The groups depend on the subset alone, so
    the rows come out the same in one process, across shards and in a resumed build, and each
    model pass is a full batch (members featurized batch by batch, a few at a time, cost 2-4×
    as much: measured on the MNIST MLP).

    Args:
        featurizer: computes the rows.
        plan: the Fisher plan; its ``members()`` must not be None (a subset).
        claims: whether this process featurizes the group whose last member sits at a position.
    """

    def __init__(self, featurizer: Featurizer, plan: FisherPlan,
                 claims: Callable[[int], bool] = lambda position: True) -> None:
        members = plan.members()
        if members is None:
            raise ValueError("a FisherBatcher needs a Fisher subset")
        self.featurizer = featurizer
        self.plan = plan
        self.members = members
        self.order = np.flatnonzero(members)
        self.batch_size = featurizer.config.batch_size
        self.claims = claims
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.ready: list[tuple[list[int], np.ndarray]] = []

    def last_of(self, position: int) -> int:
        """The position of the last member of ``position``'s group."""
        rank = int(np.searchsorted(self.order, position))
        group_end = min((rank // self.batch_size + 1) * self.batch_size, len(self.order))
        return int(self.order[group_end - 1])

    def see(self, position: int, payload: dict[str, Any]) -> None:
        """Every streamed example, in position order (every shard's): keeps the members of
        groups this process featurizes, and featurizes a group at its last member."""
        if position >= len(self.members) or not self.members[position]:
            return
        last = self.last_of(position)
        if not self.claims(last):
            return
        self.pending.append((position, payload))
        if position == last:
            rows = self.featurizer.fisher_rows([p for _, p in self.pending], self.plan)
            self.ready.append(([pos for pos, _ in self.pending], rows.numpy()))
            self.pending = []

    def take(self) -> tuple[np.ndarray, list[int]]:
        """The rows ``[F, R, dim]`` of the groups completed since the last call, and their
        positions."""
        ready, self.ready = self.ready, []
        if not ready:
            empty = np.zeros((0, self.plan.rows_per_example, self.featurizer.dim),
                             dtype=np.float32)
            return empty, []
        return (np.concatenate([rows for _, rows in ready]),
                [pos for positions, _ in ready for pos in positions])


def batch_fisher_rows(
    featurizer: Featurizer, plan: FisherPlan, payloads: list[dict[str, Any]],
) -> tuple[np.ndarray | None, int]:
    """The Fisher rows ``[B, R, dim]`` of a batch whose every example is in the Fisher (no
    subset); ``None`` for the ``empirical`` Fisher (its rows are the raw gradients)."""
    if plan.kind == "empirical":
        return None, 0
    # example-major and contiguous here, a batch at a time: a chunk then concatenates and
    # saves its rows without another copy
    return featurizer.fisher_rows(payloads, plan).contiguous().numpy(), len(payloads)


def featurize(
    featurizer: Featurizer,
    payloads: Sequence[dict[str, Any]],
    *,
    preconditioner: Any | None = None,
) -> torch.Tensor:
    """Payloads → query vectors (no preconditioner) or index vectors ``(F̃+λI)⁻¹ g̃``.

    Args:
        featurizer: the task's featurizer (models and masks).
        payloads: JSON payloads the task's ``collate`` accepts.
        preconditioner: a fitted :class:`.precondition.Preconditioner` for index vectors.

    Returns:
        ``[B, dim]`` float32 tensor on cpu.
    """
    if preconditioner is None:
        return featurizer.query(payloads)
    result: torch.Tensor = preconditioner.apply(featurizer.raw(payloads))
    return result
