"""Tiny Hugging Face checkpoints, made as somebody else would have made them: a randomly
initialised ``LlamaForCausalLM`` or ``BertForMaskedLM`` saved with ``save_pretrained``
(safetensors) beside a tokenizer trained on the given texts, saved with its own
``save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json``, special tokens).

Their special tokens are not graftline's: the decoder's tokenizer frames a text as Llama's
does (``<s> text``, no ``</s>``) with ids in another order, the encoder's is a lowercasing
WordPiece with ``[CLS] text [SEP]``; so a test shows graftline reads the checkpoint's
tokenizer as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def _decoder_tokenizer(texts: list[str], vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )


def _encoder_tokenizer(texts: list[str], vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
    )


def save_tiny_checkpoint(
    folder: Path,
    arch: str,
    texts: Iterable[str],
    *,
    vocab_size: int = 600,
    dim: int = 32,
    max_positions: int = 64,
    seed: int = 0,
) -> Path:
    """A tiny ``arch`` (``llama`` or ``bert``) checkpoint in ``folder``; returns it."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    texts = list(texts)
    tok = (_decoder_tokenizer if arch == "llama" else _encoder_tokenizer)(texts, vocab_size)
    common = {
        "vocab_size": len(tok),
        "hidden_size": dim,
        "intermediate_size": 2 * dim,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": max_positions,
        "pad_token_id": tok.pad_token_id,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            **common,
            num_key_value_heads=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        model = BertForMaskedLM(BertConfig(**common, type_vocab_size=2))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
