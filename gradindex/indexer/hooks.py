"""Forward hooks that capture each attributed layer's inputs and outputs for one pass.

The outputs stay in the autograd graph so the featurizer can differentiate the loss with respect
to them alone (never the weights); inputs are detached. A module called several times in one
forward (weight sharing) keeps every call, and their per-example gradients add up.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import TaskError

__all__ = ["LayerCapture"]


class LayerCapture:
    """Context manager: hook ``modules``, record ``(input, output)`` per call, unhook on exit.

    Attributes:
        inputs: layer name → list of detached inputs, each ``[B, ..., D_in]``.
        outputs: layer name → list of outputs still in the graph, each ``[B, ..., D_out]``.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        self.clear()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.inputs = {name: [] for name in self.modules}
        self.outputs = {name: [] for name in self.modules}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise TaskError(f"layer {name!r} was called without a tensor input")
            if not isinstance(output, torch.Tensor):
                raise TaskError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            x = args[0]
            if x.dim() < 2 or output.shape[:-1] != x.shape[:-1]:
                raise TaskError(
                    f"layer {name!r}: expected input [B, ..., D_in] and output [B, ..., D_out] "
                    f"with equal leading dims, got {tuple(x.shape)} and {tuple(output.shape)}"
                )
            self.inputs[name].append(x.detach())
            self.outputs[name].append(output)

        return hook

    def graph_outputs(self) -> list[torch.Tensor]:
        """Every recorded output in a flat, stable order (layer order, then call order)."""
        return [out for name in self.modules for out in self.outputs[name]]

    def per_layer(
        self, grads: list[torch.Tensor | None], repeats: int = 1
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Pair the gradients of :meth:`graph_outputs` with their inputs, by layer.

        Args:
            grads: gradients of the loss w.r.t. :meth:`graph_outputs`, same order; ``None``
                (an output the loss does not depend on) becomes zeros. With ``repeats`` > 1,
                ``repeats`` batched gradients of each output, ``[repeats, B, ...]``.
            repeats: how many gradients each output has; each layer's inputs are repeated as
                many times to pair with them.

        Returns:
            layer name → list of ``(x [R·B, N, D_in], delta [R·B, N, D_out])`` (R =
            ``repeats``, gradient-major), token dims flattened into ``N``.
        """
        result: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        it = iter(grads)
        for name in self.modules:
            pairs = []
            for x, out in zip(self.inputs[name], self.outputs[name], strict=True):
                g = next(it)
                delta = out.new_zeros(repeats, *out.shape) if g is None else g.detach()
                b = x.shape[0]
                x3 = x.reshape(b, -1, x.shape[-1])
                if repeats > 1:
                    x3 = x3.unsqueeze(0).expand(repeats, *x3.shape).reshape(
                        repeats * b, *x3.shape[1:])
                pairs.append((x3, delta.reshape(repeats * b, -1, out.shape[-1])))
            result[name] = pairs
        return result
