"""Text backbones: Hugging Face ``transformers`` model classes built from a config, never
downloaded (``HF_HUB_OFFLINE``; nothing here calls ``from_pretrained``: a pretrained
checkpoint in a local folder is read by ``graftline.hub``).

``llama``: a GPT/Llama-style decoder (``LlamaModel``: causal attention, RMSNorm, rotary
positions, SwiGLU). Its feature for a head is the mean of its real tokens' states, or the
state of the last real token, the one that has attended to the whole text. ``bert``: a
BERT-style encoder (``BertModel``); its feature is the first token's state (``<s>``, BERT's
[CLS], through BERT's pooler) or the mean of the real tokens'. Both read ``{"input_ids",
"attention_mask"}`` (``graftline.data.modules.TokenData``), padded on the right.

The config is graftline's own sizes from params, completed from the tokenizer (vocabulary
size, ``max_len``, special ids), or a pretrained checkpoint's ``config.json``
(``hf_config``); the pretrain stage writes it into the model config that every checkpoint
carries.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config-built model needs no hub, ever

# LoRA targets (graftline.models.lora) of each architecture: regular expressions matched
# against the end of a linear layer's name.
LORA_TARGETS = {
    "llama": {
        "qkv": (r"self_attn\.[qkv]_proj",),
        "proj": (r"self_attn\.o_proj",),
        "mlp": (r"mlp\.(gate|up|down)_proj",),
    },
    "bert": {
        "qkv": (r"attention\.self\.(query|key|value)",),
        "proj": (r"attention\.output\.dense",),
        "mlp": (r"intermediate\.dense", r"layer\.\d+\.output\.dense"),
    },
}


# What a text model's config takes from its tokenizer (the text transform).
FROM_TOKENIZER = ("vocab_size", "max_len", "pad_id", "bos_id", "eos_id")


def _config_from_params(
    arch: str,
    vocab_size: int,
    max_len: int,
    pad_id: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    dropout: float,
    bos_id: int | None,
    eos_id: int | None,
) -> Any:
    """A ``transformers`` config for graftline's own sizes (params)."""
    width = int(dim * mlp_ratio)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            intermediate_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_len,
            attention_dropout=dropout,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )
    if arch == "bert":
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            intermediate_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            max_position_embeddings=max_len,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            type_vocab_size=1,
            pad_token_id=pad_id,
        )
    raise ValueError(f"unknown text architecture {arch!r} (known: llama, bert)")


def hf_config_from_dict(data: dict[str, Any]) -> Any:
    """The ``transformers`` config a checkpoint records (``PretrainedConfig.to_dict()``)."""
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def base_model(arch: str, config: Any, pool: str) -> nn.Module:
    """The ``transformers`` base model of ``arch`` built from ``config`` (random weights).
    An encoder read at its first token keeps BERT's pooler (a dense layer and tanh over
    [CLS], the feature ``BertForSequenceClassification`` classifies); otherwise it has none."""
    from transformers import AutoModel

    if config.model_type != arch:
        raise ValueError(f"a {config.model_type} config cannot build arch {arch}")
    kwargs = {"add_pooling_layer": pool == "cls"} if arch == "bert" else {}
    return AutoModel.from_config(config, **kwargs)


class TextBackbone(nn.Module):
    """A Hugging Face decoder (``llama``) or encoder (``bert``) with graftline's pooling:
    ``forward`` gives one feature vector per text, ``hidden`` the per-token states. ``model``
    is the ``transformers`` base model (``LlamaModel``, ``BertModel``), built from a config:
    graftline's sizes, or a pretrained checkpoint's (``graftline.hub``)."""

    def __init__(self, arch: str, model: nn.Module, pad_id: int, pool: str = "mean") -> None:
        super().__init__()
        if arch not in LORA_TARGETS:
            raise ValueError(f"unknown text architecture {arch!r} (known: llama, bert)")
        self.arch, self.pool, self.pad_id = arch, pool, pad_id
        self.model = model
        self.out_features = int(model.config.hidden_size)
        self.lora_targets = LORA_TARGETS[arch]
        # A decoder read at its last token gets LlamaForSequenceClassification's head (no
        # bias), so the classifier exports as that class with equal logits.
        self.head_bias = not (arch == "llama" and pool == "last")

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each token's last hidden state, ``(N, T, dim)``."""
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return out.last_hidden_state

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per text from its token states: the last real token's, the first
        token's, or the mean of the real ones'."""
        if self.pool == "last":
            last = mask.long().sum(1).clamp_min(1) - 1
            return states[torch.arange(states.shape[0], device=states.device), last]
        if self.pool == "cls":
            pooler = getattr(self.model, "pooler", None)
            return states[:, 0] if pooler is None else pooler(states)
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pooled(self.hidden(inputs), inputs["attention_mask"])

    def spatial(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The representation below the pooled feature (label propagation's graph): the mean
        of the real tokens' states, whatever the head reads."""
        states, mask = self.hidden(inputs), inputs["attention_mask"]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def token_embeddings(self) -> nn.Embedding:
        """The input embedding, which the language-modelling heads share (tied weights)."""
        return self.model.get_input_embeddings()

    def layers(self) -> list[nn.Module]:
        """Input to output: the embeddings, each Transformer layer, the final norm (a
        decoder's; an encoder normalises inside each layer), for layer-wise LR decay."""
        if self.arch == "llama":
            return [self.model.embed_tokens, *self.model.layers, self.model.norm]
        return [self.model.embeddings, *self.model.encoder.layer]


def build_text_backbone(cfg: dict[str, Any]) -> TextBackbone:
    """The backbone a text model config describes: graftline's sizes (``dim``, ``depth``,
    ...; ``vocab_size``, ``max_len`` and ``pad_id`` as the pretrain stage writes them), or a
    pretrained checkpoint's ``transformers`` config (``hf_config``)."""
    arch, pool = cfg["arch"], cfg["pool"]
    if "hf_config" in cfg:
        config = hf_config_from_dict(cfg["hf_config"])
    else:
        config = _config_from_params(
            arch,
            vocab_size=cfg["vocab_size"],
            max_len=cfg["max_len"],
            pad_id=cfg["pad_id"],
            dim=cfg["dim"],
            depth=cfg["depth"],
            heads=cfg["heads"],
            mlp_ratio=cfg["mlp_ratio"],
            dropout=cfg["dropout"],
            bos_id=cfg.get("bos_id"),
            eos_id=cfg.get("eos_id"),
        )
    return TextBackbone(arch, base_model(arch, config, pool), cfg["pad_id"], pool)


def text_model_config(model_cfg: dict[str, Any], transform: dict[str, Any]) -> dict[str, Any]:
    """``model_cfg`` (params) completed from a text transform: the tokenizer's vocabulary
    size, ``max_len`` and special ids."""
    return {**model_cfg, **{k: transform[k] for k in FROM_TOKENIZER}}
