"""Pretraining objectives: masked autoencoding learns without labels, hides what it should,
and reports the k-NN accuracy of its features."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import ConfigError, TrainConfig, parse_params
from graftline.data.dataset import Dataset
from graftline.data.modules import Batch
from graftline.models import build_classifier
from graftline.objectives import (
    Consistency,
    Contrastive,
    MaskedAutoencoder,
    knn_accuracy,
    nt_xent,
    patchify,
)
from graftline.train import fit
from tests.conftest import blob_digits

VIT = {"arch": "vit", "patch_size": 7, "dim": 32, "depth": 2, "heads": 4}
VIT |= {"mlp_ratio": 2.0, "dropout": 0.0, "pool": "mean"}


def blobs(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


def mae_fit(train: Dataset, epochs: int = 15) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = build_classifier(VIT, 1, 28, 3)
    # raw pixels: the blobs' noise makes per-patch normalised targets mostly unpredictable
    objective = MaskedAutoencoder(model.backbone, 1, decoder_dim=32, knn_k=5, norm_pix_loss=False)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, num_threads=1)
    result = fit(model, train, blobs(10, 1), cfg, seed=0, objective=objective, progress=False)
    return model, result.history


def test_mae_learns_without_using_the_labels() -> None:
    train = blobs(20, 0)
    _, history = mae_fit(train)
    # The reconstruction of hidden validation patches improves, and the features it learns
    # separate the classes better (k-NN on the validation split) than after the first epoch.
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    best = max(h["val_knn_acc"] for h in history)
    assert best >= 0.8 and best > history[0]["val_knn_acc"] + 0.1
    # ...and does not depend on the labels: permuted labels give the same training losses.
    shuffled = Dataset(
        train.images, np.random.default_rng(1).permutation(train.labels), train.classes, "x"
    )
    _, again = mae_fit(shuffled)
    assert [h["train_loss"] for h in again] == [h["train_loss"] for h in history]
    # The monitor: k-NN accuracy of the features on the validation split, every epoch.
    assert all(0.0 <= h["val_knn_acc"] <= 1.0 for h in history)
    assert "train_acc" not in history[0] and "val_acc" not in history[0]


def test_mae_loss_counts_the_hidden_patches_only() -> None:
    """Changing the pixels of visible patches changes the input but not the target of the
    loss; changing a hidden patch's pixels changes it."""
    torch.manual_seed(0)
    model = build_classifier(VIT, 1, 28, 3)
    mae = MaskedAutoencoder(model.backbone, 1, mask_ratio=0.75, decoder_dim=32, norm_pix_loss=False)
    x = torch.rand(1, 1, 28, 28)
    n = model.backbone.num_patches
    keep = int(n * 0.25)
    order = torch.rand(1, n, generator=torch.Generator().manual_seed(5)).argsort(1)[0]
    hidden = order[keep:]
    target = patchify(x, 7)
    assert target.shape == (1, 16, 49)

    def loss_with(pred: torch.Tensor) -> float:
        # the decoder's output replaced by ``pred``: the loss is its error on hidden patches
        mae.decoder_pred.forward = lambda _h: pred  # type: ignore[method-assign]
        return mae.reconstruction_loss(model.backbone, x, torch.Generator().manual_seed(5)).item()

    perfect = target.clone()
    assert loss_with(perfect) == pytest.approx(0.0, abs=1e-9)
    wrong_visible = perfect.clone()
    wrong_visible[0, order[:keep]] += 1.0
    assert loss_with(wrong_visible) == pytest.approx(0.0, abs=1e-9)
    wrong_hidden = perfect.clone()
    wrong_hidden[0, hidden[0]] += 1.0
    assert loss_with(wrong_hidden) == pytest.approx(1.0 / len(hidden), rel=1e-5)


def test_knn_accuracy_votes_by_cosine_similarity() -> None:
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.1, 1.0]]), dim=1)
    assert knn_accuracy(bank, labels, query, torch.tensor([0, 1]), k=1) == 1.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1, 0]), k=1) == 0.0


def test_mae_needs_a_vit_and_contrastive_takes_any_backbone() -> None:
    with pytest.raises(ConfigError, match="objective mae needs model.arch vit"):
        parse_params({"pretrain": {"objective": "mae"}})
    params = parse_params({"pretrain": {"objective": "mae", "model": VIT}})
    assert params.pretrain.mae.mask_ratio == 0.75
    params = parse_params({"pretrain": {"objective": "contrastive"}})
    assert params.pretrain.model.arch == "cnn" and params.pretrain.contrastive.temperature == 0.2
    with pytest.raises(ConfigError, match="pretrain.contrastive.temperature"):
        parse_params({"pretrain": {"objective": "contrastive", "contrastive": {"temperature": 0}}})


def test_contrastive_learns_on_a_cnn_without_the_labels() -> None:
    """SimCLR on the CNN: its NT-Xent loss falls, the labels change nothing of it, and the
    k-NN monitor reports every epoch."""
    cnn = {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0}

    def run(train: Dataset) -> list[dict[str, float]]:
        torch.manual_seed(0)
        model = build_classifier(cnn, 1, 28, 3)
        objective = Contrastive(model.backbone.out_features, proj_dim=16, knn_k=5)
        cfg = TrainConfig(epochs=8, batch_size=20, lr=3e-3, num_threads=1)
        return fit(model, train, blobs(10, 1), cfg, seed=0, objective=objective).history

    train = blobs(20, 0)
    history = run(train)
    chance = math.log(2 * 20 - 1)  # NT-Xent when the twin is no likelier than the others
    assert history[0]["train_loss"] > 0.95 * chance > 0.85 * chance > history[-1]["train_loss"]
    assert all(0.0 <= h["val_knn_acc"] <= 1.0 for h in history)
    shuffled = Dataset(
        train.images, np.random.default_rng(1).permutation(train.labels), train.classes, "x"
    )
    assert [h["train_loss"] for h in run(shuffled)] == [h["train_loss"] for h in history]


def test_nt_xent_is_low_when_twins_agree_and_high_when_they_do_not() -> None:
    a = torch.nn.functional.normalize(torch.eye(4), dim=1)
    agree = nt_xent(torch.cat([a, a]), temperature=0.1)
    swapped = nt_xent(torch.cat([a, a.roll(1, dims=0)]), temperature=0.1)
    assert agree < 0.01 < 5 < swapped


def test_distillation_loss_is_the_softened_kl_plus_the_labels_cross_entropy() -> None:
    from graftline.objectives import Distillation

    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 3)
    t = 3.0
    soft = torch.softmax(teacher_logits / t, dim=1)
    hard = torch.tensor([2, 0])
    obj = Distillation(temperature=t, hard_weight=0.5)
    gen = torch.Generator().manual_seed(0)

    class Fixed(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits

    # six soft items, then two labelled ones
    target = torch.tensor([-1] * 6 + hard.tolist())
    soft_mask = torch.arange(8) < 6
    batch = Batch(
        torch.zeros(8, 1),
        target,
        target >= 0,
        {"soft": torch.cat([soft, torch.zeros(2, 3)]), "soft_mask": soft_mask},
    )
    student = torch.cat([teacher_logits, torch.randn(2, 3)])
    loss, _ = obj.step(Fixed(student), batch, gen)
    ce = torch.nn.functional.cross_entropy(student[6:], hard, reduction="sum")
    # A student that already matches the teacher pays only the labelled items' term.
    torch.testing.assert_close(loss, 0.5 * ce / 8, atol=1e-5, rtol=1e-4)
    shuffled = torch.cat([teacher_logits[[3, 4, 5, 0, 1, 2]], student[6:]])
    worse, _ = obj.step(Fixed(shuffled), batch, gen)
    assert worse > loss + 0.01
    worse.backward()


def test_consistency_strong_view_is_another_image_with_a_blank_square() -> None:
    obj = Consistency(strong={"shift": 0.2, "rotate": 25}, cutout=10)
    x = torch.ones(16, 1, 28, 28)
    strong = obj.strong_view(x, torch.Generator().manual_seed(0))
    assert strong.shape == x.shape
    # the square is 9 x 9 pixels where it lies inside the image, fewer at an edge
    blank = (strong == 0).flatten(1).sum(1)
    assert (blank > 0).all() and (blank >= 81).float().mean() > 0.5
    plain = Consistency(strong={"rotate": 25}, cutout=0).strong_view(
        torch.rand(4, 1, 28, 28), torch.Generator().manual_seed(0)
    )
    assert plain.shape == (4, 1, 28, 28)


def test_consistency_targets_only_confident_predictions_of_the_weak_view() -> None:
    """Labelled items (label >= 0) get cross-entropy; unlabelled ones (-1) count only where
    the model's prediction on the batch reaches the threshold."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    x = torch.rand(12, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0] + [-1] * 8)
    ce = torch.nn.functional.cross_entropy(model(x[:4]), y[:4])
    with torch.no_grad():
        confidence = torch.softmax(model(x[4:]), 1).max(1).values
    strict = Consistency(threshold=float(confidence.max()) + 1e-6, strong={}, cutout=0)
    loss, _ = strict.step(model, Batch(x, y, y >= 0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ce)  # nothing confident enough: the labels alone
    assert strict.masked_share == 0.0
    # Everything confident, no augmentation: each unlabelled item is its own target.
    lax = Consistency(threshold=1e-6, weight=0.5, strong={}, cutout=0)
    loss, _ = lax.step(model, Batch(x, y, y >= 0), torch.Generator().manual_seed(0))
    logits = model(x[4:])
    own = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
    torch.testing.assert_close(loss, ce + 0.5 * own)
    assert lax.masked_share == 1.0
    loss.backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_consistency_augments_labelled_items_further_only_when_asked() -> None:
    """``labelled``: the labelled items reach the model through one more augmentation (the
    loop's weak one came first); the unlabelled items' targets and views are unchanged."""
    seen: list[torch.Tensor] = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()) if m.training else None)
    x = torch.zeros(12, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0  # a bar, which a rotation moves
    y = torch.tensor([0, 1, 2] * 3 + [-1] * 3)
    batch = Batch(x, y, y >= 0)
    Consistency(threshold=0.0, strong={}, cutout=0).step(model, batch, torch.Generator())
    torch.testing.assert_close(seen[-1][:9], x[:9])
    more = Consistency(threshold=0.0, strong={}, cutout=0, labelled={"rotate": 30})
    more.step(model, batch, torch.Generator().manual_seed(0))
    moved = (seen[-1][:9] - x[:9]).abs().flatten(1).sum(1)
    assert (moved > 1).sum() >= 6, moved  # random angles in [-30, 30]: a few may be small
    torch.testing.assert_close(seen[-1][9:], x[9:])  # the strong view (no augmentation) as is


def test_distill_stage_student_learns_the_teachers_soft_labels(tmp_path: Path) -> None:
    """Stage-level: the student, a smaller CNN, sees one label per class but agrees with the teacher on
    the corpus far beyond what those labels alone would give; off, the stage writes a note."""
    from graftline.data.store import save_splits
    from graftline.models import save_checkpoint
    from graftline.models.checkpoint import read_checkpoint
    from tasks import distill

    k = 8  # bars 22.5 degrees apart: one label per class is not enough to tell them apart
    names = [str(i) for i in range(k)]
    x, y = blob_digits(30, classes=k, seed=0)
    corpus = Dataset(x[:, None], y.astype(np.int64), names, "blobs")
    save_splits(tmp_path / "pre", {"train": corpus, "val": corpus.subset(np.arange(10))}, {})
    vx, vy = blob_digits(5, classes=k, seed=1)
    val = Dataset(vx[:, None], vy.astype(np.int64), names, "blobs-val")
    few = corpus.subset(np.arange(0, 30 * k, 30))
    save_splits(tmp_path / "task", {"train": few, "val": val, "test": val}, {})
    cnn = {"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.0}
    torch.manual_seed(0)
    teacher = build_classifier(cnn, 1, 28, k)
    fit(teacher, corpus, val, TrainConfig(epochs=4, batch_size=16, lr=0.01, num_threads=1), seed=0)
    save_checkpoint(
        tmp_path / "teacher" / "model.pt",
        teacher,
        model_config=cnn,
        classes=names,
        input_shape=(1, 28, 28),
    )
    student_cfg = {"arch": "cnn", "channels": [4], "hidden": 16, "dropout": 0.0}
    params = parse_params(
        {
            "distill": {
                "enabled": True,
                "temperature": 2.0,
                "model": student_cfg,
                "train": {"epochs": 10, "batch_size": 16, "lr": 0.01, "num_threads": 1},
            }
        }
    )
    kw = {
        "corpus": tmp_path / "pre",
        "data": tmp_path / "task",
        "teacher": tmp_path / "teacher",
        "reports": tmp_path / "rep",
        "checkpoints": tmp_path / "ck",
    }
    result = distill.run(params, out=tmp_path / "student", **kw)
    assert result["metrics"]["corpus_images"] == 30 * k
    assert result["metrics"]["labelled_images"] == k
    assert result["metrics"]["student_teacher_size"] < 1
    ckpt = read_checkpoint(tmp_path / "student" / "model.pt")
    assert ckpt["model_config"]["channels"] == [4] and ckpt["stage"] == "distill"
    from graftline.models.checkpoint import load_checkpoint
    from graftline.train import predict_proba

    student, _ = load_checkpoint(tmp_path / "student" / "model.pt")
    ox, _ = blob_digits(10, classes=k, seed=7)  # images neither model trained on
    agree = np.mean(
        predict_proba(student, ox[:, None]).argmax(1)
        == predict_proba(teacher, ox[:, None]).argmax(1)
    )
    assert agree > 0.75, (agree, result["metrics"])
    torch.manual_seed(0)  # the same student trained on those labels alone does worse
    alone = build_classifier(student_cfg, 1, 28, k)
    fit(alone, few, val, params.distill.train, seed=0)
    alone_agree = np.mean(
        predict_proba(alone, ox[:, None]).argmax(1) == predict_proba(teacher, ox[:, None]).argmax(1)
    )
    assert alone_agree < agree - 0.1, (alone_agree, agree)

    # Then consistency on the corpus, FixMatch's way (a weak view of its own, an elastic
    # strong view, the final moving average kept), then a round of label propagation: the
    # student goes on from the distilled weights, the history and the metrics say so, and it
    # still agrees with the teacher.
    raw = params.model_dump()
    raw["distill"]["consistency"] = {
        "epochs": 3,
        "threshold": 0.8,
        "weak": {"shift": 0.05},
        "strong": {"shift": 0.1, "elastic": 20},
        "ema": 0.9,
        "keep": "last",
    }
    raw["distill"]["propagate"] = {
        "rounds": 1,
        "features": "output",
        "neighbours": 10,
        "epochs": 2,
        "lr": 0.01,
    }
    more = parse_params(raw)
    again = distill.run(more, out=tmp_path / "student2", **kw)
    assert again["metrics"]["consistency_epochs"] == 3
    assert again["metrics"]["propagate_rounds"] == 1
    assert 0 <= again["metrics"]["propagate_changed"] < 0.5
    assert again["metrics"]["best_epoch"] == 2  # each propagation round keeps its last epoch
    assert again["metrics"]["distilled_val_acc"] == result["metrics"]["val_acc"]
    assert len(again["history"]["student"]) == len(result["history"]["student"]) + 3 + 2
    student2, _ = load_checkpoint(tmp_path / "student2" / "model.pt")
    agree2 = np.mean(
        predict_proba(student2, ox[:, None]).argmax(1)
        == predict_proba(teacher, ox[:, None]).argmax(1)
    )
    assert agree2 > 0.75, (agree2, again["metrics"])

    # the graph over the spatial representation (the conv maps, reduced to 8 components)
    raw["distill"]["propagate"].update(features="spatial", pca=8)
    spatial = distill.run(parse_params(raw), out=tmp_path / "student3", **kw)
    assert spatial["metrics"]["propagate_rounds"] == 1
    assert 0 <= spatial["metrics"]["propagate_changed"] < 0.5

    off = parse_params({})
    distill.run(off, out=tmp_path / "off", **kw)
    assert [p.name for p in (tmp_path / "off").iterdir()] == ["off.json"]


def test_a_pretrained_student_starts_from_the_pretrained_backbone(tmp_path: Path) -> None:
    """``distill.init: pretrained``: the student is the pretrained backbone with a fresh head
    (its first step moves it by a hair), not a network from scratch; with another
    architecture asked for, the params say why it cannot be."""
    from graftline.config import ConfigError
    from graftline.data.store import save_splits
    from graftline.models import save_checkpoint
    from graftline.models.checkpoint import load_checkpoint
    from tasks import distill

    names = ["0", "1", "2"]
    x, y = blob_digits(10, classes=3, seed=0)
    corpus = Dataset(x[:, None], y.astype(np.int64), names, "blobs")
    save_splits(tmp_path / "pre", {"train": corpus, "val": corpus.subset(np.arange(5))}, {})
    few = corpus.subset(np.arange(0, 30, 5))
    save_splits(tmp_path / "task", {"train": few, "val": few, "test": few}, {})
    cnn = {"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.0}
    torch.manual_seed(1)
    backbone = build_classifier(cnn, 1, 28, 0)  # a backbone as pretrain writes it
    save_checkpoint(
        tmp_path / "pretrained" / "model.pt",
        backbone,
        model_config=cnn,
        classes=[],
        input_shape=(1, 28, 28),
    )
    teacher = build_classifier(cnn, 1, 28, 3)
    save_checkpoint(
        tmp_path / "teacher" / "model.pt",
        teacher,
        model_config=cnn,
        classes=names,
        input_shape=(1, 28, 28),
    )
    kw = {
        "corpus": tmp_path / "pre",
        "data": tmp_path / "task",
        "teacher": tmp_path / "teacher",
        "pretrained": tmp_path / "pretrained",
        "reports": tmp_path / "rep",
        "checkpoints": tmp_path / "ck",
    }
    one_step = {"epochs": 1, "max_steps": 1, "batch_size": 8, "lr": 1e-6, "num_threads": 1}
    for init in ("pretrained", "scratch"):
        params = parse_params({"distill": {"enabled": True, "init": init, "train": one_step}})
        distill.run(params, out=tmp_path / init, **kw)
        student, ckpt = load_checkpoint(tmp_path / init / "model.pt")
        assert ckpt["model_config"]["channels"] == [8]
        start = backbone.backbone.state_dict()
        moved = max(
            float((v - start[k]).abs().max()) for k, v in student.backbone.state_dict().items()
        )
        if init == "pretrained":
            assert moved < 1e-4, moved
        else:
            assert moved > 1e-2, moved
    with pytest.raises(ConfigError, match="distill.init: pretrained .* leave distill.model unset"):
        parse_params({"distill": {"init": "pretrained", "model": cnn}})
