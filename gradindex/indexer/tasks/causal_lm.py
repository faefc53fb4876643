"""A Hugging Face causal language model from a local checkpoint directory, as a task.

Payloads are ``{"prompt": str, "completion": str}`` (the loss is the mean negative
log-likelihood of the completion's tokens given the prompt) or ``{"text": str}`` (every token
after the first). Other scalar fields of a payload are its metadata, what filters match on.

Tokenization and the context rule: the prompt is tokenized with the tokenizer's special tokens
(a BOS where the tokenizer adds one), the completion without, and the two are concatenated, so
the boundary between them is exact. An empty prompt becomes the BOS token (refused when the
tokenizer has none). A sequence longer than the context loses prompt tokens from the left; a
completion that does not fit with at least one prompt token before it is refused, and so is a
``text`` longer than the context (cut it into pieces before indexing).

Attributed modules: every linear map of the transformer blocks (``nn.Linear`` and GPT-2's
``Conv1D``); the input embeddings and the LM head are left out (see :meth:`CausalLMTask.modules`).
For a PEFT model (``adapter=``), only the LoRA matrices ``lora_A`` and ``lora_B``.

``transformers`` (and ``peft`` for adapters, ``datasets`` for saved datasets) are imported
lazily: ``pip install 'gradindex[hf]'``. Nothing is ever downloaded (``local_files_only``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import is_linear
from ..errors import TaskError

__all__ = ["CausalLMTask", "require_hf"]

IGNORE = -100
"""Target of a position that carries no loss (prompt, padding, the last token)."""

TEXT_KEYS = ("prompt", "completion", "text")


def require_hf(module: str) -> Any:
    """Import an optional Hugging Face module, or say how to install it.

    Raises:
        TaskError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TaskError(
            f"the language-model task needs `{module.split('.')[0]}`, which is not installed: "
            "pip install 'gradindex[hf]'"
        ) from exc


def _local_dir(path: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TaskError(f"{what} {path!r} is not a local directory (gradindex never downloads "
                        "a model: pass the folder written by save_pretrained)")
    return folder.resolve()


class CausalLMTask:
    """Built-in task: a causal LM from a local ``save_pretrained`` directory.

    Args:
        model: the checkpoint directory (config, weights; the tokenizer too unless
            ``tokenizer`` is given). With ``adapter``, the base model.
        data: training examples: a JSONL file (one payload per line; an ``"id"`` field names
            the example, else its line number) or a ``datasets`` dataset saved with
            ``save_to_disk`` (a ``DatasetDict`` reads ``split``).
        adapter: a PEFT adapter directory (``save_pretrained`` of a ``PeftModel``) on top of
            ``model``; then only its LoRA matrices are attributed.
        tokenizer: tokenizer directory (default: ``model``).
        queries: held-out examples for the web page's gallery (JSONL or saved dataset).
        split: the split of a saved ``DatasetDict``.
        max_length: context in tokens (default: the model's ``n_positions`` or
            ``max_position_embeddings``).
        padding_side: ``right`` or ``left``; vectors do not depend on it.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
    """

    def __init__(
        self,
        model: str,
        data: str | None = None,
        *,
        adapter: str | None = None,
        tokenizer: str | None = None,
        queries: str | None = None,
        split: str = "train",
        max_length: int | None = None,
        padding_side: str = "right",
        dtype: str = "float32",
    ) -> None:
        transformers = require_hf("transformers")
        self.model_dir = _local_dir(model, "model")
        self.adapter_dir = _local_dir(adapter, "adapter") if adapter is not None else None
        if self.adapter_dir is not None:
            require_hf("peft")
        self.data = data
        self.queries_path = queries
        self.split = split
        if padding_side not in ("right", "left"):
            raise TaskError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = padding_side
        if dtype not in ("float32", "bfloat16", "float16"):
            raise TaskError(f"`dtype` must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        tok_dir = _local_dir(tokenizer, "tokenizer") if tokenizer else self.model_dir
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(tok_dir), local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(str(self.model_dir),
                                                         local_files_only=True)
        context = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None)
        self.max_length = int(max_length or context or 1024)
        if self.max_length < 2:
            raise TaskError(f"`max_length` must be at least 2, got {self.max_length}")
        self.bos = self.tokenizer.bos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._model: nn.Module | None = None
        self._count: int | None = None

    # ------------------------------------------------------------------ model

    def model(self) -> nn.Module:
        """The model (cached), in eval mode; with an adapter, its LoRA weights trainable."""
        if self._model is None:
            transformers = require_hf("transformers")
            bars = transformers.utils.logging
            shown = bars.is_progress_bar_enabled()
            bars.disable_progress_bar()  # a loading bar per model: noise in builds and servers
            try:
                net = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), local_files_only=True, dtype=self.dtype)
            finally:
                if shown:
                    bars.enable_progress_bar()
            if self.adapter_dir is not None:
                peft = require_hf("peft")
                net = peft.PeftModel.from_pretrained(net, str(self.adapter_dir),
                                                     is_trainable=True)
            self._model = net.eval()
        return self._model

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """What is attributed by default.

        A PEFT model: its LoRA matrices (``lora_A``, ``lora_B``) only, the weights that
        fine-tuning changed. Otherwise every linear map (``nn.Linear``, ``Conv1D``) with a
        trainable weight except the input embeddings and the LM head: an embedding is a lookup
        table (not a linear map over token inputs, so not factorizable), and the head's
        gradient is vocabulary-sized (d × V: 38M coordinates for GPT-2) and mostly says which
        tokens occur, which word overlap already tells. ``--modules`` patterns override this.
        """
        if getattr(model, "peft_config", None) is not None:
            found: dict[str, nn.Module] = {
                name: m for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and m.weight.requires_grad
                and any(part in (f".{name}.") for part in (".lora_A.", ".lora_B."))
            }
            if not found:
                raise TaskError("the adapter has no trainable lora_A/lora_B matrix to attribute")
            return found
        skip: set[int] = set()
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        for getter in (get_in, get_out):
            emb = getter() if callable(getter) else None
            if isinstance(emb, nn.Module):
                skip.add(id(emb))
        found = {
            name: m for name, m in model.named_modules()
            if is_linear(m) and id(m) not in skip and m.weight.requires_grad
        }
        if not found:
            raise TaskError("the model has no trainable linear layer outside its embeddings")
        return found

    # ------------------------------------------------------------------ data

    def _records(self, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
        path = Path(source).expanduser()
        if path.is_dir():
            datasets = require_hf("datasets")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise TaskError(f"dataset {source!r} has no split {self.split!r}; it has "
                                    f"{sorted(loaded)}")
                loaded = loaded[self.split]
            for i, row in enumerate(loaded):
                yield str(row.get("id", i)), self._record(dict(row), f"{source} row {i}")
            return
        if not path.is_file():
            raise TaskError(f"examples file {source!r} does not exist")
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise TaskError(f"{source} line {i + 1} is not JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise TaskError(f"{source} line {i + 1} is not a JSON object")
                yield str(row.get("id", i)), self._record(row, f"{source} line {i + 1}")

    def _record(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        payload = {k: v for k, v in row.items() if k != "id"}
        if not (("prompt" in payload and "completion" in payload) or "text" in payload):
            raise TaskError(f"{where}: an example needs 'prompt' and 'completion', or 'text'")
        return payload

    def examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.data is None:
            raise TaskError("no training examples: pass data=PATH (a JSONL file or a dataset "
                            "saved with save_to_disk)")
        return self._records(self.data)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self.examples())
        return self._count

    def queries(self) -> list[tuple[str, dict[str, Any]]]:
        """Held-out examples (``queries=``) for the page's gallery."""
        return list(self._records(self.queries_path)) if self.queries_path else []

    def metadata(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload's scalar fields other than its text: what filters match on."""
        return {k: v for k, v in payload.items() if k not in TEXT_KEYS
                and (v is None or isinstance(v, str | int | float | bool))}

    def render(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Text for the page; ``prompt`` and ``completion`` kept apart for highlighting."""
        if "text" in payload and "prompt" not in payload:
            return {"kind": "text", "text": str(payload["text"])}
        prompt, completion = str(payload.get("prompt", "")), str(payload.get("completion", ""))
        return {"kind": "text", "text": prompt + completion, "prompt": prompt,
                "completion": completion}

    # ------------------------------------------------------------------ batches

    def encode(self, payload: Any, n: int = 0) -> tuple[list[int], int]:
        """Token ids of one payload and the position of its first scored token.

        Raises:
            TaskError: not a text payload, nothing to score, or a completion (or text) that
                does not fit the context.
        """
        if not isinstance(payload, dict):
            raise TaskError(f"example {n}: a payload must be an object with 'prompt' and "
                            f"'completion' (or 'text'), got {type(payload).__name__}")
        if "prompt" in payload or "completion" in payload:
            prompt, completion = payload.get("prompt"), payload.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise TaskError(f"example {n}: 'prompt' and 'completion' must both be strings")
            p_ids = list(self.tokenizer(prompt)["input_ids"])
            c_ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
            if not c_ids:
                raise TaskError(f"example {n}: the completion tokenizes to no token; there is "
                                "nothing to attribute")
            if not p_ids:
                if self.bos is None:
                    raise TaskError(f"example {n}: the prompt is empty and the tokenizer has no "
                                    "BOS token to predict the completion from")
                p_ids = [self.bos]
            if len(c_ids) + 1 > self.max_length:
                raise TaskError(
                    f"example {n}: the completion has {len(c_ids)} tokens and the context "
                    f"holds {self.max_length}, with at least one prompt token: shorten it")
            keep = self.max_length - len(c_ids)
            p_ids = p_ids[-keep:]  # over the context: the prompt loses tokens from the left
            return p_ids + c_ids, len(p_ids)
        text = payload.get("text")
        if not isinstance(text, str):
            raise TaskError(f"example {n}: a payload needs 'prompt' and 'completion' "
                            "strings, or a 'text' string")
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) < 2:
            raise TaskError(f"example {n}: the text tokenizes to {len(ids)} token(s); at least "
                            "2 are needed to score one")
        if len(ids) > self.max_length:
            raise TaskError(f"example {n}: the text has {len(ids)} tokens and the context "
                            f"holds {self.max_length}: cut it into pieces before indexing")
        return ids, 1

    def collate(self, payloads: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Padded ``input_ids``, ``attention_mask``, ``position_ids`` and ``targets``, each
        ``[B, T]``; ``targets[t]`` is the token predicted at ``t`` (or ``IGNORE``)."""
        encoded = [self.encode(p, n) for n, p in enumerate(payloads)]
        width = max(len(ids) for ids, _ in encoded)
        b = len(encoded)
        input_ids = torch.full((b, width), self.pad, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        targets = torch.full((b, width), IGNORE, dtype=torch.long)
        for i, (ids, start) in enumerate(encoded):
            off = width - len(ids) if self.padding_side == "left" else 0
            row = torch.tensor(ids, dtype=torch.long)
            input_ids[i, off:off + len(ids)] = row
            attention[i, off:off + len(ids)] = 1
            # the token at position t is predicted from position t - 1
            targets[i, off + start - 1:off + len(ids) - 1] = row[start:]
        # positions count real tokens only, so left padding does not shift them
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention,
                "position_ids": positions, "targets": targets}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             sample: bool = False) -> torch.Tensor:
        """Mean negative log-likelihood of each example's scored tokens, ``[B]``.

        With ``sample=True`` each scored position's target is drawn from the model's own
        next-token distribution (teacher-forced on the true prefix): the sampled Fisher, which
        works at any vocabulary size.
        """
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)
        logits = out.logits  # [B, T, V]
        targets = batch["targets"]
        scored = targets != IGNORE
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits[scored].float(), dim=-1)
                targets = targets.clone()
                targets[scored] = torch.multinomial(probs, 1).squeeze(1)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                              reduction="none")  # [B, T], 0 where ignored
        return nll.sum(1) / scored.sum(1).clamp(min=1)
