"""Text backbones: Hugging Face ``transformers`` model classes built from a config, never
downloaded (``HF_HUB_OFFLINE``; nothing here calls ``from_pretrained``).

``llama``: a GPT/Llama-style decoder (``LlamaModel``: causal attention, RMSNorm, rotary
positions, SwiGLU). Its feature for a head is the mean of its real tokens' states, or the
state of the last real token, the one that has attended to the whole text. ``bert``: a BERT-style encoder (``BertModel`` without its
pooler); its feature is the first token's state (``<s>``, BERT's [CLS]) or the mean of the
real tokens'. Both read ``{"input_ids", "attention_mask"}`` (``graftline.data.modules
.TokenData``), padded on the right.

The vocabulary size, ``max_len`` and the special ids come from the tokenizer; the pretrain
stage writes them into the model config that every checkpoint carries.
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


class TextBackbone(nn.Module):
    """A Hugging Face decoder (``llama``) or encoder (``bert``) with graftline's pooling:
    ``forward`` gives one feature vector per text, ``hidden`` the per-token states."""

    def __init__(
        self,
        arch: str,
        vocab_size: int,
        max_len: int,
        pad_id: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "mean",
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        self.arch, self.pool, self.pad_id = arch, pool, pad_id
        width = int(dim * mlp_ratio)
        if arch == "llama":
            from transformers import LlamaConfig, LlamaModel

            config = LlamaConfig(
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
            self.model: nn.Module = LlamaModel(config)
        elif arch == "bert":
            from transformers import BertConfig, BertModel

            config = BertConfig(
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
            # pool cls: BERT's own pooler (a dense layer and tanh over [CLS]), the feature
            # BertForSequenceClassification classifies; mean: no pooler.
            self.model = BertModel(config, add_pooling_layer=pool == "cls")
        else:
            raise ValueError(f"unknown text architecture {arch!r} (known: llama, bert)")
        self.out_features = dim
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
    """The backbone a text model config describes (``vocab_size``, ``max_len`` and
    ``pad_id`` included, as the pretrain stage writes them)."""
    return TextBackbone(
        arch=cfg["arch"],
        vocab_size=cfg["vocab_size"],
        max_len=cfg["max_len"],
        pad_id=cfg["pad_id"],
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
        mlp_ratio=cfg["mlp_ratio"],
        dropout=cfg["dropout"],
        pool=cfg["pool"],
        bos_id=cfg.get("bos_id"),
        eos_id=cfg.get("eos_id"),
    )


def text_model_config(model_cfg: dict[str, Any], transform: dict[str, Any]) -> dict[str, Any]:
    """``model_cfg`` (params) completed from a text transform: the tokenizer's vocabulary
    size, ``max_len`` and special ids."""
    return {**model_cfg, **{k: transform[k] for k in FROM_TOKENIZER}}
