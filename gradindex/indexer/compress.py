"""Compressors: how a per-example gradient becomes a short vector (C in DESIGN §1).

Each compressor is a small class registered under the name users type. One instance covers one
(checkpoint, mask) pair and draws its masks from :mod:`.masks`, so it is a pure function
of its settings. Two families:

* hook compressors (``uses_hooks = True``) work from each linear layer's captured inputs ``x``
  and output gradients ``δ`` and never form the full per-example gradient;
* full-gradient compressors work from per-example gradients ``[B, numel]`` of each layer.

A layer's full gradient is laid out as a ``[rows, cols]`` matrix flattened row-major: for a
linear layer ``rows = d_out`` and ``cols = d_in (+1 for the bias, as a last column)``; any other
module is one row of its trainable parameters concatenated. A linear layer is an ``nn.Linear``
or a ``transformers`` ``Conv1D`` (GPT-2's, weight stored transposed as ``[d_in, d_out]``): both
map each token's ``x`` to ``W x + b``, so both share this layout and the factorized path.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import CompressionConfig
from .errors import ConfigError, TaskError
from .masks import mask_generator, sample_indices, split_keep
from .registry import COMPRESSORS, register_compressor

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "DropoutCompressor",
    "FactorizedDropoutCompressor",
    "GaussianCompressor",
    "Layer",
    "SjltCompressor",
    "describe_layers",
    "is_conv1d",
    "is_linear",
    "register_compressor",
    "select_modules",
]

Captures = Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]
"""layer name → list of ``(x [B, N, D_in], delta [B, N, D_out])``, one per call of the layer."""


@dataclass(frozen=True)
class Layer:
    """An attributed module's gradient shape."""

    name: str
    rows: int
    cols: int
    linear: bool
    bias: bool
    transposed: bool = False
    """The weight is stored ``[d_in, d_out]`` (a ``transformers`` ``Conv1D``)."""

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def d_in(self) -> int:
        return self.cols - int(self.bias)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (checked without importing
    transformers: when it is not loaded, no module can be one)."""
    hf = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(hf, "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a ``transformers`` ``Conv1D``: what the factorized path handles."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def select_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` whose names match any of ``patterns`` (``fnmatch``: ``*``
    matches dots too) and that hold a trainable parameter of their own.

    Raises:
        ConfigError: no module matches.
    """
    found = {
        name: module
        for name, module in model.named_modules()
        if name
        and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    }
    if not found:
        names = [n for n, m in model.named_modules()
                 if n and any(p.requires_grad for p in m.parameters(recurse=False))]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"`modules` patterns {list(patterns)} match no module with a trainable parameter; "
            f"the model's are named like: {shown or 'none'}"
        )
    return found


def describe_layers(modules: Mapping[str, nn.Module]) -> list[Layer]:
    """The gradient shape of each attributed module, in order."""
    layers = []
    for name, module in modules.items():
        if is_linear(module):
            weight = module.weight
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise TaskError(f"linear layer {name!r} has no 2-d weight")
            if not weight.requires_grad:
                raise TaskError(f"linear layer {name!r} has a frozen weight; do not attribute it")
            bias_p = module.bias
            bias = isinstance(bias_p, torch.Tensor) and bias_p.requires_grad
            transposed = not isinstance(module, nn.Linear)
            d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
            layers.append(Layer(name, int(d_out), int(d_in) + bias, True, bias, transposed))
        else:
            numel = sum(p.numel() for p in module.parameters() if p.requires_grad)
            layers.append(Layer(name, 1, numel, False, False))
    return layers


class Compressor:
    """One (checkpoint, mask) instance of a compression strategy.

    Attributes:
        blocks: ``(block name, size)`` in output order; the preconditioner's ``block`` shape
            gives each its own matrix.
    """

    name: ClassVar[str]
    uses_hooks: ClassVar[bool]
    exact_at_full_keep: ClassVar[bool] = True
    """At keep = 1 every mask keeps everything, so several masks would be identical copies."""

    def __init__(
        self,
        layers: Sequence[Layer],
        keep: float,
        config: CompressionConfig,
        *,
        checkpoint: int = 0,
        mask: int = 0,
    ) -> None:
        self.layers = list(layers)
        self.keep = keep
        self.config = config
        self.checkpoint = checkpoint
        self.mask = mask
        self.blocks: list[tuple[str, int]] = []

    def _gen(self, layer: Layer, purpose: str, keep: float | None = None) -> torch.Generator:
        return mask_generator(
            seed=self.config.seed,
            checkpoint=self.checkpoint,
            mask=self.mask,
            layer=layer.name,
            shape=(layer.rows, layer.cols),
            keep=self.keep if keep is None else keep,
            purpose=purpose,
        )

    @property
    def dim(self) -> int:
        return sum(size for _, size in self.blocks)

    def from_captures(self, captures: Captures) -> list[torch.Tensor]:
        """Compressed blocks ``[B, size]`` from captured inputs and output gradients."""
        raise NotImplementedError

    def from_gradients(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Compressed blocks ``[B, size]`` from full per-example gradients ``[B, numel]``."""
        raise NotImplementedError


def _layer_k(layer: Layer, keep: float) -> int:
    return max(1, min(layer.numel, round(keep * layer.numel)))


def _require_linear(layers: Sequence[Layer], compressor: str) -> None:
    for layer in layers:
        if not layer.linear:
            raise ConfigError(
                f"compressor {compressor!r} handles linear layers only (nn.Linear, transformers' "
                f"Conv1D), and {layer.name!r} is not one; use `dropout` (any parameter) or "
                "attribute linear layers only"
            )


class _OnDevice:
    """Copies of a compressor's index tensors per device, made once instead of every call."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, key: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        found = self._cache.get((key, device))
        if found is None:
            found = self._cache[(key, device)] = tensor.to(device)
        return found


@dataclass(frozen=True)
class _FactorPlan:
    """What one layer's factorized mask selects, decided once at construction."""

    rows: torch.Tensor
    in_cols: torch.Tensor
    bias_col: bool
    full_rows: bool
    full_in: bool


def _factor_plan(layer: Layer, rows: torch.Tensor, cols: torch.Tensor) -> _FactorPlan:
    in_cols = cols[cols < layer.d_in]
    return _FactorPlan(
        rows=rows,
        in_cols=in_cols,
        bias_col=layer.bias and bool((cols == layer.d_in).any()),
        full_rows=len(rows) == layer.rows,
        full_in=len(in_cols) == layer.d_in,
    )


def _factorized_block(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    layer: Layer,
    plan: _FactorPlan,
    on_device: _OnDevice,
) -> torch.Tensor:
    """``Σ_t δ_t[rows] x1_t[cols]ᵀ`` per example, flattened: ``[B, k_out·k_in]``.

    ``x1`` is the input with a constant 1 appended for the bias; the bias column is drawn
    like any other input column.
    """
    out: torch.Tensor | None = None
    for x, delta in pairs:
        dev = delta.device
        d = delta if plan.full_rows else delta.index_select(
            -1, on_device.get(layer.name + ":rows", plan.rows, dev))
        xs = x if plan.full_in else x.index_select(
            -1, on_device.get(layer.name + ":cols", plan.in_cols, dev))
        xs = xs.to(d.dtype)
        if plan.bias_col:
            xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)
        if d.shape[1] == 1:  # one token: an outer product, cheaper than a batched matmul
            term = d[:, 0, :, None] * xs[:, 0, None, :]
        else:
            term = torch.bmm(d.transpose(1, 2), xs)  # [B, k_out, k_in]
        out = term if out is None else out + term
    if out is None:
        raise TaskError(f"layer {layer.name!r} was never called by the task's loss")
    return out.reshape(out.shape[0], -1)


@register_compressor
class FactorizedDropoutCompressor(Compressor):
    """Keep ``k_out`` output rows and ``k_in`` input columns of each linear layer's gradient.

    The kept block ``Σ_t δ_t[rows] x_t[cols]ᵀ`` is computed straight from hooks: the full
    per-example gradient is never formed and weight gradients are never computed.
    """

    name = "factorized-dropout"
    uses_hooks = True

    def __init__(
        self,
        layers: Sequence[Layer],
        keep: float,
        config: CompressionConfig,
        *,
        checkpoint: int = 0,
        mask: int = 0,
    ) -> None:
        super().__init__(layers, keep, config, checkpoint=checkpoint, mask=mask)
        _require_linear(layers, self.name)
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self._plans: dict[str, _FactorPlan] = {}
        self._on_device = _OnDevice()
        for layer in self.layers:
            k_out, k_in = split_keep(layer.rows, layer.cols, keep)
            gen = self._gen(layer, "factorized")
            self.rows[layer.name] = sample_indices(layer.rows, k_out, gen)
            self.cols[layer.name] = sample_indices(layer.cols, k_in, gen)
            self._plans[layer.name] = _factor_plan(layer, self.rows[layer.name],
                                                   self.cols[layer.name])
            self.blocks.append((layer.name, k_out * k_in))

    def coordinates(self, layer: str) -> torch.Tensor:
        """The flat coordinates this mask keeps in the layer's ``[rows, cols]`` gradient."""
        spec = next(ly for ly in self.layers if ly.name == layer)
        return (self.rows[layer][:, None] * spec.cols + self.cols[layer][None, :]).reshape(-1)

    def from_captures(self, captures: Captures) -> list[torch.Tensor]:
        return [
            _factorized_block(captures[ly.name], ly, self._plans[ly.name], self._on_device)
            for ly in self.layers
        ]


@register_compressor
class DropoutCompressor(Compressor):
    """A flat random coordinate mask on each layer's full per-example gradient.

    Works for any parameter, at the cost of forming full per-example gradients
    (``torch.func.vmap(grad(...))``). The reference the factorized path is checked against.
    """

    name = "dropout"
    uses_hooks = False

    def __init__(
        self,
        layers: Sequence[Layer],
        keep: float,
        config: CompressionConfig,
        *,
        checkpoint: int = 0,
        mask: int = 0,
        coordinates: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(layers, keep, config, checkpoint=checkpoint, mask=mask)
        self._on_device = _OnDevice()
        self.coords: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if coordinates is not None:
                idx = torch.as_tensor(coordinates[layer.name], dtype=torch.long)
            else:
                idx = sample_indices(layer.numel, _layer_k(layer, keep), self._gen(layer, "flat"))
            self.coords[layer.name] = idx
            self.blocks.append((layer.name, len(idx)))

    def from_gradients(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [
            grads[ly.name].index_select(
                1, self._on_device.get(ly.name, self.coords[ly.name], grads[ly.name].device))
            for ly in self.layers
        ]


@register_compressor
class SjltCompressor(FactorizedDropoutCompressor):
    """Factorized mask to ``sjlt_expand``·k coordinates, then a sparse JL transform down to k.

    Each kept coordinate is added, with a random sign, to one of k buckets (one ±1 per input
    coordinate): the cost stays in the masking class while more of the gradient is seen.
    """

    name = "dropout-sjlt"
    uses_hooks = True

    def __init__(
        self,
        layers: Sequence[Layer],
        keep: float,
        config: CompressionConfig,
        *,
        checkpoint: int = 0,
        mask: int = 0,
    ) -> None:
        wide = min(1.0, keep * config.sjlt_expand)
        super().__init__(layers, wide, config, checkpoint=checkpoint, mask=mask)
        self.keep = keep
        self.buckets: dict[str, torch.Tensor] = {}
        self.signs: dict[str, torch.Tensor] = {}
        blocks = []
        for layer, (_, wide_k) in zip(self.layers, self.blocks, strict=True):
            k = min(_layer_k(layer, keep), wide_k)
            if k == wide_k:  # nothing to fold: the kept coordinates pass through unchanged
                self.buckets[layer.name] = torch.arange(k)
                self.signs[layer.name] = torch.ones(k)
            else:
                gen = self._gen(layer, "sjlt")
                self.buckets[layer.name] = torch.randint(0, k, (wide_k,), generator=gen)
                self.signs[layer.name] = torch.randint(0, 2, (wide_k,), generator=gen) * 2.0 - 1.0
            blocks.append((layer.name, k))
        self.blocks = blocks

    def from_captures(self, captures: Captures) -> list[torch.Tensor]:
        wide = super().from_captures(captures)
        out = []
        for (name, k), v in zip(self.blocks, wide, strict=True):
            signs = self._on_device.get(name + ":signs", self.signs[name], v.device)
            buckets = self._on_device.get(name + ":buckets", self.buckets[name], v.device)
            folded = v.new_zeros(v.shape[0], k)
            folded.index_add_(1, buckets, v * signs.to(v.dtype))
            out.append(folded)
        return out


@register_compressor
class GaussianCompressor(Compressor):
    """A dense Gaussian projection of the whole gradient (TRAK's). A baseline for benchmarks.

    The ``[d, k]`` matrix never exists whole: it is generated in seeded row chunks of
    ``CHUNK`` rows on every call, as TRAK's CPU projector does.
    """

    name = "gaussian"
    uses_hooks = False
    exact_at_full_keep = False
    CHUNK = 4096

    def __init__(
        self,
        layers: Sequence[Layer],
        keep: float,
        config: CompressionConfig,
        *,
        checkpoint: int = 0,
        mask: int = 0,
    ) -> None:
        super().__init__(layers, keep, config, checkpoint=checkpoint, mask=mask)
        self.total = sum(ly.numel for ly in self.layers)
        self.k = max(1, round(keep * self.total))
        self.blocks = [("gaussian", self.k)]
        self._anchor = Layer("gaussian", 1, self.total, False, False)

    def from_gradients(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([grads[ly.name] for ly in self.layers], dim=1)
        out = flat.new_zeros(flat.shape[0], self.k)
        scale = 1.0 / math.sqrt(self.k)
        for i, start in enumerate(range(0, self.total, self.CHUNK)):
            stop = min(start + self.CHUNK, self.total)
            gen = self._gen(self._anchor, f"gaussian-chunk-{i}")
            proj = torch.randn(stop - start, self.k, generator=gen).to(flat.device, flat.dtype)
            out.addmm_(flat[:, start:stop], proj, alpha=scale)
        return [out]
