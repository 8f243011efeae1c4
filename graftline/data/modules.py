"""What the training loop trains on: one data module per kind of input hands it batches.

``graftline.train.fit`` never sees a file format, a pixel or a token. It asks the training
set's data module for the batches of an epoch (a seeded permutation, this rank's shard of
it, read a batch at a time from memory or a memory-mapped store), moves each to the device
and has the module augment it there; validation walks a module in order. A kind of input
(images here; text beside it) brings one :class:`DataModule` subclass and nothing else in the
loop changes.

A batch is a :class:`Batch`: the model's ``inputs``, the ``target`` class of each item with a
``labelled`` mask (an unlabelled corpus item has none), and ``extra`` tensors that some
objectives read (a distillation teacher's ``soft`` targets with their ``soft_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from graftline.data.dataset import Dataset
from graftline.data.transforms import augment_batch
from graftline.io import read_rows


@dataclass
class Batch:
    """One batch: what the model reads, what it should say, and what else an objective needs.

    ``target`` holds a class index per item; where ``labelled`` is False (an item of an
    unlabelled corpus) it holds -1 and means nothing. ``extra`` carries per-item tensors:
    ``soft`` (a teacher's class probabilities) and ``soft_mask`` (the items that have them).
    """

    inputs: torch.Tensor | dict[str, torch.Tensor]
    target: torch.Tensor
    labelled: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch on ``device``; through pinned memory when that is a GPU."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=non_blocking)

        inputs = (
            {k: move(v) for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else move(self.inputs)
        )
        return Batch(
            inputs, move(self.target), move(self.labelled), {k: move(v) for k, v in self.extra.items()}
        )


@dataclass
class Part:
    """Rows of one array in a data module: ``items`` (uint8 images, memory-mapped or not),
    or only its rows at ``index``; their ``labels`` (-1: none), optional ``soft`` targets
    (one row per label), and how many times an epoch they are seen (``repeat``)."""

    items: np.ndarray
    labels: np.ndarray
    soft: np.ndarray | None = None
    repeat: int = 1
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.items) if self.index is None else len(self.index)
        if len(self.labels) != n or (self.soft is not None and len(self.soft) != n):
            raise ValueError(f"a part of {n} items has {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def rows(self, local: np.ndarray) -> np.ndarray:
        """The items at positions ``local`` of this part, read from memory or disk."""
        return read_rows(self.items, local if self.index is None else self.index[local])


class DataModule:
    """The batches of one split, for every kind of input.

    The epoch's order is a permutation of all items drawn from the loop's generator; under
    ``torchrun`` each rank takes an equal, seeded shard of it (``rank::world``). A module is
    one or more :class:`Part` s side by side: the student of ``distill`` trains on the corpus
    with soft targets beside the labelled set, repeated, and neither is ever copied into one
    array (a memory-mapped corpus stays on disk and is read a batch at a time).

    Subclasses say how rows become a batch (:meth:`collate`), what the model's input is on
    the device (:meth:`to_device`) and how a batch is augmented (:meth:`augment`).
    """

    kind = "abstract"

    def __init__(self, parts: Sequence[Part], classes: list[str], transform: dict[str, Any]):
        self.parts = list(parts)
        self.classes = list(classes)
        self.transform = dict(transform)
        self._starts = np.cumsum([0, *[len(p) for p in self.parts]])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def labels(self) -> np.ndarray:
        """Every item's class (-1: none), in order."""
        return np.concatenate([np.tile(p.labels, p.repeat) for p in self.parts])

    # ------------------------------------------------------------------ what the loop calls
    def plan(self, batch_size: int, world: int = 1) -> tuple[int, int]:
        """``(items per batch on this rank, batches per epoch)`` for a global ``batch_size``."""
        shard = len(self) // world if world > 1 else len(self)
        bs = min(max(1, batch_size // world), max(shard, 1))
        return bs, math.ceil(shard / bs)

    def batches(
        self, generator: torch.Generator, batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        """The epoch's batches for this rank, in the order ``generator`` draws, on the CPU.

        The permutation is drawn when the first batch is asked for, before anything else
        draws from ``generator``: the order of an epoch depends on its seed alone.
        """
        bs, steps = self.plan(batch_size, world)
        perm = torch.randperm(len(self), generator=generator)
        if world > 1:
            perm = perm[rank::world][: len(self) // world]
        for b in range(steps):
            yield self.read(perm[b * bs : (b + 1) * bs].numpy())

    def sequential(self, batch_size: int = 512) -> Iterator[Batch]:
        """Every item in order, unaugmented, on the CPU (validation, features, prediction)."""
        for i in range(0, len(self), batch_size):
            yield self.read(np.arange(i, min(i + batch_size, len(self))))

    def read(self, index: np.ndarray) -> Batch:
        """The items at ``index`` (positions over all parts) as a CPU batch."""
        index = np.asarray(index, dtype=np.int64)
        which = np.searchsorted(self._starts, index, side="right") - 1
        order = np.empty(len(index), dtype=np.int64)
        rows, labels, soft, has_soft, done = [], [], [], [], 0
        for k, part in enumerate(self.parts):
            at = np.flatnonzero(which == k)
            if not len(at):
                continue
            local = (index[at] - self._starts[k]) % len(part.labels)
            rows.append(part.rows(local))
            labels.append(part.labels[local])
            if part.soft is not None:
                soft.append(part.soft[local])
                has_soft.append(np.ones(len(at), bool))
            else:
                soft.append(None)
                has_soft.append(np.zeros(len(at), bool))
            order[at] = np.arange(done, done + len(at))
            done += len(at)
        # Parts are gathered one after the other; ``order`` puts the items back as asked.
        target = torch.from_numpy(np.concatenate(labels).astype(np.int64))[order]
        extra: dict[str, torch.Tensor] = {}
        if any(s is not None for s in soft):
            width = next(s.shape[1] for s in soft if s is not None)
            filled = [
                s if s is not None else np.zeros((len(m), width), np.float32)
                for s, m in zip(soft, has_soft, strict=True)
            ]
            extra["soft"] = torch.from_numpy(np.concatenate(filled).astype(np.float32))[order]
            extra["soft_mask"] = torch.from_numpy(np.concatenate(has_soft))[order]
        return Batch(self.collate(rows, order), target, target >= 0, extra)

    # ------------------------------------------------------------------ the kind's own part
    def collate(self, rows: list[np.ndarray], order: np.ndarray) -> torch.Tensor:
        """The rows read from each part as one input tensor, in the order asked for."""
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch on ``device`` as the model reads it."""
        raise NotImplementedError

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        """A training-time augmentation of a batch on the device (default: none)."""
        return batch

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> None:
        """Put ``model`` on ``device`` in the layout this kind's inputs come in."""
        model.to(device)

    def subset(self, index: np.ndarray) -> DataModule:
        """Items at ``index`` as a module of their own, in memory (the k-NN monitor's bank)."""
        raise NotImplementedError

    def augmented(self, spec: dict[str, Any]) -> DataModule:
        """The same items, augmented in training as ``spec`` (``train.augment``) says.

        Raises:
            ValueError: the kind has no such augmentation (the message names the keys).
        """
        asked = sorted(k for k, v in spec.items() if v and k != "lowres_min")
        if asked:
            raise ValueError(
                f"train.augment: {', '.join(asked)} augment images; {self.kind} inputs have "
                "no such augmentation"
            )
        return self


class ImageData(DataModule):
    """Images: uint8 ``(N, C, H, W)`` rows; on the device, floats in [0, 1] laid out
    channels-last (oneDNN's convolutions run about 1.5x faster on CPU than in NCHW), then
    shifted, rotated, zoomed, blurred or distorted as ``augment`` says."""

    kind = "image"

    def __init__(
        self,
        parts: Sequence[Part],
        classes: list[str],
        transform: dict[str, Any],
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parts, classes, transform)
        self.augmentation = dict(augment or {})

    @classmethod
    def of(cls, ds: Dataset, augment: dict[str, Any] | None = None) -> ImageData:
        """A dataset's images and labels as one part."""
        return cls([Part(ds.images, ds.labels)], ds.classes, ds.transform, augment)

    @classmethod
    def unlabelled(cls, images: np.ndarray) -> ImageData:
        """Bare images (uint8, or float in [0, 255]) as a module: prediction, features."""
        return cls([Part(images, np.full(len(images), -1, np.int64))], [], {})

    def augmented(self, spec: dict[str, Any]) -> ImageData:
        return ImageData(self.parts, self.classes, self.transform, spec)

    def collate(self, rows: list[np.ndarray], order: np.ndarray) -> torch.Tensor:
        if len(rows) == 1:  # one part: read in the order asked
            return torch.from_numpy(rows[0])
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(rows)[order]))

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        # uint8 crosses to the device (a quarter of float's bytes), converted there
        batch = batch.to(device, non_blocking=True)
        x = batch.inputs.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        return replace(batch, inputs=x)

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        x = augment_batch(batch.inputs, generator, **self.augmentation)
        return replace(batch, inputs=x.contiguous(memory_format=torch.channels_last))

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> None:
        model.to(device=device, memory_format=torch.channels_last)

    def subset(self, index: np.ndarray) -> ImageData:
        batch = self.read(np.asarray(index))
        part = Part(batch.inputs.numpy(), batch.target.numpy())
        return ImageData([part], self.classes, self.transform, self.augmentation)


def cut_to_longest(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Right-padded token rows cut to the longest row's width (at least one column), as one
    contiguous int64 array: what a batch of token ids becomes before a model reads it."""
    used = np.flatnonzero((ids != pad_id).any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return np.ascontiguousarray(ids[:, :width]).astype(np.int64)


class TokenData(DataModule):
    """Token sequences: int rows ``(N, max_len)`` of token ids padded with ``pad_id`` (the
    processed store's layout, memory-mapped or not). A batch is cut to its longest item, and
    its ``inputs`` are ``{"input_ids", "attention_mask"}``, what Hugging Face models take;
    a model reads ``batch.inputs`` whatever its kind, so objectives need no change."""

    kind = "text"

    def __init__(
        self, parts: Sequence[Part], classes: list[str], transform: dict[str, Any], pad_id: int
    ) -> None:
        super().__init__(parts, classes, transform)
        self.pad_id = pad_id

    @classmethod
    def of(cls, ds: Dataset) -> TokenData:
        """A tokenized dataset (its transform names the pad id) as one part."""
        return cls([Part(ds.images, ds.labels)], ds.classes, ds.transform, int(ds.transform["pad_id"]))

    def collate(self, rows: list[np.ndarray], order: np.ndarray) -> torch.Tensor:
        ids = rows[0] if len(rows) == 1 else np.concatenate(rows)[order]
        return torch.from_numpy(cut_to_longest(ids, self.pad_id))

    def read(self, index: np.ndarray) -> Batch:
        batch = super().read(index)
        ids = batch.inputs
        assert isinstance(ids, torch.Tensor)
        return replace(batch, inputs={"input_ids": ids, "attention_mask": ids != self.pad_id})

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        return batch.to(device, non_blocking=True)

    def subset(self, index: np.ndarray) -> TokenData:
        batch = super().read(np.asarray(index))
        ids = batch.inputs
        assert isinstance(ids, torch.Tensor)
        width = max(p.items.shape[1] for p in self.parts)
        padded = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        padded[:, : ids.shape[1]] = ids.numpy()
        return TokenData([Part(padded, batch.target.numpy())], self.classes, self.transform, self.pad_id)


def module_of(parts: Sequence[Part], like: Dataset) -> DataModule:
    """``parts`` as a module of ``like``'s kind, classes and transform (token ids for a text
    transform, images otherwise): a corpus beside a labelled set, with soft targets."""
    if like.transform.get("kind") == "text":
        return TokenData(parts, like.classes, like.transform, int(like.transform["pad_id"]))
    return ImageData(parts, like.classes, like.transform)


def data_module(data: Dataset | DataModule, augment: dict[str, Any] | None = None) -> DataModule:
    """``data`` as the loop's data module: a :class:`Dataset` of token ids (transform kind
    ``text``) becomes :class:`TokenData`, one of images :class:`ImageData` (augmented as
    ``augment`` says); a module is taken as it is."""
    if isinstance(data, DataModule):
        return data
    if data.transform.get("kind") == "text":
        return TokenData.of(data)
    return ImageData.of(data, augment)
