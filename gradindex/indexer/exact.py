"""Exact influence for models small enough for a dense Hessian: the reference that judges
every approximation.

``score(z, z_i) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(z_i)`` (Koh & Liang 2017, with the sign flipped so that a
positive score marks a proponent), where ``H`` is either the exact Hessian of the mean training
loss (plus the model's L2 penalty) or its Gauss-Newton matrix ``(1/n) Σ Jᵢᵀ Hₒᵤₜ Jᵢ``, which for
softmax cross-entropy equals the expected Fisher. Parameters are those of the task's attributed
linear layers, laid out as the compressors lay them out (``[d_out, d_in + bias]`` per layer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap
from torch.utils._pytree import tree_map

from .compress import Layer, describe_layers
from .errors import ConfigError, GradindexError, TaskError
from .featurize import _Objective
from .task import Task, TaskAdapter

__all__ = ["ExactInfluence"]

CURVATURES = ("hessian", "ggn")


class ExactInfluence:
    """Dense, float64 influence of training examples on queries.

    Args:
        task: the task; its attributed modules must be linear layers.
        train: training payloads, in index order.
        curvature: ``hessian`` or ``ggn`` (needs ``task.logits``).
        damping: absolute λ added to the curvature's diagonal.
        l2: the L2 penalty coefficient the model was trained with, added to the curvature.
        checkpoint: which of the task's checkpoints to use.
    """

    def __init__(
        self,
        task: Task,
        train: Sequence[dict[str, Any]],
        *,
        curvature: str = "hessian",
        damping: float = 0.0,
        l2: float = 0.0,
        checkpoint: str | None = None,
        chunk: int = 256,
    ) -> None:
        if curvature not in CURVATURES:
            raise ConfigError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
        self.task = TaskAdapter.of(task)
        self.model = copy.deepcopy(self.task.model(checkpoint)).double()  # never alter the task's
        modules = self.task.modules(self.model)
        self.layers: list[Layer] = describe_layers(modules)
        if not all(layer.linear and not layer.transposed for layer in self.layers):
            raise ConfigError("exact influence supports nn.Linear attributed layers only "
                              "(not other modules, nor transformers' Conv1D)")
        where = {id(m): n for n, m in self.model.named_modules()}
        self.prefixes = [where[id(m)] for m in modules.values()]
        self.theta = torch.cat([self._flat_layer(modules[ly.name], ly) for ly in self.layers])
        self.chunk = chunk
        self.train_grads = self.gradients(train)
        if curvature == "hessian":
            curv = self._hessian(train)
        else:
            curv = self._ggn(train)
        d = self.theta.numel()
        self.curvature = curv + (l2 + damping) * torch.eye(d, dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(self.curvature)
        if int(info) != 0:
            raise GradindexError(
                f"the {curvature} plus λ = {l2 + damping:.3g} is not positive definite (a "
                "non-convex loss, or a model away from its optimum); raise `damping` or use "
                "curvature='ggn'"
            )
        self.factor = factor
        self.train_vectors = torch.cholesky_solve(self.train_grads.T, self.factor).T

    @staticmethod
    def _flat_layer(module: nn.Module, layer: Layer) -> torch.Tensor:
        assert isinstance(module, nn.Linear)
        w = module.weight.detach()
        if layer.bias:
            assert module.bias is not None
            w = torch.cat([w, module.bias.detach()[:, None]], dim=1)
        return w.reshape(-1)

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for layer, prefix in zip(self.layers, self.prefixes, strict=True):
            mat = theta[offset : offset + layer.numel].reshape(layer.rows, layer.cols)
            offset += layer.numel
            dot = prefix + "." if prefix else ""
            out[dot + "weight"] = mat[:, : layer.d_in]
            if layer.bias:
                out[dot + "bias"] = mat[:, layer.d_in]
        return out

    def _call(self, fn: Callable[[nn.Module, Any], torch.Tensor], theta: torch.Tensor,
              batch: Any) -> torch.Tensor:
        params = {"model." + k: v for k, v in self._params(theta).items()}
        result: torch.Tensor = functional_call(_Objective(self.model, fn), params, (batch,))
        return result

    def _batches(self, payloads: Sequence[dict[str, Any]]) -> list[Any]:
        out = []
        for start in range(0, len(payloads), self.chunk):
            batch = self.task.collate(list(payloads[start : start + self.chunk]))
            out.append(tree_map(
                lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t, batch))
        return out

    def gradients(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Exact per-example loss gradients ``[B, d]`` (float64)."""
        rows = []
        for batch in self._batches(payloads):
            def one(theta: torch.Tensor, example: Any) -> torch.Tensor:
                b1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t,
                              example)
                return self._call(self.task.loss, theta, b1)[0]

            rows.append(vmap(torch.func.grad(one), in_dims=(None, 0))(self.theta, batch))
        return torch.cat(rows)

    def _hessian(self, train: Sequence[dict[str, Any]]) -> torch.Tensor:
        n = len(train)
        total = torch.zeros(self.theta.numel(), self.theta.numel(), dtype=torch.float64)
        for batch in self._batches(train):
            def summed(theta: torch.Tensor, b: Any = batch) -> torch.Tensor:
                return self._call(self.task.loss, theta, b).sum()

            total += hessian(summed)(self.theta)
        return total / n

    def _ggn(self, train: Sequence[dict[str, Any]]) -> torch.Tensor:
        if not self.task.has_logits:
            raise TaskError("the Gauss-Newton curvature needs task.logits(model, batch)")
        logits_fn = self.task.logits
        n = len(train)
        total = torch.zeros(self.theta.numel(), self.theta.numel(), dtype=torch.float64)
        for batch in self._batches(train):
            def one(theta: torch.Tensor, example: Any) -> torch.Tensor:
                b1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t,
                              example)
                return self._call(logits_fn, theta, b1)[0]

            jac = vmap(jacrev(one), in_dims=(None, 0))(self.theta, batch)  # [B, C, d]
            with torch.no_grad():
                p = torch.softmax(self._call(logits_fn, self.theta, batch), dim=-1)  # [B, C]
            h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            total += torch.einsum("bcd,bce,bef->df", jac, h_out, jac)
        return total / n

    def scores(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Influence of every training example on each query: ``[Q, N]`` float64."""
        return self.gradients(payloads) @ self.train_vectors.T

    def self_influence(self) -> torch.Tensor:
        """``∇ℓ_iᵀ (H+λI)⁻¹ ∇ℓ_i`` per training example, ``[N]``."""
        return (self.train_grads * self.train_vectors).sum(dim=1)
