"""The text demo: a tiny GPT-2 trained here on arithmetic word problems, then indexed.

A corpus of templated problems (ages, prices, votes, marbles ... with varied names and numbers)
has a known answer for attribution: a held-out problem's proponents should mostly be training
problems of its own template. Everything is made here: the corpus, a byte-level BPE tokenizer
(``tokenizers``), and a 2-layer GPT-2 trained from its config on the CPU in about a minute, both
saved with ``save_pretrained``; nothing is downloaded. Needs ``pip install 'gradindex[hf]'``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .admin import list_indexes
from .build import BuildConfig, BuildProgressFn, build
from .settings import Settings, check_name
from .tasks.causal_lm import CausalLMTask, require_hf

__all__ = [
    "TEMPLATES",
    "TEXT_DEMO_TASK",
    "make_gpt2",
    "make_problems",
    "prepare_text_demo",
    "train_lm",
    "train_tokenizer",
    "write_jsonl",
]

log = logging.getLogger(__name__)

TEXT_DEMO_TASK = "gradindex.indexer.tasks:CausalLMTask"
"""The task the text demo index is built from."""

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira",
         "Liam", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
         "Will", "Xena", "Yusuf", "Zoe"]
ITEMS = ["pen", "book", "mug", "kite", "lamp", "ball", "hat", "cake"]
PLACES = ["Oakton", "Riverdale", "Hillview", "Lakeside", "Brookfield", "Maplewood"]


@dataclass(frozen=True)
class Template:
    """One kind of word problem: its text, and how its numbers give the answer."""

    name: str
    prompt: str
    completion: str
    answer: Callable[[int, int], int]
    x: tuple[int, int]
    y: tuple[int, int]


TEMPLATES: list[Template] = [
    Template("ages", "{a} is {x} years old. {b} is {y} years older than {a}. How old is {b}?",
             " {b} is {ans} years old.", lambda x, y: x + y, (5, 60), (1, 30)),
    Template("prices", "A {item} costs {x} dollars. {a} buys {y} of them. How much does {a} "
             "pay?", " {a} pays {ans} dollars.", lambda x, y: x * y, (2, 20), (2, 9)),
    Template("votes", "In the {place} election, {a} got {x} votes and {b} got {y} votes. How "
             "many votes were cast?", " {ans} votes were cast.", lambda x, y: x + y,
             (100, 900), (100, 900)),
    Template("marbles", "{a} has {x} marbles and gives {y} of them to {b}. How many marbles "
             "does {a} have left?", " {a} has {ans} marbles left.", lambda x, y: x - y,
             (20, 99), (1, 19)),
    Template("trains", "A train leaves {place} at {x} miles per hour and runs for {y} hours. "
             "How far does it travel?", " It travels {ans} miles.", lambda x, y: x * y,
             (20, 90), (2, 6)),
    Template("pages", "{a} reads {x} pages every day. How many pages has {a} read after {y} "
             "days?", " {a} has read {ans} pages.", lambda x, y: x * y, (5, 40), (2, 9)),
    Template("cookies", "{a} bakes {x} cookies and shares them equally among {y} friends. How "
             "many cookies does each friend get?", " Each friend gets {ans} cookies.",
             lambda x, y: x // y, (2, 12), (2, 8)),
    Template("weather", "It was {x} degrees in {place} at noon, and it got {y} degrees colder "
             "by night. How cold was it at night?", " It was {ans} degrees.",
             lambda x, y: x - y, (40, 95), (5, 30)),
]


def make_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` problems, templates in turn, numbers and names drawn by ``seed``.

    Returns:
        Payloads ``{"prompt", "completion", "template"}``.
    """
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        t = TEMPLATES[i % len(TEMPLATES)]
        a, b = rng.sample(NAMES, 2)
        x, y = rng.randint(*t.x), rng.randint(*t.y)
        if t.name == "cookies":
            x = x * y  # shared equally: x divisible by y
        fields = {"a": a, "b": b, "x": x, "y": y, "item": rng.choice(ITEMS),
                  "place": rng.choice(PLACES)}
        fields["ans"] = t.answer(x, y)
        problems.append({"prompt": t.prompt.format(**fields),
                         "completion": t.completion.format(**fields), "template": t.name})
    return problems


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]], prefix: str) -> None:
    """Rows as JSONL with ids ``prefix-0``, ``prefix-1`` ..., written then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({"id": f"{prefix}-{i}", **row}) + "\n")
    os.replace(tmp, path)


def train_tokenizer(texts: Sequence[str], folder: Path, vocab_size: int = 600) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, saved to ``folder`` for
    ``AutoTokenizer``; ``<|endoftext|>`` is its BOS, EOS and padding token."""
    tokenizers = require_hf("tokenizers")
    transformers = require_hf("transformers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    eot = "<|endoftext|>"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot,
                                               eos_token=eot, pad_token=eot)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def make_gpt2(vocab_size: int, *, layers: int = 2, width: int = 128, heads: int = 4,
              context: int = 128, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 of the given size (``Conv1D`` layers, tied head)."""
    transformers = require_hf("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width,
                                     n_layer=layers, n_head=heads, bos_token_id=0,
                                     eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def train_lm(task: CausalLMTask, payloads: Sequence[dict[str, Any]], *, epochs: int,
             lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> list[float]:
    """Train ``task.model()`` in place on the whole text of ``payloads`` (prompt and
    completion), AdamW with a linear decay; returns each epoch's mean loss."""
    model = task.model()
    texts = [{"text": p["prompt"] + p["completion"]} for p in payloads]
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(texts) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = task.collate([texts[i] for i in order[start:start + batch_size]])
            loss = task.loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch["targets"])
        history.append(total / len(texts))
    model.eval()
    return history


def build_text_model(folder: Path, train: Sequence[dict[str, Any]], *, epochs: int,
                     width: int = 128, seed: int = 0) -> list[float]:
    """Tokenizer and tiny GPT-2 trained on ``train``, both saved to ``folder``."""
    require_hf("transformers").utils.logging.disable_progress_bar()  # logs, not bars
    texts = [p["prompt"] + p["completion"] for p in train]
    tok = train_tokenizer(texts, folder)
    model = make_gpt2(len(tok), width=width, seed=seed)
    model.save_pretrained(str(folder))
    task = CausalLMTask(str(folder))
    history = train_lm(task, train, epochs=epochs, seed=seed)
    trained: Any = task.model()
    trained.save_pretrained(str(folder))
    return history


def prepare_text_demo(
    settings: Settings, *, name: str = "arithmetic", train_size: int = 3000,
    heldout: int = 200, epochs: int = 6, progress: BuildProgressFn | None = None,
) -> bool:
    """Write the corpus, train the tokenizer and model, build the index; reuse what exists.

    Returns:
        Whether an index was built (False: the published one was reused).
    """
    check_name(name)
    root = settings.data_dir / "text-demo"
    train_path, heldout_path = root / "train.jsonl", root / "heldout.jsonl"
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file() or not train_path.is_file():
        train = make_problems(train_size, seed=0)
        write_jsonl(train_path, train, "train")
        write_jsonl(heldout_path, make_problems(heldout, seed=1), "heldout")
        history = build_text_model(model_dir, train, epochs=epochs)
        log.info("trained the text demo model (loss by epoch %s); saved in %s",
                 [round(h, 3) for h in history], model_dir)
    if any(row["name"] == name for row in list_indexes(settings)):
        log.info("index %r is already published; reusing it", name)
        return False
    config = BuildConfig(name=name, task=TEXT_DEMO_TASK,
                         task_args={"model": str(model_dir), "data": str(train_path),
                                    "queries": str(heldout_path)})
    build(config, settings, progress=progress)
    return True
