"""What a training step optimises, apart from the loop that runs it (``graftline.train.fit``).

An objective gives the loss of a batch and, after each epoch, the validation figures the loop
selects the best epoch by. ``Supervised`` is cross-entropy on the labels. Two never read a
label: ``MaskedAutoencoder`` (He et al., 2022) hides ``mask_ratio`` of a ViT's patches,
encodes the visible ones, and a light decoder reconstructs the pixels of the hidden ones (the
loss counts the hidden patches only); ``Contrastive`` (SimCLR, Chen et al., 2020) pulls two
augmented views of an image together and pushes the batch's other images away. Their
validation accuracy is the k-NN accuracy of the backbone's features (what self-supervised work
reports while pretraining), which needs labels on the validation split only. For text,
``CausalLM`` (GPT: the next token) and ``MaskedLM`` (BERT: 15 % of the tokens, hidden) are
the same kind of objective, and report the validation perplexity too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graftline.data.modules import Batch, DataModule, ImageData
from graftline.data.transforms import augment_batch
from graftline.models.vit import Block, ViTBackbone


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1], the input every model sees."""
    return images.float().div_(255.0)


class Supervised(nn.Module):
    """Cross-entropy on the labels; validation accuracy is the classifier's own."""

    val_acc_name = "val_acc"
    reports_train_acc = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a batch, and its logits' argmax (for the training accuracy)."""
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits, batch.target, label_smoothing=self.label_smoothing)
        return loss, logits.argmax(1)

    @torch.no_grad()
    def validate(self, model: nn.Module, val: DataModule, **_: Any) -> tuple[float, float]:
        model.eval()
        dev = next(model.parameters()).device
        loss, correct = 0.0, 0
        for batch in val.sequential(1024):
            batch = val.to_device(batch, dev)
            logits = model(batch.inputs)
            loss += F.cross_entropy(logits, batch.target, reduction="sum").item()
            correct += (logits.argmax(1) == batch.target).sum().item()
        return loss / len(val), correct / len(val)


class Distillation(Supervised):
    """Knowledge distillation (Hinton et al., 2015) for a student: items with a teacher's
    soft targets (``batch.extra["soft"]``: probabilities at ``temperature``, where
    ``soft_mask``) and items with a hard label (the labelled set).

    Soft items: KL divergence between the teacher's and the student's softened distributions,
    times ``temperature**2`` (so gradients keep their scale); hard items: cross-entropy,
    weighted by ``hard_weight``. Validation is the student's accuracy on real labels.
    """

    reports_train_acc = False

    def __init__(self, temperature: float = 2.0, hard_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.hard_weight = temperature, hard_weight

    def step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, None]:
        logits = model(batch.inputs)
        soft_items = batch.extra.get("soft_mask", torch.zeros_like(batch.labelled))
        hard_items = batch.labelled & ~soft_items
        loss = logits.new_zeros(())
        if soft_items.any():
            t = self.temperature
            log_p = F.log_softmax(logits[soft_items] / t, dim=1)
            kl = F.kl_div(log_p, batch.extra["soft"][soft_items], reduction="sum")
            loss = loss + kl * t * t
        if hard_items.any():
            ce = F.cross_entropy(logits[hard_items], batch.target[hard_items], reduction="sum")
            loss = loss + self.hard_weight * ce
        return loss / len(batch), None


class Consistency(Supervised):
    """FixMatch-style consistency (Sohn et al., 2020) on an unlabelled corpus, beside the
    labelled set: items labelled ``-1`` are unlabelled. The model's own prediction on the
    batch as the loop augmented it (the weak view) is the target of a strongly augmented
    view of the same image (``strong`` shifts, rotations, zooms, resolution loss, then a
    blanked ``cutout`` square), where its confidence reaches ``threshold``; labelled items get
    cross-entropy (after a further ``labelled`` augmentation, if given, on top of the weak
    one). The loss is ``mean CE(labelled) + weight * mean(mask * CE(strong, target))``,
    each mean over its own items, as FixMatch weighs them.
    """

    reports_train_acc = False

    def __init__(
        self,
        threshold: float = 0.95,
        weight: float = 1.0,
        strong: dict[str, Any] | None = None,
        cutout: int = 10,
        labelled: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.threshold, self.weight, self.cutout = threshold, weight, cutout
        self.strong = dict(strong or {})
        self.labelled = dict(labelled) if labelled else None  # more augmentation for labels
        self.masked_share = 0.0  # of the last batch's unlabelled items, for the curious

    def strong_view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = augment_batch(x, generator, **self.strong)
        if self.cutout <= 0:
            return x
        b, _, h, w = x.shape
        cy = torch.randint(0, h, (b,), generator=generator).to(x.device).view(-1, 1, 1)
        cx = torch.randint(0, w, (b,), generator=generator).to(x.device).view(-1, 1, 1)
        yy = torch.arange(h, device=x.device).view(1, h, 1)
        xx = torch.arange(w, device=x.device).view(1, 1, w)
        half = self.cutout / 2
        box = ((yy - cy).abs() < half) & ((xx - cx).abs() < half)
        return x * (~box).unsqueeze(1).to(x.dtype)

    def step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, None]:
        x, labelled = batch.inputs, batch.labelled
        unlabelled = ~labelled
        loss = x.new_zeros(())
        strong = x[:0]
        target = mask = None
        if unlabelled.any():
            weak = x[unlabelled]
            with torch.no_grad():  # the targets: what the model says of the weak view
                was_training = model.training
                model.eval()
                confidence, target = F.softmax(model(weak).float(), dim=1).max(1)
                model.train(was_training)
            mask = (confidence >= self.threshold).float()
            self.masked_share = float(mask.mean())
            strong = self.strong_view(weak, generator)
        xl = x[labelled]
        if self.labelled is not None and len(xl):
            xl = augment_batch(xl, generator, **self.labelled)
        logits = model(torch.cat([xl, strong]))
        n_lab = int(labelled.sum())
        if n_lab:
            loss = loss + F.cross_entropy(logits[:n_lab], batch.target[labelled])
        if target is not None and mask is not None:
            ce = F.cross_entropy(logits[n_lab:], target, reduction="none")
            loss = loss + self.weight * (ce * mask).mean()
        return loss, None


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, (H/p)*(W/p), p*p*C)``, row by row as the patch embedding."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class SelfSupervised(nn.Module):
    """What objectives that never read a label share: the loss of a batch from the images
    alone, and as validation figures that loss on the validation split (fixed randomness)
    and the k-NN accuracy of the backbone's features against the training split's."""

    val_acc_name = "val_knn_acc"
    reports_train_acc = False
    knn_k = 20

    def batch_loss(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, None]:
        return self.batch_loss(model, batch.inputs, generator), None

    def summed_loss(
        self, model: nn.Module, x: Any, generator: torch.Generator, items: int
    ) -> tuple[float, float]:
        """A validation batch's loss summed over what it averages (its items), and how many."""
        return self.batch_loss(model, x, generator).item() * items, float(items)

    def figures(self, val_loss: float) -> dict[str, float]:
        """More validation figures from the validation loss (a language model's perplexity)."""
        return {}

    @torch.no_grad()
    def validate(
        self,
        model: nn.Module,
        val: DataModule,
        *,
        bank: DataModule,
        query: DataModule | None = None,
        **_: Any,
    ) -> tuple[float, float]:
        """The loss on the validation split (fixed randomness), and the k-NN accuracy of
        ``query``'s features (default: the validation split's) against ``bank``'s (up to
        5,000 labelled items: the training split's, or a labelled probe's for a corpus
        without labels); labels serve the monitor only."""
        model.eval()
        self.eval()
        gen = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device
        loss, weight = 0.0, 0.0
        for batch in val.sequential(512):
            total, n = self.summed_loss(model, val.to_device(batch, dev).inputs, gen, len(batch))
            loss, weight = loss + total, weight + n
        query = query if query is not None else val
        return loss / max(weight, 1.0), knn_accuracy(
            features(model.backbone, bank),
            torch.from_numpy(bank.labels),
            features(model.backbone, query),
            torch.from_numpy(query.labels),
            self.knn_k,
        )


class MaskedAutoencoder(SelfSupervised):
    """MAE on a :class:`ViTBackbone`: random masking, a light Transformer decoder, and a loss
    on the (per-patch normalised) pixels of the masked patches only."""

    def __init__(
        self,
        backbone: ViTBackbone,
        in_channels: int,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        knn_k: int = 20,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, ViTBackbone):
            raise TypeError("masked autoencoding needs a ViT backbone (model.arch: vit)")
        dim, n = backbone.out_features, backbone.num_patches
        self.mask_ratio, self.norm_pix_loss, self.knn_k = mask_ratio, norm_pix_loss, knn_k
        self.patch_size = backbone.patch_size
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.decoder = nn.ModuleList(
            Block(decoder_dim, decoder_heads, 4.0, 0.0) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * in_channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def reconstruction_loss(
        self, vit: ViTBackbone, x: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        tokens = vit.embed(x)
        b, n, d = tokens.shape
        keep = max(1, int(n * (1 - self.mask_ratio)))
        noise = torch.rand(b, n, generator=generator).to(x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        latent = self.decoder_embed(vit.encode(visible))
        if vit.embed.cls is not None:
            latent = latent[:, 1:]
        full = torch.cat([latent, self.mask_token.expand(b, n - keep, -1)], dim=1)
        full = torch.gather(full, 1, restore[:, :, None].expand(-1, -1, full.shape[2]))
        full = full + self.decoder_pos
        for block in self.decoder:
            full = block(full)
        pred = self.decoder_pred(self.decoder_norm(full))
        target = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)  # 1 where hidden
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def batch_loss(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return self.reconstruction_loss(model.backbone, x, generator)


class Contrastive(SelfSupervised):
    """SimCLR (Chen et al., 2020) for any backbone: two augmented views of each image, a
    projection head, and the NT-Xent loss at ``temperature``: each view must pick its twin
    out of the other ``2B - 2`` images of the batch."""

    def __init__(
        self,
        out_features: int,
        proj_dim: int = 64,
        temperature: float = 0.2,
        augment: dict[str, float] | None = None,
        knn_k: int = 20,
    ) -> None:
        super().__init__()
        self.temperature, self.knn_k = temperature, knn_k
        self.augment = dict(augment or {"shift": 0.15, "rotate": 15.0, "scale": 0.15})
        self.projection = nn.Sequential(
            nn.Linear(out_features, out_features),
            nn.ReLU(inplace=True),
            nn.Linear(out_features, proj_dim),
        )

    def batch_loss(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        views = torch.cat(
            [
                augment_batch(x, generator, **self.augment),
                augment_batch(x, generator, **self.augment),
            ]
        )
        z = F.normalize(self.projection(model.backbone(views)), dim=1)
        return nt_xent(z, self.temperature)


class LanguageModel(SelfSupervised):
    """What the two language-modelling objectives share: token logits from the backbone's
    token states through the input embedding (tied weights, as GPT and BERT do) plus a bias,
    cross-entropy on the tokens to predict, and per-token validation loss whose exponential
    is the perplexity."""

    def __init__(self, vocab_size: int, knn_k: int = 20) -> None:
        super().__init__()
        self.knn_k = knn_k
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def token_loss(
        self, backbone: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the positions whose ``target`` is not -100, and their count."""
        states = backbone.hidden(inputs)
        logits = F.linear(states, backbone.token_embeddings().weight, self.bias)
        count = int((target != -100).sum())
        if not count:
            return logits.sum() * 0.0, 0
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        return loss, count

    def targets(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's input and the token to predict at each position (-100: none)."""
        raise NotImplementedError

    def batch_loss(self, model: nn.Module, x: Any, generator: torch.Generator) -> torch.Tensor:
        inputs, target = self.targets(x, generator)
        return self.token_loss(model.backbone, inputs, target)[0]

    def summed_loss(
        self, model: nn.Module, x: Any, generator: torch.Generator, items: int
    ) -> tuple[float, float]:
        inputs, target = self.targets(x, generator)
        loss, count = self.token_loss(model.backbone, inputs, target)
        return loss.item() * count, float(count)

    def figures(self, val_loss: float) -> dict[str, float]:
        return {"val_perplexity": float(np.exp(min(val_loss, 50.0)))}


class CausalLM(LanguageModel):
    """Next-token prediction (GPT) on a decoder: each real token predicts the one after it."""

    def targets(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        target = torch.full_like(ids, -100)
        target[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
        return inputs, target


class MaskedLM(LanguageModel):
    """Masked-token prediction (BERT) on an encoder: ``mask_rate`` of the real tokens (not
    ``<s>``, ``</s>``) are chosen; of them 80 % become ``<mask>``, 10 % a random token, 10 %
    stay as they are; the loss is on the chosen ones only."""

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        special_ids: list[int],
        mask_rate: float = 0.15,
        knn_k: int = 20,
    ) -> None:
        super().__init__(vocab_size, knn_k)
        self.mask_id, self.mask_rate, self.vocab_size = mask_id, mask_rate, vocab_size
        self.special_ids = sorted(special_ids)
        self.first_plain = max(self.special_ids) + 1  # random replacements avoid specials

    def targets(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        specials = torch.tensor(self.special_ids, device=ids.device)
        eligible = mask & ~torch.isin(ids, specials)
        draw = torch.rand(ids.shape, generator=generator).to(ids.device)
        chosen = eligible & (draw < self.mask_rate)
        # 80 / 10 / 10 of the chosen, from a second draw
        how = torch.rand(ids.shape, generator=generator).to(ids.device)
        randoms = torch.randint(
            self.first_plain, self.vocab_size, ids.shape, generator=generator
        ).to(ids.device)
        corrupted = torch.where(chosen & (how < 0.8), torch.full_like(ids, self.mask_id), ids)
        corrupted = torch.where(chosen & (how >= 0.8) & (how < 0.9), randoms, corrupted)
        target = ids.masked_fill(~chosen, -100)
        return {**inputs, "input_ids": corrupted}, target


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``2B`` normalised projections, view ``i`` and ``i + B`` being twins."""
    n = len(z) // 2
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, twins)


@torch.no_grad()
def features(
    backbone: nn.Module,
    data: DataModule | np.ndarray | torch.Tensor,
    bs: int = 1024,
    spatial: bool = False,
) -> torch.Tensor:
    """L2-normalised backbone features of a data module's items (or of uint8 images): the
    backbone's output, or with ``spatial`` its per-position representation
    (``backbone.spatial``: the CNN's last conv maps, the ViT's patch tokens) flattened."""
    if not isinstance(data, DataModule):
        data = ImageData.unlabelled(data.numpy() if isinstance(data, torch.Tensor) else data)
    backbone.eval()
    dev = next(backbone.parameters()).device
    run = backbone.spatial if spatial else backbone
    out = [run(data.to_device(b, dev).inputs).flatten(1) for b in data.sequential(bs)]
    return F.normalize(torch.cat(out).float(), dim=1)


def knn_accuracy(
    bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor, k: int
) -> float:
    """Accuracy of a cosine-similarity k-nearest-neighbour vote (weighted by similarity)."""
    k = min(k, len(bank))
    sim, idx = (query @ bank.T).topk(k, dim=1)
    bank_y, query_y = bank_y.to(query.device), query_y.to(query.device)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1, device=query.device)
    votes.scatter_add_(1, bank_y[idx], sim.clamp_min(0) + 1e-6)
    return float((votes.argmax(1) == query_y).float().mean())


Objective = (
    Supervised | MaskedAutoencoder | Contrastive | CausalLM | MaskedLM | Distillation | Consistency
)  # what graftline.train.fit takes
