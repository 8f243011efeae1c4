"""One training loop for every objective and every kind of input.

Pretrain, fine-tune and distil differ only in what they pass in: the model (a fresh one, or a
pretrained backbone with a new head), the data module (images or text, ``graftline.data.
modules``), the objective (``graftline.objectives``), the parameter groups (which parts train,
at which LR and from which epoch) and the :class:`~graftline.config.TrainConfig`.

:func:`fit` reads in one screen: set-up, the epoch, the end. Its parts are named beside it
and each can be tested alone: :func:`optimizer_groups` (no weight decay on biases, norms,
embeddings and tokens), :func:`lr_factor` (the schedule), :class:`TrainState` (what a resume
restores), :class:`EarlyStopping` (validation's verdicts), :class:`EpochLog` (the log line).

The loop is seeded and deterministic on CPU: the order, augmentation and dropout of epoch
``e`` depend only on ``(seed, e)``, so a run resumed from the checkpoint of epoch ``e`` ends
with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from graftline.data.modules import DataModule, ImageData, data_module
from graftline.errors import TrainingError
from graftline.io import atomic_path
from graftline.nb_em import combine, texts_of_ids
from graftline.objectives import Objective, SelfSupervised, Supervised

log = logging.getLogger(__name__)

RESUME_FORMAT = "graftline.resume/2"
# The files whose code decides what a training run computes: a resume checkpoint written by
# other code is not taken up (graftline.train.loop_version).
LOOP_FILES = ("train.py", "objectives.py", "data/modules.py", "data/transforms.py")


def loop_version() -> str:
    """A hash of the training loop's code (``LOOP_FILES``)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in LOOP_FILES:
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


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
    items_per_s: float
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Training items a second (images, for the image stages' logs)."""
        return self.items_per_s


# --------------------------------------------------------------------------- the set-up
def device_for(name: str, cuda_available: bool, local_rank: int = 0) -> torch.device:
    """Where a process trains: ``cpu``, ``cuda`` (this rank's own GPU under torchrun,
    ``cuda:LOCAL_RANK``) or ``auto`` (CUDA when present).

    Raises:
        TrainingError: ``cuda`` was asked for and there is none.
    """
    if name == "cuda" and not cuda_available:
        raise TrainingError("train.device: cuda, but PyTorch sees no CUDA device here")
    if name == "cpu" or not cuda_available:
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_device(name: str) -> torch.device:
    """:func:`device_for` this process (``LOCAL_RANK`` from torchrun)."""
    return device_for(name, torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", "0")))


# The kernels every x86-64 machine of this project's kind runs alike: PyTorch's own
# (ATen), oneDNN's convolutions and MKL's GEMMs, each pinned to AVX2 (all of them have it; some
# also have AVX-512, whose kernels sum in another order and give other last bits).
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def portable_kernels() -> bool:
    """Pin this process's CPU kernels to ``PORTABLE_KERNELS`` (``train.portable``). The
    libraries read these settings when their first kernel runs; returns False if that
    already happened at another level (the caller then starts the process anew)."""
    os.environ.update(PORTABLE_KERNELS)
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), or
    ``unknown``."""
    import platform

    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str = "cpu") -> dict[str, str]:
    """What the kernels of a training ran on, which decides the last bits of its weights:
    torch's version, the CPU capability its kernels were dispatched at (``default``,
    ``avx2``, ``avx512``; ``ATEN_CPU_CAPABILITY`` pins it), whether they were pinned
    (``train.portable``), the thread count, the device, and the CPU model: pinned kernels
    give the same bits across Intel generations, but an AMD EPYC computed other last bits
    for the same pipeline (oneDNN and MKL pick their blocking by CPU too)."""
    pinned = all(os.environ.get(k) == v for k, v in PORTABLE_KERNELS.items())
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "portable": str(pinned).lower(),
        "threads": str(torch.get_num_threads()),
        "device": str(resolve_device(device)),
        "cpu": cpu_model(),
    }


def set_up(cfg: TrainConfig, seed: int) -> torch.device:
    """Threads, the device (made this process's current CUDA device, so that every rank
    works on its own GPU), deterministic kernels and the seed."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:  # cuBLAS is deterministic only with a fixed workspace, set before it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(device)
    # On CUDA a few ops (scatter_add in the k-NN monitor) have no deterministic kernel: warn.
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    # Deterministic mode also fills every new tensor with NaN to expose reads of
    # uninitialised memory; no op used here reads it, and the filling cost ~25% of a step.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    return device


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s order and augmentation (and, seeded likewise,
    torch's global one for dropout): distinct, reproducible streams per ``(seed, epoch)``,
    with no dependence on earlier epochs."""
    s = (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s + 1)


# No weight decay for these (MAE's param_groups_lrd, nanoGPT's configure_optimizers,
# Hugging Face's no_decay): decaying a bias, a norm's gain, an embedding table or a learnt
# token pulls it towards zero, which is no regularisation of what it computes.
NO_DECAY_NAMES = ("pos", "cls", "mask_token", "decoder_pos", "embeddings", "embed_tokens")


def decays(name: str, param: nn.Parameter, module: nn.Module | None) -> bool:
    """Whether weight decay applies to parameter ``name`` of ``module``: the matrices of
    linear and convolutional layers (adapters included), not biases, norm weights,
    embeddings, or position, class and mask tokens."""
    if param.ndim < 2:  # biases, LayerNorm/BatchNorm/RMSNorm weights
        return False
    if isinstance(module, nn.Embedding):
        return False
    return name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def optimizer_groups(
    groups: list[ParamGroup], objective: nn.Module, cfg: TrainConfig
) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: each :class:`ParamGroup` at its LR, split into the
    parameters that decay and those that do not (:func:`decays`), and the objective's own
    parameters (a decoder, a projection head) beside them."""
    owners = [(g.name, g.module, g.lr_scale) for g in groups]
    if any(True for _ in objective.parameters()):
        owners.append(("objective", objective, 1.0))
    out: list[dict[str, Any]] = []
    for name, module, scale in owners:
        kind = {n: m for n, m in module.named_modules()}
        split: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for pname, p in module.named_parameters():
            split[decays(pname, p, kind.get(pname.rpartition(".")[0]))].append(p)
        for decay, params in split.items():
            if params:
                out.append(
                    {
                        "params": params,
                        "lr": cfg.lr * scale,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": name if decay else f"{name} (no decay)",
                    }
                )
    return out


def make_optimizer(cfg: TrainConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    kwargs: dict[str, Any] = {"momentum": 0.9, "nesterov": True} if cfg.optimizer == "sgd" else {}
    return opt_cls[cfg.optimizer](param_groups, lr=cfg.lr, **kwargs)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The LR multiplier at optimiser step ``step`` of ``total``: ``none``, ``cosine``, or
    ``onecycle`` (a linear warm-up over the first 20 % from lr/25, then cosine to ~lr/1e4)."""
    if schedule == "none" or total <= 1:
        return 1.0
    t = min(step / (total - 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    warm = 0.2
    if t < warm:
        return 0.04 + 0.96 * t / warm
    u = (t - warm) / (1 - warm)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * u))


# --------------------------------------------------------------------------- the state
@dataclass
class EarlyStopping:
    """Validation's verdicts: the best epoch by ``(accuracy, -loss)``, its weights, and how
    many epochs since it (``patience`` of them stop training)."""

    patience: int | None = None
    best_key: tuple[float, float] | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    def judge(self, epoch: int, val_loss: float, val_acc: float, model: nn.Module) -> None:
        key = (val_acc, -val_loss)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch, self.bad_epochs = key, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= (self.patience or math.inf)


@dataclass
class TrainState:
    """Where a run is: what a resume restores besides the weights and the optimiser."""

    epoch: int = -1  # the last epoch finished
    step: int = 0  # optimiser steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    stopping: EarlyStopping = field(default_factory=EarlyStopping)

    def state_dict(self) -> dict[str, Any]:
        s = asdict(self.stopping)
        s["best_key"] = list(s["best_key"]) if s["best_key"] is not None else None
        return {"epoch": self.epoch, "step": self.step, "history": self.history, "stopping": s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        s = dict(state["stopping"])
        s["best_key"] = tuple(s["best_key"]) if s["best_key"] is not None else None
        self.stopping = EarlyStopping(**{**s, "patience": self.stopping.patience})


Fingerprint = str | dict[str, str]


def save_resume(path: Path, fingerprint: Fingerprint, state: TrainState, **parts: Any) -> None:
    """The resume checkpoint: the run's fingerprint, its state, and ``parts`` (model,
    optimiser, objective, EMA) as state dicts; atomic, through a buffer, so that a full disk
    fails in Python's write (ENOSPC, which atomic_path reports) rather than deep in torch's
    zip writer."""
    buf = io.BytesIO()
    torch.save(
        {
            "format": RESUME_FORMAT,
            "fingerprint": fingerprint,
            "state": state.state_dict(),
            **{k: v.state_dict() if v is not None else None for k, v in parts.items()},
        },
        buf,
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def what_changed(saved: Any, now: Fingerprint) -> str:
    """Why a resume checkpoint with fingerprint ``saved`` is not this run's, in words."""
    if isinstance(saved, dict) and isinstance(now, dict):
        changed = [k for k in now if saved.get(k) != now[k]] + [k for k in saved if k not in now]
        if changed:
            return f"its {', '.join(changed)} changed since"
    return "it is another run's (other params, data or starting weights)"


def read_resume(path: Path, fingerprint: Fingerprint, desc: str) -> dict[str, Any] | None:
    """The resume checkpoint at ``path`` if it is this run's, else None: none there, one
    that cannot be read safely (truncated, or carrying pickled objects), or another run's
    (its fingerprint differs: other params, data, starting weights or training code); says
    which in one line."""
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
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.info("%s: starting afresh: %s is of an older format", desc, path)
        return None
    if state.get("fingerprint") != fingerprint:
        why = what_changed(state.get("fingerprint"), fingerprint)
        log.info("%s: starting afresh, not resuming from %s: %s", desc, path, why)
        return None
    return state


def restore(saved: dict[str, Any], state: TrainState, **parts: Any) -> None:
    """Load a resume checkpoint (:func:`read_resume`) into ``state`` and ``parts``."""
    state.load_state_dict(saved["state"])
    for name, part in parts.items():
        if part is not None and saved.get(name) is not None:
            part.load_state_dict(saved[name])


class EpochLog:
    """About ten epoch lines per run plus the last, and one at least every 10 s: progress
    as it happens, in a terminal or a log file alike; the others go to DEBUG."""

    def __init__(self, desc: str, epochs: int, start_epoch: int) -> None:
        self.desc, self.epochs, self.start_epoch = desc, epochs, start_epoch
        self.started = self.last = time.monotonic()

    def __call__(self, epoch: int, record: dict[str, float]) -> None:
        now = time.monotonic()
        every = max(1, self.epochs // 10)
        shown = (epoch + 1) % every == 0 or epoch + 1 == self.epochs or now - self.last >= 10
        if shown:
            self.last = now
        eta = (now - self.started) / (epoch + 1 - self.start_epoch) * (self.epochs - epoch - 1)
        figures = " ".join(
            f"{k}={v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")
        )
        level = logging.INFO if shown else logging.DEBUG
        log.log(
            level,
            "%s epoch %d/%d: %s  eta %s",
            self.desc,
            epoch + 1,
            self.epochs,
            figures,
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --------------------------------------------------------------------------- the loop
def fit(
    model: nn.Module,
    train: Dataset | DataModule,
    val: Dataset | DataModule | None,
    cfg: TrainConfig,
    *,
    seed: int,
    groups: list[ParamGroup] | None = None,
    resume_path: Path | str | None = None,
    fingerprint: Fingerprint = "",
    desc: str = "train",
    progress: bool | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    objective: Objective | None = None,
    probe: tuple[Dataset | DataModule, Dataset | DataModule] | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights (or, with
    ``cfg.keep: last``, the final ones; with ``cfg.ema``, those of the moving average).

    Args:
        train, val: data modules (a :class:`Dataset` of images is taken as ``ImageData``);
            ``train`` is augmented as ``cfg.augment`` says, ``val`` judges the epochs.
        seed: drives order, augmentation, dropout.
        groups: parameter groups (default: the whole model at ``cfg.lr``).
        resume_path: checkpoint written after every epoch; training resumes after its epoch
            if its ``fingerprint`` (params, data, starting weights) is this run's.
        progress: show a progress bar (default: when stderr is a terminal).
        on_epoch_end: called with each epoch's record (metrics logging, tests).
        objective: the loss of a batch and the validation figures (default: supervised
            cross-entropy). Its own parameters train beside the model and are resumed.
        probe: labelled (bank, queries) for a self-supervised objective's k-NN monitor when
            ``train`` and ``val`` have no labels (default: ``train`` and ``val`` themselves).
    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    device = set_up(cfg, seed)
    data = data_module(train).augmented(cfg.augment.model_dump())
    held = data_module(val) if val is not None and len(val) else None
    data.prepare_model(model, device)
    groups = groups or [ParamGroup("model", model)]
    objective = objective if objective is not None else Supervised(cfg.label_smoothing)
    monitor = _monitor(data, probe) if isinstance(objective, SelfSupervised) else {}
    objective.to(device)
    optimizer = make_optimizer(cfg, optimizer_groups(groups, objective, cfg))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    # cfg.ema: an exponential moving average of the weights (PyTorch's AveragedModel) is
    # what validation judges and what training leaves in the model.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema
        else None
    )
    judged = ema.module if ema is not None else model
    world, rank = distributed.world_size(), distributed.rank()
    _, batches = data.plan(cfg.batch_size, world)
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)

    state = TrainState(stopping=EarlyStopping(cfg.patience))
    resume_path = Path(resume_path) if resume_path else None
    saved = read_resume(resume_path, fingerprint, desc) if resume_path is not None else None
    resumed_from = None
    if saved is not None:
        restore(saved, state, model=model, objective=objective, optimizer=optimizer, ema=ema)
        resumed_from = state.epoch + 1
        log.info("%s: resuming after epoch %d from %s", desc, resumed_from, resume_path)

    epoch_log = EpochLog(desc, epochs, state.epoch + 1)
    train_time, train_items = 0.0, 0
    for epoch in range(state.epoch + 1, epochs):
        if state.stopping.stop or state.step >= total_steps:
            break
        t0 = time.perf_counter()
        record, seen = _train_epoch(
            model, data, objective, optimizer, base_lrs, groups, ema, cfg, state,
            epoch=epoch, seed=seed, total_steps=total_steps, device=device,
            desc=desc, epochs=epochs, progress=progress,
        )  # fmt: skip
        record["seconds"] = time.perf_counter() - t0
        train_time, train_items = train_time + record["seconds"], train_items + seen
        if held is not None:
            vloss, vacc = _validate(objective, judged, held, monitor, rank, world)
            record.update({"val_loss": vloss, objective.val_acc_name: vacc})
            record.update(getattr(objective, "figures", lambda _: {})(vloss))
            state.stopping.judge(epoch, vloss, vacc, judged)
        state.history.append(record)
        state.epoch = epoch
        epoch_log(epoch, record)
        if resume_path is not None and rank == 0:
            save_resume(
                resume_path, fingerprint, state,
                model=model, objective=objective, optimizer=optimizer, ema=ema,
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(record)

    for g in groups:
        g.module.requires_grad_(True)
    return _finish(model, objective, ema, cfg, state, resumed_from, world * train_items, train_time)


def _train_epoch(
    model: nn.Module,
    data: DataModule,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    groups: list[ParamGroup],
    ema: AveragedModel | None,
    cfg: TrainConfig,
    state: TrainState,
    *,
    epoch: int,
    seed: int,
    total_steps: int,
    device: torch.device,
    desc: str,
    epochs: int,
    progress: bool | None,
) -> tuple[dict[str, float], int]:
    """One epoch of optimiser steps, each over ``cfg.accumulate`` batches; returns the
    epoch's record and how many items it trained on."""
    _freeze(model, objective, groups, epoch)
    gen = epoch_generator(seed, epoch)
    world, rank = distributed.world_size(), distributed.rank()
    bs, batches = data.plan(cfg.batch_size, world)
    shard = len(data) // world if world > 1 else len(data)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    run_loss, correct, seen, micro = 0.0, 0, 0, 0
    with tqdm(
        data.batches(gen, cfg.batch_size, rank, world),
        total=batches,
        desc=f"{desc} {epoch + 1}/{epochs}",
        disable=(not progress) if progress is not None else None,
        leave=False,
        unit="batch",
    ) as it:
        for b, batch in enumerate(it):
            if state.step >= total_steps:
                break
            if micro == 0:  # an optimiser step begins: its LR, and the items it will see
                factor = lr_factor(cfg.schedule, state.step, total_steps)
                for pg, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    pg["lr"] = base * factor
                group = range(b, min(b + cfg.accumulate, batches))
                group_items = sum(min(bs, shard - k * bs) for k in group)
                optimizer.zero_grad(set_to_none=True)  # any gradient a caller left
            batch = data.augment(data.to_device(batch, device), gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, predicted = objective.step(model, batch, gen)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{desc}: non-finite loss ({loss.item()}) at epoch {epoch + 1}, "
                    f"step {state.step + 1}; lower the learning rate (lr={cfg.lr}) or check the data"
                )
            # Each batch's mean loss weighed by its share of the step's items: the gradient
            # of the step's mean, as one batch of all its items would give.
            (loss * (len(batch) / group_items)).backward()
            micro += 1
            if micro == len(group):
                _optimizer_step(optimizer, trainable, cfg, world)
                if ema is not None:
                    ema.update_parameters(model)
                state.step, micro = state.step + 1, 0
            run_loss += loss.item() * len(batch)
            if predicted is not None:
                correct += (predicted == batch.target).sum().item()
            seen += len(batch)
            it.set_postfix(loss=f"{run_loss / seen:.4f}")
    record: dict[str, float] = {"epoch": epoch + 1, "train_loss": run_loss / max(seen, 1)}
    if objective.reports_train_acc:
        record["train_acc"] = correct / max(seen, 1)
    last_lr = cfg.lr * groups[-1].lr_scale  # the head's, where there is one
    record["lr"] = last_lr * lr_factor(cfg.schedule, max(state.step - 1, 0), total_steps)
    return record, seen


def _freeze(model: nn.Module, objective: nn.Module, groups: list[ParamGroup], epoch: int) -> None:
    """Train mode, but the groups still frozen at ``epoch`` take no gradient and stay in
    eval mode (their BatchNorm statistics and no dropout)."""
    for g in groups:
        g.module.requires_grad_(epoch >= g.frozen_epochs)
    model.train()
    objective.train()
    for g in groups:
        if epoch < g.frozen_epochs:
            g.module.eval()


def _optimizer_step(
    optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter], cfg: TrainConfig, world: int
) -> None:
    """Average the gradients over the ranks, clip their norm, step, and clear them."""
    if world > 1:
        distributed.average_gradients(trainable)
    if cfg.clip_grad_norm:
        grads = [p for p in trainable if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, cfg.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _monitor(
    data: DataModule, probe: tuple[Dataset | DataModule, Dataset | DataModule] | None
) -> dict[str, DataModule]:
    """A self-supervised objective's k-NN monitor: a bank of at most ~5,000 labelled items
    (every n-th of the training set's, or of the probe's bank) and the probe's queries."""
    if probe is not None:
        bank, query = (data_module(d) for d in probe)
    else:
        bank, query = data, None
    some = np.arange(len(bank))[:: max(1, len(bank) // 5000)]
    out = {"bank": bank.subset(some)}
    if query is not None:
        out["query"] = query
    return out


def _validate(
    objective: Objective,
    judged: nn.Module,
    val: DataModule,
    monitor: dict[str, DataModule],
    rank: int,
    world: int,
) -> tuple[float, float]:
    """The validation loss and accuracy; under torchrun rank 0 validates and every rank
    takes its decisions from the figures it broadcasts."""
    if world == 1:
        return objective.validate(judged, val, **monitor)
    distributed.broadcast_buffers(judged)
    figures = objective.validate(judged, val, **monitor) if rank == 0 else (0.0, 0.0)
    vloss, vacc = distributed.broadcast_floats(*figures)
    return vloss, vacc


def _finish(
    model: nn.Module,
    objective: Objective,
    ema: AveragedModel | None,
    cfg: TrainConfig,
    state: TrainState,
    resumed_from: int | None,
    items: int,
    seconds: float,
) -> FitResult:
    """The weights training leaves (best, last or averaged), on the CPU in the usual
    layout for checkpoints, and the run's result."""
    model.to(device="cpu", memory_format=torch.contiguous_format)
    objective.to("cpu")
    stopping, history = state.stopping, state.history
    best_epoch, best_key = stopping.best_epoch, stopping.best_key
    if stopping.best_state is not None and cfg.keep == "best":
        model.load_state_dict(stopping.best_state)
    else:
        best_epoch = len(history) - 1
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        name = objective.val_acc_name
        if history and name in history[-1]:
            best_key = (history[-1][name], -history[-1]["val_loss"])
    model.eval()
    return FitResult(
        history=history,
        best_epoch=best_epoch + 1,
        best_val_acc=best_key[0] if best_key else None,
        stopped_early=stopping.stop,
        resumed_from=resumed_from,
        items_per_s=items / seconds if seconds else 0.0,
        steps=state.step,
    )


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the ``device`` an exported
    model (``graftline.export.OnnxClassifier``) declares."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    data: np.ndarray | DataModule,
    batch_size: int = 1024,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities for a data module's items, or for ``(N, C, H, W)`` pixels in
    [0, 255] (uint8 or float); softened by ``temperature`` (a distillation teacher's soft
    targets) when above 1. A batch at a time: a memory-mapped corpus stays on disk."""
    model.eval()
    dev = model_device(model)
    module = data if isinstance(data, DataModule) else ImageData.unlabelled(data)
    # One array filled a batch at a time: a corpus of millions of items costs its
    # probabilities once, not a list of batches and their concatenation as well.
    out: np.ndarray | None = None
    done = 0
    words = getattr(model, "words", None)  # a text classifier's naive Bayes + EM
    for batch in module.sequential(batch_size):
        logits = model(module.to_device(batch, dev).inputs)
        if words is not None and isinstance(batch.inputs, dict):
            ids = batch.inputs["input_ids"].cpu().numpy()
            proba = combine(
                F.log_softmax(logits.float(), dim=1).cpu().numpy(),
                words,
                texts_of_ids(ids, module.transform),
                temperature,
            )
        else:
            proba = F.softmax(logits / temperature, dim=1).float().cpu().numpy()
        if out is None:
            out = np.empty((len(module), proba.shape[1]), dtype=np.float32)
        out[done : done + len(batch)] = proba
        done += len(batch)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
