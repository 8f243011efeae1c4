"""One training loop for pretraining and fine-tuning.

Pretrain and fine-tune differ only in what they pass in: the model (a fresh one, or a
pretrained backbone with a new head), the parameter groups (which parts train, at which LR
and from which epoch) and the :class:`~graftline.config.TrainConfig`.

The loop is seeded and deterministic on CPU: the shuffling, augmentation and dropout of
epoch ``e`` depend only on ``(seed, e)``, so a run resumed from the checkpoint of epoch ``e``
ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from graftline import distributed
from graftline.config import TrainConfig
from graftline.data.dataset import Dataset
from graftline.data.transforms import augment_batch
from graftline.errors import TrainingError
from graftline.io import atomic_path, read_rows
from graftline.objectives import Objective, Supervised, to_float

log = logging.getLogger(__name__)

RESUME_FORMAT = "graftline.resume/1"


@dataclass
class ParamGroup:
    """A part of the model trained together.

    ``frozen_epochs``: the group is frozen (no gradient, eval mode) for the first that many
    epochs; ``math.inf`` keeps it frozen throughout (a linear probe's backbone).
    """

    name: str
    module: nn.Module
    lr_scale: float = 1.0
    frozen_epochs: float = 0


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float | None
    stopped_early: bool
    resumed_from: int | None
    images_per_s: float
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _seed_for(seed: int, epoch: int) -> int:
    # Distinct, reproducible streams per (seed, epoch); no dependence on earlier epochs.
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "none" or total <= 1:
        return 1.0
    t = min(step / (total - 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    # one-cycle: linear warm-up over the first 20% from lr/25, then cosine down to ~lr/1e4.
    warm = 0.2
    if t < warm:
        return 0.04 + 0.96 * t / warm
    u = (t - warm) / (1 - warm)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * u))


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (this rank's GPU under torchrun) or ``auto`` (CUDA when present).

    Raises:
        TrainingError: ``cuda`` was asked for and there is none.
    """
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise TrainingError("train.device: cuda, but PyTorch sees no CUDA device here")
    if name == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: np.ndarray, batch_size: int = 1024, temperature: float = 1.0
) -> np.ndarray:
    """Class probabilities for ``(N, C, H, W)`` pixels in [0, 255], uint8 or float; softened
    by ``temperature`` (a distillation teacher's soft targets) when above 1."""
    model.eval()
    dev = next(model.parameters()).device
    # a batch at a time from the array (memory-mapped or not); not to_float: that divides in
    # place, and float input shares the caller's memory
    out = [
        F.softmax(
            model(
                torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev).float()
                / 255.0
            )
            / temperature,
            dim=1,
        ).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _read_resume(path: Path, desc: str) -> dict[str, Any] | None:
    """The resume checkpoint at ``path``, or None when there is none or it cannot be read
    safely (truncated, or carrying pickled objects): training then starts afresh."""
    # Half-written checkpoints of a killed run (atomic writes leave them beside the real one,
    # under a temporary name); one training at a time writes here, so none is in use.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        log.warning("%s: ignoring %s: not a readable, safe checkpoint (%s)", desc, path, err)
        return None
    return state if isinstance(state, dict) else None


def fit(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    cfg: TrainConfig,
    *,
    seed: int,
    groups: list[ParamGroup] | None = None,
    resume_path: Path | str | None = None,
    fingerprint: str = "",
    desc: str = "train",
    progress: bool | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    objective: Objective | None = None,
    probe: tuple[Dataset, Dataset] | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights (or, with
    ``cfg.keep: last``, the final ones; with ``cfg.ema``, those of the moving average).

    Args:
        model: the network; trained on ``train``, early-stopped on ``val``.
        cfg: epochs, batch size, optimizer, LR schedule, augmentation, patience.
        seed: drives shuffling, augmentation, dropout.
        groups: parameter groups (default: the whole model at ``cfg.lr``).
        resume_path: checkpoint written after every epoch; if it exists and its fingerprint
            matches, training resumes after its epoch.
        fingerprint: identifies the run (params + data); a checkpoint of another run is ignored.
        progress: show a progress bar (default: when stderr is a terminal).
        on_epoch_end: called with each epoch's record (metrics logging, tests).
        objective: the loss of a batch and the validation figures
            (``graftline.objectives``; default: supervised cross-entropy). Its own
            parameters (a decoder) train beside the model and are saved in the resume
            checkpoint.
        probe: labelled (bank, queries) for a self-supervised objective's k-NN monitor when
            ``train`` and ``val`` have no labels (default: ``train`` and ``val`` themselves).
    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:  # cuBLAS is deterministic only with a fixed workspace, set before it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # On CUDA a few ops (scatter_add in the k-NN monitor) have no deterministic kernel: warn.
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    # Deterministic mode also fills every new tensor with NaN to expose reads of
    # uninitialised memory; no op used here reads it, and the filling cost ~25% of a step.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    # NHWC: oneDNN's convolutions run about 1.5x faster on CPU than in NCHW.
    layout = torch.channels_last if train.images.ndim == 4 else torch.contiguous_format
    model.to(device=device, memory_format=layout)
    groups = groups or [ParamGroup("model", model)]
    # A memory-mapped corpus (data.store.load_split(mmap=True)) stays on disk: each batch's
    # rows are read from it (io.read_rows), so a corpus larger than memory trains. An
    # in-memory one is indexed as a tensor.
    images = train.images
    x = None if isinstance(images, np.memmap) else torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(train.labels.astype(np.int64))
    xv = yv = None
    if val is not None and len(val):
        xv = torch.from_numpy(np.ascontiguousarray(val.images))
        yv = torch.from_numpy(val.labels.astype(np.int64))
    knn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if probe is not None:
        knn = {
            name: (torch.from_numpy(np.ascontiguousarray(d.images)), torch.from_numpy(d.labels))
            for name, d in zip(("bank", "query"), probe, strict=True)
        }
    n = len(images)
    some = torch.arange(n)[:: max(1, n // 5000)]  # the k-NN monitor's bank, at most ~5,000
    bank_x = x[some] if x is not None else torch.from_numpy(read_rows(images, some.numpy()))
    bank_y = y[some]
    # Under torchrun each rank takes an equal, seeded shard of every epoch's permutation and
    # a batch_size / world share of each batch (graftline.distributed).
    world, rank = distributed.world_size(), distributed.rank()
    shard = n // world if world > 1 else n
    bs = min(max(1, cfg.batch_size // world), shard)
    steps_per_epoch = math.ceil(shard / bs)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    objective = objective if objective is not None else Supervised(cfg.label_smoothing)
    objective.to(device)
    param_groups = [
        {"params": [p for p in g.module.parameters()], "lr": cfg.lr * g.lr_scale, "name": g.name}
        for g in groups
    ]
    if any(True for _ in objective.parameters()):
        param_groups.append(
            {"params": list(objective.parameters()), "lr": cfg.lr, "name": "objective"}
        )
    opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kwargs.update(momentum=0.9, nesterov=True)
    optimizer = opt_cls[cfg.optimizer](param_groups, lr=cfg.lr, **kwargs)
    trainable = [t for g in param_groups for t in g["params"]]
    # cfg.ema: an exponential moving average of the weights (PyTorch's AveragedModel) is
    # what validation judges and what training leaves in the model.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema
        else None
    )
    judged = ema.module if ema is not None else model
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] | None = None
    best_epoch, bad_epochs, start_epoch, step = -1, 0, 0, 0
    resumed_from = None
    resume_path = Path(resume_path) if resume_path else None
    state = _read_resume(resume_path, desc) if resume_path is not None else None
    if state is not None:
        if state.get("format") == RESUME_FORMAT and state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            objective.load_state_dict(state.get("objective", {}))
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            history = list(state["history"])
            best_state = state["best_state"]
            best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
            best_epoch, bad_epochs = state["best_epoch"], state["bad_epochs"]
            start_epoch, step = state["epoch"] + 1, state["step"]
            resumed_from = state["epoch"]
            log.info("%s: resuming after epoch %d from %s", desc, resumed_from + 1, resume_path)
        else:
            log.info("%s: ignoring %s (from another run)", desc, resume_path)

    stopped_early = bool(history) and bad_epochs >= (cfg.patience or math.inf)
    train_time, train_images = 0.0, 0
    started = last_line = time.monotonic()
    for epoch in range(start_epoch, epochs):
        if stopped_early or step >= total_steps:
            break
        for g in groups:
            frozen = epoch < g.frozen_epochs
            g.module.requires_grad_(not frozen)
        model.train()
        objective.train()
        for g in groups:
            if epoch < g.frozen_epochs:
                g.module.eval()  # frozen parts keep their BatchNorm statistics and no dropout
        torch.manual_seed(_seed_for(seed, epoch))
        gen = torch.Generator().manual_seed(_seed_for(seed, epoch) + 1)
        perm = torch.randperm(n, generator=gen)
        if world > 1:
            perm = perm[rank::world][:shard]
        run_loss, run_correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{desc} {epoch + 1}/{epochs}",
            disable=(not progress) if progress is not None else None,
            leave=False,
            unit="batch",
        )
        for b in bar:
            if step >= total_steps:
                break
            factor = _lr_factor(cfg.schedule, step, total_steps)
            for pg, base in zip(optimizer.param_groups, base_lrs, strict=True):
                pg["lr"] = base * factor
            idx = perm[b * bs : (b + 1) * bs]
            raw = x[idx] if x is not None else torch.from_numpy(read_rows(images, idx.numpy()))
            yb = y[idx]
            if cuda:  # uint8 through pinned memory, converted and augmented on the GPU
                raw = raw.pin_memory().to(device, non_blocking=True)
                yb = yb.pin_memory().to(device, non_blocking=True)
            xb = to_float(raw)
            xb = augment_batch(xb, gen, **cfg.augment.model_dump())
            xb = xb.contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, predicted = objective.step(model, xb, yb, gen)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{desc}: non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}; "
                    f"lower the learning rate (lr={cfg.lr}) or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                distributed.average_gradients(trainable)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            run_loss += loss.item() * len(idx)
            if predicted is not None:
                run_correct += (predicted == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{run_loss / seen:.4f}", acc=f"{run_correct / seen:.3f}")
        bar.close()
        elapsed = time.perf_counter() - t0
        train_time += elapsed
        train_images += seen
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(seen, 1),
            "train_acc": run_correct / max(seen, 1),
            "lr": base_lrs[len(groups) - 1]
            * _lr_factor(cfg.schedule, max(step - 1, 0), total_steps),
            "seconds": elapsed,
        }
        if not objective.reports_train_acc:
            del record["train_acc"]
        if xv is not None:
            if world > 1:  # rank 0 validates; every rank takes its decision from the figures
                distributed.broadcast_buffers(judged)
                vloss, vacc = (
                    objective.validate(judged, xv, yv, x=bank_x, y=bank_y, **knn)
                    if rank == 0
                    else (0.0, 0.0)
                )
                vloss, vacc = distributed.broadcast_floats(vloss, vacc)
            else:
                vloss, vacc = objective.validate(judged, xv, yv, x=bank_x, y=bank_y, **knn)
            record.update({"val_loss": vloss, objective.val_acc_name: vacc})
            key = (vacc, -vloss)
            if best_key is None or key > best_key:
                best_key, best_epoch, bad_epochs = key, epoch, 0
                best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
            else:
                bad_epochs += 1
                if cfg.patience and bad_epochs >= cfg.patience:
                    stopped_early = True
        history.append(record)
        # About ten lines per run plus the last epoch, and one at least every 10 s: progress
        # as it happens, in a terminal or a log file alike.
        now = time.monotonic()
        wall = now - started
        every = max(1, epochs // 10)
        shown = (epoch + 1) % every == 0 or epoch + 1 == epochs or now - last_line >= 10
        if shown:
            last_line = now
        eta = wall / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        log.log(
            logging.INFO if shown else logging.DEBUG,
            "%s epoch %d/%d: %s  eta %s",
            desc,
            epoch + 1,
            epochs,
            " ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")),
            _duration(eta),
        )
        if resume_path is not None and rank == 0:
            # Through a buffer: a full disk then fails in Python's write (ENOSPC, which
            # atomic_path reports) rather than deep in torch's zip writer.
            buf = io.BytesIO()
            torch.save(
                {
                    "format": RESUME_FORMAT,
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "step": step,
                    "model": model.state_dict(),
                    "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "history": history,
                    "best_state": best_state,
                    "best_key": list(best_key) if best_key is not None else None,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                },
                buf,
            )
            with atomic_path(resume_path) as tmp:
                tmp.write_bytes(buf.getvalue())
        if on_epoch_end is not None:
            on_epoch_end(record)

    for g in groups:
        g.module.requires_grad_(True)
    model.to(device="cpu", memory_format=torch.contiguous_format)  # checkpoints: CPU, usual layout
    objective.to("cpu")
    if best_state is not None and cfg.keep == "best":
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        if history and objective.val_acc_name in history[-1]:
            best_key = (history[-1][objective.val_acc_name], -history[-1]["val_loss"])
    model.eval()
    return FitResult(
        history=history,
        best_epoch=best_epoch + 1,
        best_val_acc=best_key[0] if best_key else None,
        stopped_early=stopped_early,
        resumed_from=None if resumed_from is None else resumed_from + 1,
        images_per_s=world * train_images / train_time if train_time else 0.0,
        steps=step,
    )
