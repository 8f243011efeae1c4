"""Text backbones (Hugging Face classes from a config), the language-modelling objectives,
LoRA on them, and a text model trained through the one loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graftline.config import TrainConfig
from graftline.data.modules import Part, TokenData
from graftline.models import build_classifier
from graftline.models.lora import adapter_layers, add_adapters, merge_adapters
from graftline.objectives import CausalLM, MaskedLM
from graftline.train import fit

SIZES = {"vocab_size": 50, "max_len": 24, "pad_id": 0, "bos_id": 2, "eos_id": 3}
LLAMA = {
    "arch": "llama",
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "mlp_ratio": 2.0,
    "dropout": 0.0,
    "pool": "last",
    **SIZES,
}
BERT = {
    "arch": "bert",
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "mlp_ratio": 2.0,
    "dropout": 0.0,
    "pool": "cls",
    **SIZES,
}


def batch(rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": ids != 0}


@pytest.mark.parametrize(
    "cfg", [LLAMA, BERT, {**BERT, "pool": "mean"}], ids=["llama", "bert-cls", "bert-mean"]
)
def test_a_text_feature_does_not_depend_on_the_padding(cfg: dict) -> None:
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, cfg["max_len"], 3).eval()
    texts = [[2, 7, 9, 11, 13, 3], [2, 5, 3]]
    with torch.no_grad():
        alone = torch.cat([model(batch([t], len(t))) for t in texts])
        padded = model(batch(texts, 12))
    assert padded.shape == (2, 3)
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_causal_targets_are_the_next_real_token() -> None:
    inputs = batch([[2, 7, 9, 3], [2, 5, 3]], 4)
    _, target = CausalLM(50).targets(inputs, torch.Generator())
    assert target.tolist() == [[7, 9, 3, -100], [5, 3, -100, -100]]


def test_masked_lm_hides_15_percent_as_bert_does() -> None:
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (400, 64), generator=rng)
    ids[:, 0], ids[:, -1] = 2, 3  # <s> ... </s>
    ids[:50, 40:] = 0  # some padding
    inputs = {"input_ids": ids, "attention_mask": ids != 0}
    objective = MaskedLM(50, mask_id=4, special_ids=[0, 2, 3, 4], mask_rate=0.15)
    corrupted, target = objective.targets(inputs, torch.Generator().manual_seed(1))
    chosen = target != -100
    eligible = (ids != 0) & (ids != 2) & (ids != 3)
    assert not (chosen & ~eligible).any()  # never a special token or padding
    assert abs(chosen.sum().item() / eligible.sum().item() - 0.15) < 0.01
    new = corrupted["input_ids"][chosen]
    masked = (new == 4).float().mean().item()
    kept = (new == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # and ~10 % random
    assert torch.equal(target[chosen], ids[chosen])
    assert torch.equal(corrupted["input_ids"][~chosen], ids[~chosen])


def _sequences(n: int, seed: int) -> np.ndarray:
    """Counting sequences ``<s> a a+1 a+2 ... </s>`` (mod 40, offset by the 5 specials) of
    random lengths, padded: a language a model can learn and a unigram model cannot."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 20), dtype=np.int32)
    for i in range(n):
        start, length = rng.integers(0, 40), rng.integers(6, 18)
        out[i, 0] = 2
        out[i, 1 : 1 + length] = 5 + (start + np.arange(length)) % 40
        out[i, 1 + length] = 3
    return out


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_language_model_learns_through_the_same_loop(arch: str) -> None:
    cfg = {**(LLAMA if arch == "llama" else BERT), "max_len": 20, "vocab_size": 45}
    transform = {"kind": "text", "pad_id": 0}
    labels = np.full(300, -1, np.int64)
    train = TokenData([Part(_sequences(300, 0), labels)], [], transform, 0)
    val = TokenData([Part(_sequences(60, 1), labels[:60])], [], transform, 0)
    probe_y = np.arange(60) % 2
    probe = TokenData([Part(_sequences(60, 2), probe_y)], ["a", "b"], transform, 0)
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, 20, 0)
    objective = (
        CausalLM(45)
        if arch == "llama"
        else MaskedLM(45, mask_id=4, special_ids=[0, 2, 3, 4], mask_rate=0.3)
    )
    cfg_train = TrainConfig(
        epochs=6 if arch == "llama" else 20,  # a masked LM sees 30 % of the tokens per pass
        batch_size=32,
        lr=3e-3 if arch == "llama" else 5e-3,
        schedule="cosine",
        keep="last",
        num_threads=1,
    )
    result = fit(model, train, val, cfg_train, seed=0, objective=objective, probe=(probe, probe))
    first, last = result.history[0]["val_perplexity"], result.history[-1]["val_perplexity"]
    # uniform over the 40 tokens is 40; the held-out sequences are predictable
    assert last < first and last < 12, (first, last)


@pytest.mark.parametrize("cfg", [LLAMA, BERT], ids=["llama", "bert"])
def test_lora_adapts_a_text_backbone_and_merges_back_to_the_same_function(cfg: dict) -> None:
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, 24, 2).eval()
    inputs = batch([[2, 7, 9, 11, 3], [2, 5, 3]], 5)
    with torch.no_grad():
        base = model(inputs)
    model.backbone = add_adapters(model.backbone, ["qkv", "proj", "mlp"], rank=2, alpha=4.0)
    layers = adapter_layers(model)
    per_layer = 7 if cfg["arch"] == "llama" else 6  # q k v o gate up down / q k v o in out
    assert len(layers) == per_layer * cfg["depth"]
    with torch.no_grad():  # B starts at zero: the adapted model computes what its base did
        torch.testing.assert_close(model(inputs), base)
    for layer in layers:  # as if trained
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    with torch.no_grad():
        adapted = model(inputs)
        assert merge_adapters(model) == len(layers)
        merged = model(inputs)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-4)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert type(model.backbone).__name__ == "TextBackbone"
