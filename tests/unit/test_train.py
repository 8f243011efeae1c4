"""The training loop: determinism, resume, freezing, failure on a non-finite loss."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import Augment, TrainConfig
from graftline.data.dataset import Dataset
from graftline.errors import TrainingError
from graftline.models import build_classifier
from graftline.train import ParamGroup, fit, predict_proba
from tests.conftest import blob_digits

MODEL = {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.25}


def data(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


CFG = TrainConfig(
    epochs=4, batch_size=16, lr=3e-3, augment=Augment(shift=0.1, rotate=10), num_threads=1
)


def fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(MODEL, 1, 28, 3)


def test_learns_held_out_data() -> None:
    model = fresh()
    fit(model, data(30, 0), data(10, 1), CFG, seed=0, progress=False)
    test = data(20, 2)
    acc = (predict_proba(model, test.images).argmax(1) == test.labels).mean()
    assert acc > 0.9


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_after_crash_matches_uninterrupted(tmp_path: Path, ema: float | None) -> None:
    train, val = data(20, 0), data(6, 1)
    cfg = CFG.model_copy(update={"ema": ema})
    full = fresh()
    fit(full, train, val, cfg, seed=3, progress=False)

    class Crash(Exception):
        pass

    def crash_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Crash

    ckpt = tmp_path / "last.pt"
    interrupted = fresh()
    with pytest.raises(Crash):
        fit(
            interrupted,
            train,
            val,
            cfg,
            seed=3,
            resume_path=ckpt,
            fingerprint="run",
            on_epoch_end=crash_after_two,
            progress=False,
        )
    assert ckpt.exists()
    resumed = fresh()  # a new process would start from fresh weights
    result = fit(
        resumed, train, val, cfg, seed=3, resume_path=ckpt, fingerprint="run", progress=False
    )
    assert result.resumed_from == 2
    assert len(result.history) == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_ema_keeps_the_moving_average_of_the_weights() -> None:
    # One step per epoch and no validation: the weights after each epoch are the weights
    # after each step, and EMA does not change them, so a plain run gives the trajectory.
    train = data(16, 0)
    cfg = CFG.model_copy(update={"batch_size": len(train), "epochs": 5})
    plain, trajectory = fresh(), []

    def snapshot(_: dict) -> None:
        trajectory.append({k: v.detach().clone() for k, v in plain.named_parameters()})

    fit(plain, train, None, cfg, seed=1, on_epoch_end=snapshot, progress=False)
    averaged = fresh()
    fit(averaged, train, None, cfg.model_copy(update={"ema": 0.6}), seed=1, progress=False)
    expected = dict(trajectory[0])  # the first update copies the weights
    for w in trajectory[1:]:
        expected = {k: 0.6 * expected[k] + 0.4 * w[k] for k in w}
    for k, v in averaged.named_parameters():
        torch.testing.assert_close(v, expected[k], msg=k)
    last = dict(plain.named_parameters())
    assert any(not torch.allclose(v, last[k]) for k, v in averaged.named_parameters())


def test_checkpoint_of_another_run_is_ignored(tmp_path: Path) -> None:
    train, val = data(10, 0), data(4, 1)
    ckpt = tmp_path / "last.pt"
    fit(fresh(), train, val, CFG, seed=0, resume_path=ckpt, fingerprint="a", progress=False)
    result = fit(
        fresh(), train, val, CFG, seed=0, resume_path=ckpt, fingerprint="b", progress=False
    )
    assert result.resumed_from is None and len(result.history) == 4


def test_non_finite_loss_stops_with_a_clear_error() -> None:
    cfg = CFG.model_copy(update={"lr": 1e30, "optimizer": "sgd", "epochs": 3})
    with pytest.raises(TrainingError, match="non-finite loss .* lower the learning rate"):
        fit(fresh(), data(20, 0), None, cfg, seed=0, progress=False)


def test_frozen_group_does_not_move_and_unfreezes_later() -> None:
    model = fresh()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    probe = [ParamGroup("backbone", model.backbone, 1.0, math.inf), ParamGroup("head", model.head)]
    fit(model, data(10, 0), data(4, 1), CFG, seed=0, groups=probe, progress=False)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k

    def check(record: dict) -> None:
        moved = any(not torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
        assert moved == (record["epoch"] > 2)

    gradual = [ParamGroup("backbone", model.backbone, 0.1, 2), ParamGroup("head", model.head)]
    fit(model, data(10, 0), None, CFG, seed=0, groups=gradual, on_epoch_end=check, progress=False)


def test_early_stopping_keeps_best_weights() -> None:
    cfg = CFG.model_copy(update={"epochs": 30, "patience": 2, "lr": 1e-2})
    model = fresh()
    result = fit(model, data(20, 0), data(6, 1), cfg, seed=0, progress=False)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2
    val = data(6, 1)
    acc = (predict_proba(model, val.images).argmax(1) == val.labels).mean()
    assert acc == pytest.approx(result.best_val_acc)


def test_keep_last_leaves_the_final_weights_whatever_validation_prefers() -> None:
    # Validation on wrong labels prefers an early, unsure epoch; keep: last ignores it.
    train, val = data(20, 0), data(6, 1)
    val = Dataset(val.images, (val.labels + 1) % 3, val.classes, "wrong labels")
    cfg = CFG.model_copy(update={"epochs": 6, "lr": 1e-2, "keep": "last"})
    model, final = fresh(), {}

    def snapshot(_: dict) -> None:
        final.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = fit(model, train, val, cfg, seed=0, on_epoch_end=snapshot, progress=False)
    assert result.best_epoch == 6
    assert result.best_val_acc == result.history[-1]["val_acc"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    best = fresh()
    judged = fit(best, train, val, cfg.model_copy(update={"keep": "best"}), seed=0, progress=False)
    assert judged.best_epoch < 6
    assert any(not torch.equal(v, final[k]) for k, v in best.state_dict().items())


def test_bf16_mixed_precision_learns_and_is_deterministic() -> None:
    cfg = CFG.model_copy(update={"precision": "bf16"})
    a, b = fresh(), fresh()
    fit(a, data(30, 0), data(10, 1), cfg, seed=0, progress=False)
    fit(b, data(30, 0), data(10, 1), cfg, seed=0, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
        if va.is_floating_point():
            assert va.dtype == torch.float32, k  # autocast: the weights stay fp32
    test = data(20, 2)
    assert (predict_proba(a, test.images).argmax(1) == test.labels).mean() > 0.9


def test_trained_weights_come_back_in_the_usual_layout() -> None:
    # fit trains in channels_last for speed; checkpoints and callers get contiguous NCHW
    model = fresh()
    fit(model, data(10, 0), data(4, 1), CFG, seed=0, progress=False)
    for k, v in model.state_dict().items():
        assert v.is_contiguous(), k


def test_device_auto_trains_on_the_cpu_here_and_cuda_without_one_is_a_clear_error() -> None:
    """`train.device`: auto picks CUDA only when there is one (the tests never need it), and
    trains exactly as cpu does; asking for cuda on a machine without it fails by name."""
    from graftline.train import resolve_device

    if torch.cuda.is_available():  # pragma: no cover - the GPU machine
        assert resolve_device("auto").type == "cuda"
        return
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TrainingError, match="train.device: cuda, but PyTorch sees no CUDA"):
        resolve_device("cuda")
    weights = []
    for device in ("cpu", "auto"):
        torch.manual_seed(0)
        model = build_classifier(
            {"arch": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}, 1, 28, 3
        )
        fit(
            model,
            data(4, 0),
            data(2, 1),
            TrainConfig(epochs=1, batch_size=8, device=device),
            seed=0,
        )
        weights.append(list(model.state_dict().values()))
        assert next(model.parameters()).device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
