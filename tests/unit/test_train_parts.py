"""The named parts of the training loop, each alone: data modules and batches, parameter
groups, accumulation, clipping, the schedule, the resume state, the device choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline import distributed
from graftline.config import TrainConfig
from graftline.data.dataset import Dataset
from graftline.data.modules import ImageData, Part
from graftline.errors import TrainingError
from graftline.models import build_classifier
from graftline.models.lora import add_adapters
from graftline.objectives import MaskedAutoencoder, Supervised
from graftline.train import (
    EarlyStopping,
    ParamGroup,
    TrainState,
    _optimizer_step,
    device_for,
    fit,
    lr_factor,
    optimizer_groups,
)
from tests.conftest import blob_digits
from tests.unit.test_models import VIT

CNN = {"arch": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.0}


def blobs(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


def test_a_module_reads_its_parts_in_the_order_asked_memory_mapped_or_not(
    tmp_path: Path,
) -> None:
    """A corpus on disk (memory-mapped, some rows only) beside a labelled set repeated
    twice: positions map to the right rows, labels and soft targets, and an epoch visits
    every position once."""
    corpus = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 10
    np.save(tmp_path / "corpus.npy", corpus)
    mapped = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    rows = np.array([1, 3, 5, 7])
    soft = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    labelled = np.full((2, 1, 1, 1), 200, np.uint8) + np.arange(2, dtype=np.uint8).reshape(
        2, 1, 1, 1
    )
    data = ImageData(
        [
            Part(mapped, np.full(4, -1), soft=soft, index=rows),
            Part(labelled, np.array([2, 1]), repeat=2),
        ],
        ["a", "b", "c"],
        {},
    )
    assert len(data) == 8
    batch = data.read(np.array([7, 0, 5, 3, 4]))
    assert batch.inputs.flatten().tolist() == [201, 10, 201, 70, 200]
    assert batch.target.tolist() == [1, -1, 1, -1, 2]
    assert batch.labelled.tolist() == [True, False, True, False, True]
    assert batch.extra["soft_mask"].tolist() == [False, True, False, True, False]
    assert batch.extra["soft"][1].tolist() == [1.0, 0.0, 0.0]  # row 1's, the first part's
    assert batch.extra["soft"][3].tolist() == [1.0, 0.0, 0.0]  # row 7's, its fourth
    seen = torch.cat(
        [b.inputs.flatten() for b in data.batches(torch.Generator().manual_seed(0), 3)]
    )
    assert sorted(seen.tolist()) == [10, 30, 50, 70, 200, 200, 201, 201]
    shards = [
        torch.cat(
            [b.inputs.flatten() for b in data.batches(torch.Generator().manual_seed(0), 4, r, 2)]
        )
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 4
    assert sorted(torch.cat(shards).tolist()) == sorted(seen.tolist())


def test_no_weight_decay_on_biases_norms_embeddings_and_tokens() -> None:
    torch.manual_seed(0)
    model = build_classifier(VIT, 1, 28, 3)
    add_adapters(model.backbone, ["qkv"], 2, 4.0)
    objective = MaskedAutoencoder(model.backbone, 1, decoder_dim=16, decoder_heads=2)
    cfg = TrainConfig(weight_decay=0.05)
    groups = optimizer_groups(
        [ParamGroup("backbone", model.backbone, 0.1), ParamGroup("head", model.head)],
        objective,
        cfg,
    )
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    names = dict(model.named_parameters()) | {
        f"objective.{k}": v for k, v in objective.named_parameters()
    }
    decayed = sorted(n for n, p in names.items() if id(p) in decay)
    assert "backbone.embed.pos" not in decayed and "backbone.embed.cls" not in decayed
    assert "objective.mask_token" not in decayed and "objective.decoder_pos" not in decayed
    assert not [n for n in decayed if n.endswith(".bias") or "norm" in n]
    # the matrices decay: projections, the patch embedding's kernel, the adapters, the head
    assert "backbone.blocks.0.attn.qkv.lora_A.default.weight" in decayed
    assert "head.weight" in decayed and "backbone.embed.patch.weight" in decayed
    assert len(decayed) > 10
    # every parameter is in exactly one group, at its group's LR
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(names)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone"] == lrs["backbone (no decay)"] == pytest.approx(cfg.lr * 0.1)


def test_accumulated_batches_equal_one_big_batch() -> None:
    """With no dropout, no batch norm and no augmentation, four batches of 5 per step are
    the maths of one batch of 20 (the epoch's last, partial step included: 44 items)."""
    train, val = blobs(15, 0), blobs(4, 1)
    train = train.subset(np.arange(44))
    base = TrainConfig(epochs=3, batch_size=20, lr=3e-3, num_threads=1, schedule="onecycle")
    weights = []
    for cfg in (base, base.model_copy(update={"batch_size": 5, "accumulate": 4})):
        torch.manual_seed(0)
        model = build_classifier(CNN, 1, 28, 3)
        result = fit(model, train, val, cfg, seed=0, progress=False)
        assert result.steps == 9  # ceil(44 / 20) steps an epoch
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=2e-6, rtol=1e-4)
    torch.manual_seed(0)
    other = build_classifier(CNN, 1, 28, 3)
    fit(other, train, val, base.model_copy(update={"batch_size": 5}), seed=0, progress=False)
    assert not torch.allclose(other.head.weight, weights[0]["head.weight"], atol=1e-4)


def test_gradients_are_clipped_to_the_configured_norm() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([30.0, 40.0])  # norm 50
    _optimizer_step(torch.optim.SGD([p], lr=1.0), [p], TrainConfig(clip_grad_norm=5.0), 1)
    torch.testing.assert_close(p.detach(), torch.tensor([-3.0, -4.0]))
    assert p.grad is None
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([30.0, 40.0])
    _optimizer_step(torch.optim.SGD([q], lr=1.0), [q], TrainConfig(), 1)
    torch.testing.assert_close(q.detach(), torch.tensor([-30.0, -40.0]))


def test_the_schedules_shape() -> None:
    assert lr_factor("none", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 11) == 1.0 and lr_factor("cosine", 10, 11) == pytest.approx(0)
    assert lr_factor("onecycle", 0, 101) == pytest.approx(0.04)
    assert lr_factor("onecycle", 20, 101) == pytest.approx(1.0)
    assert lr_factor("onecycle", 100, 101) == pytest.approx(1e-4)
    assert all(
        lr_factor("onecycle", s, 101) >= lr_factor("onecycle", s + 1, 101) for s in range(20, 100)
    )


def test_the_resume_state_round_trips_through_a_safe_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    state = TrainState(epoch=3, step=12, history=[{"epoch": 1.0, "val_loss": 0.5}])
    state.stopping = EarlyStopping(patience=2)
    state.stopping.judge(2, 0.4, 0.9, model)
    state.stopping.judge(3, 0.5, 0.8, model)
    torch.save(state.state_dict(), tmp_path / "s.pt")
    back = TrainState(stopping=EarlyStopping(patience=2))
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (back.epoch, back.step, back.history) == (3, 12, state.history)
    assert back.stopping.best_key == (0.9, -0.4) and back.stopping.best_epoch == 2
    assert back.stopping.bad_epochs == 1 and not back.stopping.stop
    back.stopping.judge(4, 0.6, 0.7, model)
    assert back.stopping.stop


def test_each_rank_trains_on_its_own_device() -> None:
    """Under torchrun with CUDA, rank r's process works on cuda:LOCAL_RANK, and its
    collectives' tensors live there too (not on cuda:0, which is every rank's "cuda")."""
    assert device_for("cuda", True, 3) == torch.device("cuda", 3)
    assert device_for("auto", True, 1) == torch.device("cuda", 1)
    assert device_for("auto", False, 1) == torch.device("cpu")
    assert device_for("cpu", True, 2) == torch.device("cpu")
    with pytest.raises(TrainingError, match="train.device: cuda"):
        device_for("cuda", False, 0)
    assert distributed.collective_device("nccl", 2) == torch.device("cuda", 2)
    assert distributed.collective_device("gloo", 2) == torch.device("cpu")


def test_a_module_without_image_augmentation_says_so() -> None:
    """A kind of input without image augmentations refuses them by key, before training."""
    from graftline.data.modules import DataModule

    module = DataModule([Part(np.zeros((2, 3)), np.zeros(2, np.int64))], ["a"], {})
    assert module.augmented({"shift": 0.0, "lowres_min": 8}) is module
    with pytest.raises(ValueError, match="train.augment: rotate, shift augment images"):
        module.augmented({"shift": 0.1, "rotate": 5.0})
    assert Supervised().val_acc_name == "val_acc"


@pytest.mark.parametrize("cfg", [CNN, VIT], ids=["cnn", "vit"])
def test_the_backbone_normalises_its_input_as_its_config_says(cfg: dict) -> None:
    """``model.normalize``: the model on [0, 1] pixels equals the same weights without it on
    inputs normalised by hand; every path through the backbone (forward, spatial) does it."""
    norm = {"mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.1]}
    torch.manual_seed(0)
    plain = build_classifier(cfg, 3, 28, 3)
    normed = build_classifier({**cfg, "normalize": norm}, 3, 28, 3)
    normed.load_state_dict(plain.state_dict())  # the same weights: the buffers are not saved
    plain.eval(), normed.eval()
    x = torch.rand(4, 3, 28, 28)
    by_hand = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normed(x), plain(by_hand))
    torch.testing.assert_close(normed.backbone.spatial(x), plain.backbone.spatial(by_hand))
    assert not torch.allclose(normed(x), plain(x))
    with pytest.raises(ValueError, match="one value per input channel"):
        build_classifier({**cfg, "normalize": norm}, 1, 28, 3)


def test_polarity_is_one_rule_for_training_files_and_served_images() -> None:
    """A digit source (polarity auto) inverts exactly the images whose border is light, the
    same way when a source reads them and when a request is served; a photo source (keep)
    never inverts."""
    from PIL import Image

    from graftline.data.transforms import apply_transform, geometry
    from graftline.serve.batch import prepare_image

    dark = np.zeros((1, 1, 28, 28), np.uint8)
    dark[0, 0, 8:20, 12:16] = 250  # a light stroke on black
    light = 255 - dark  # the same stroke, dark on paper
    digits, photos = geometry("digit_box", 28, 1), geometry("resize", 28, 1)
    assert digits["polarity"] == "auto" and photos["polarity"] == "keep"
    both = apply_transform(np.concatenate([dark, light]), digits)
    np.testing.assert_array_equal(both[0], both[1])
    served = prepare_image(Image.fromarray(light[0, 0]), digits)
    np.testing.assert_array_equal(served, both[1].astype(np.float32))
    kept = apply_transform(light, photos)
    np.testing.assert_array_equal(kept, light)
    np.testing.assert_array_equal(prepare_image(Image.fromarray(light[0, 0]), photos), light[0])


def token_rows(n: int, seed: int, width: int = 12, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 3 to ``width`` random tokens (ids 3..49), padded with ``pad``; class k
    holds token k (ids 0, 1, 2 mark the classes; 0 is also the pad, so class 0 uses id 50)."""
    rng = np.random.default_rng(seed)
    rows = np.full((n, width), pad, np.int32)
    labels = rng.integers(0, 3, n)
    for i in range(n):
        length = int(rng.integers(3, width + 1))
        rows[i, :length] = rng.integers(3, 50, length)
        rows[i, int(rng.integers(0, length))] = [50, 1, 2][labels[i]]
    return rows, labels


class BagOfTokens(torch.nn.Module):
    """The mean of the unpadded tokens' embeddings, then a linear head."""

    def __init__(self, vocab: int = 51, classes: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(inputs["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def test_token_sequences_train_through_the_same_loop(tmp_path: Path) -> None:
    """A second kind of input needs no change to fit: padded token rows (memory-mapped),
    cut to each batch's longest item, with an attention mask, train a text classifier."""
    from graftline.data.modules import TokenData

    rows, labels = token_rows(300, 0)
    np.save(tmp_path / "tokens.npy", rows)
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    classes = ["a", "b", "c"]
    train = TokenData([Part(mapped, labels)], classes, {"kind": "tokens"}, pad_id=0)
    val_rows, val_labels = token_rows(60, 1)
    val = TokenData([Part(val_rows, val_labels)], classes, {}, pad_id=0)
    batch = train.read(np.array([0, 1, 2]))
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape[1] == int((rows[:3] != 0).sum(1).max()) and torch.equal(mask, ids != 0)
    torch.manual_seed(0)
    model = BagOfTokens()
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.02, num_threads=1)
    result = fit(model, train, val, cfg, seed=0, progress=False)
    assert result.best_val_acc is not None and result.best_val_acc > 0.9
    with pytest.raises(ValueError, match="train.augment: shift augment images; text inputs"):
        train.augmented({"shift": 0.1})
