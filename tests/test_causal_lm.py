"""The causal-LM task against references: tiny GPT-2 (Conv1D) and Llama (nn.Linear) checkpoints
and a BPE tokenizer saved to a temporary folder; factorized against flat masks over padded
tokens, padding invariance, LoRA-only attribution, and bad text payloads over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from gradindex import BuildConfig, CompressionConfig, Featurizer, Settings, build
from gradindex.indexer.compress import DropoutCompressor
from gradindex.indexer.errors import ConfigError, TaskError
from gradindex.indexer.tasks import CausalLMTask
from gradindex.indexer.text_demo import make_gpt2, make_problems, train_tokenizer, write_jsonl

from .conftest import LiveServer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# peft calls a transformers property that transformers deprecates: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

RTOL = 1e-4
"""Relative tolerance, and absolute tolerance as a fraction of the largest value compared
(random-init gradients are small)."""
PAYLOADS = [
    {"prompt": "Ava is 7 years old. How old is Ben?", "completion": " Ben is 9 years old."},
    {"prompt": "A pen costs 3 dollars.", "completion": " 12"},
    {"text": "In the Oakton election, Grace got 242 votes and Quinn got 388 votes."},
    {"prompt": "", "completion": " It travels 120 miles."},
    {"prompt": "Zoe reads 5 pages every day. How many pages has Zoe read after 4 days?",
     "completion": " Zoe has read 20 pages. Each friend gets 3 cookies."},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and three random-init checkpoints: GPT-2, Llama with biased projections,
    and a LoRA adapter on the GPT-2 (random B, so every LoRA weight has a gradient)."""
    root = tmp_path_factory.mktemp("lm")
    problems = make_problems(200, seed=0)
    tok_dir = root / "tokenizer"
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in problems], tok_dir,
                          vocab_size=300)
    gpt2 = make_gpt2(len(tok), layers=2, width=32, heads=2, context=64, seed=0)
    gpt2.save_pretrained(str(root / "gpt2"))
    tok.save_pretrained(str(root / "gpt2"))
    torch.manual_seed(1)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        attention_bias=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    llama.save_pretrained(str(root / "llama"))
    tok.save_pretrained(str(root / "llama"))
    lora = peft.get_peft_model(gpt2, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False))
    lora.save_pretrained(str(root / "lora"))
    write_jsonl(root / "train.jsonl", problems[:24], "train")
    return {"root": root, "gpt2": root / "gpt2", "llama": root / "llama",
            "lora": root / "lora", "data": root / "train.jsonl"}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    assert scale > 1e-6, "nothing to compare: the reference is all zeros"
    torch.testing.assert_close(a, b, atol=RTOL * scale, rtol=RTOL)


def _flat_twin(fact: Featurizer, task: Any) -> Featurizer:
    """A flat-dropout featurizer restricted to the coordinates ``fact`` keeps."""
    flats = [[DropoutCompressor(fact.layers, fact.keep, fact.config, checkpoint=c, mask=m,
                                coordinates={ly.name: comp.coordinates(ly.name)
                                             for ly in fact.layers})
              for m, comp in enumerate(row)] for c, row in enumerate(fact.compressors)]
    cfg = CompressionConfig(compressor="dropout", keep=fact.keep, masks=len(flats[0]),
                            modules=fact.config.modules)
    return Featurizer(task, cfg, device="cpu", compressors=flats)


def test_loss_is_the_mean_nll_of_the_completion_tokens(checkpoints) -> None:
    task = CausalLMTask(str(checkpoints["gpt2"]))
    model = task.model()
    payload = PAYLOADS[0]
    p_ids = task.tokenizer(payload["prompt"])["input_ids"]
    c_ids = task.tokenizer(payload["completion"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    labels = ids.clone()
    labels[0, :len(p_ids)] = -100  # HF shifts labels itself and averages the rest
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        got = task.loss(model, task.collate([payload, PAYLOADS[4]]))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model", "pattern", "kind"), [
    ("gpt2", "transformer.h.0.mlp.*", "Conv1D"),
    ("gpt2", "transformer.h.1.attn.c_attn", "Conv1D"),
    ("llama", "model.layers.0.self_attn.q_proj", "Linear"),
    ("llama", "model.layers.0.self_attn.o_proj", "Linear"),
])
@pytest.mark.parametrize("keep", [1.0, 0.2])
def test_factorized_equals_flat_mask_over_padded_tokens(checkpoints, model: str, pattern: str,
                                                        kind: str, keep: float) -> None:
    """[B, T, D] with padding: the hooked block equals the same coordinates of the full
    per-example gradient, for GPT-2's transposed Conv1D and an nn.Linear with a bias."""
    task = CausalLMTask(str(checkpoints[model]))
    fact = Featurizer(task, CompressionConfig(compressor="factorized-dropout", keep=keep, masks=2,
                                              modules=(pattern,)),
                      device="cpu")
    assert {type(m).__name__ for m in fact.modules[0].values()} == {kind}
    assert all(ly.bias and ly.transposed == (kind == "Conv1D") for ly in fact.layers)
    flat = _flat_twin(fact, task)
    a, b = fact.raw(PAYLOADS), flat.raw(PAYLOADS)
    _close(a, b)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_vectors_do_not_depend_on_batch_companions_or_padding_side(checkpoints,
                                                                   model: str) -> None:
    cfg = CompressionConfig(keep=0.3, masks=1)
    right = Featurizer(CausalLMTask(str(checkpoints[model])), cfg, device="cpu")
    left = Featurizer(CausalLMTask(str(checkpoints[model]), padding_side="left"), cfg,
                      device="cpu")
    alone = torch.cat([right.raw([p]) for p in PAYLOADS])
    _close(right.raw(PAYLOADS), alone)
    _close(left.raw(PAYLOADS), alone)
    _close(left.raw(PAYLOADS[::-1]), alone.flip(0))


def test_default_modules_skip_embeddings_and_head(checkpoints) -> None:
    task = CausalLMTask(str(checkpoints["gpt2"]))
    feat = Featurizer(task, CompressionConfig(keep=0.1), device="cpu")
    names = [ly.name for ly in feat.layers]
    assert names == [f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    head = Featurizer(task, CompressionConfig(keep=0.1, modules=("lm_head",)), device="cpu")
    assert [ly.name for ly in head.layers] == ["lm_head"]
    with pytest.raises(ConfigError, match="match no module"):
        Featurizer(task, CompressionConfig(keep=0.1, modules=("encoder.*",)), device="cpu")


def test_lora_only_attributes_lora_matrices_and_follows_their_weights(checkpoints) -> None:
    task = CausalLMTask(str(checkpoints["gpt2"]), adapter=str(checkpoints["lora"]))
    model = task.model()
    feat = Featurizer(task, CompressionConfig(keep=0.5, masks=1), device="cpu")
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert len(feat.layers) == 2 * 2 * 2  # 2 blocks × (c_attn, c_fc) × (A, B)
    assert all(".lora_A." in ly.name or ".lora_B." in ly.name for ly in feat.layers)
    assert feat.total_params == sum(p.numel() for n, p in model.named_parameters() if n in lora)
    before = feat.raw(PAYLOADS)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora}
    with torch.no_grad():
        dict(model.named_parameters())[sorted(lora)[-1]].add_(0.5)
    after = Featurizer(task, CompressionConfig(keep=0.5, masks=1), device="cpu").raw(PAYLOADS)
    assert (after - before).abs().max() > 1e-4
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters()
               if n not in lora)


@pytest.mark.parametrize(("payload", "message"), [
    ([1, 2, 3], "must be an object"),
    ({"prompt": 3, "completion": "x"}, "must both be strings"),
    ({"prompt": "How old?", "completion": ""}, "tokenizes to no token"),
    ({"image": [0.1]}, "'text' string"),
    ({"text": "a"}, "at least 2"),
    ({"prompt": "x", "completion": " 7" * 80}, "context holds 64"),
    ({"text": " 7" * 80}, "context holds 64"),
])
def test_bad_text_payloads_are_refused_by_name(checkpoints, payload: Any, message: str) -> None:
    task = CausalLMTask(str(checkpoints["gpt2"]))
    with pytest.raises(TaskError, match=message):
        task.collate([payload])


def test_a_long_prompt_loses_tokens_from_the_left(checkpoints) -> None:
    task = CausalLMTask(str(checkpoints["gpt2"]), max_length=16)
    ids, start = task.encode({"prompt": "Ava is 7 years old. " * 10, "completion": " Ben is 9."})
    c_ids = task.tokenizer(" Ben is 9.", add_special_tokens=False)["input_ids"]
    full_prompt = task.tokenizer("Ava is 7 years old. " * 10)["input_ids"]
    assert len(ids) == 16 and ids[start:] == c_ids
    assert ids[:start] == full_prompt[-start:]


def test_sampled_targets_give_reproducible_fisher_rows(checkpoints) -> None:
    feat = Featurizer(CausalLMTask(str(checkpoints["gpt2"])), CompressionConfig(keep=0.2),
                      device="cpu")
    one, two = feat.fisher(PAYLOADS, "sampled", 2), feat.fisher(PAYLOADS, "sampled", 2)
    assert one.shape == (2 * len(PAYLOADS), feat.dim)
    torch.testing.assert_close(one, two)
    assert not torch.allclose(one[: len(PAYLOADS)] * 2**0.5, feat.raw(PAYLOADS))


def test_examples_from_jsonl_and_a_saved_dataset(checkpoints, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in checkpoints["data"].read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    from_jsonl = list(CausalLMTask(str(checkpoints["gpt2"]), str(checkpoints["data"])).examples())
    from_disk = list(CausalLMTask(str(checkpoints["gpt2"]), str(tmp_path / "ds")).examples())
    assert from_jsonl == from_disk
    assert from_jsonl[0][0] == "train-0" and from_jsonl[0][1]["template"] == "ages"
    task = CausalLMTask(str(checkpoints["gpt2"]), str(checkpoints["data"]))
    assert task.metadata(from_jsonl[0][1]) == {"template": "ages"}
    assert task.render(from_jsonl[0][1])["kind"] == "text"


def test_bad_text_payload_gets_422_over_http(checkpoints, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="lm", task="gradindex.indexer.tasks:CausalLMTask",
                      task_args={"model": str(checkpoints["gpt2"]),
                                 "data": str(checkpoints["data"])},
                      compression=CompressionConfig(dim=256, masks=1)), settings)
    server = LiveServer(settings, tmp_path / "server.log", auth="off").wait()
    try:
        url = f"{server.url}/v1/indexes/lm/influence"
        bad = httpx.post(url, json={"examples": [{"prompt": "How old?", "completion": ""}]},
                         timeout=60)
        assert bad.status_code == 422, bad.text
        assert "tokenizes to no token" in bad.text
        wrong = httpx.post(url, json={"examples": [{"pixels": [0.5]}]}, timeout=60)
        assert wrong.status_code == 422 and "'text' string" in wrong.text
        good = httpx.post(url, json={"examples": [PAYLOADS[0]], "k": 3, "render": True},
                          timeout=60)
        assert good.status_code == 200, good.text
        hits = good.json()["results"][0]["proponents"]
        assert len(hits) == 3 and hits[0]["payload"]["completion"]
    finally:
        server.stop()


def test_text_demo_trains_saves_and_indexes_its_corpus(tmp_path: Path) -> None:
    from gradindex.indexer.admin import list_indexes
    from gradindex.indexer.text_demo import TEMPLATES, prepare_text_demo

    settings = Settings(data_dir=tmp_path / "data")
    assert prepare_text_demo(settings, train_size=48, heldout=8, epochs=1)
    rows = {row["name"]: row for row in list_indexes(settings)}
    assert rows["arithmetic"]["count"] == 48
    folder = settings.data_dir / "text-demo"
    task = CausalLMTask(str(folder / "model"), str(folder / "train.jsonl"),
                        queries=str(folder / "heldout.jsonl"))
    templates = [p["template"] for _, p in task.examples()]
    assert sorted(set(templates)) == sorted(t.name for t in TEMPLATES)
    assert len(task.queries()) == 8
    assert not prepare_text_demo(settings, train_size=48, heldout=8, epochs=1)  # reused
