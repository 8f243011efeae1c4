"""The training stages are reproducible: same params and data, same weights, whatever the
process's random state was before."""

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import ConfigError, Params, parse_params
from graftline.data.dataset import Dataset
from graftline.data.store import save_splits
from graftline.errors import ArtifactError, DataError
from graftline.models.checkpoint import read_checkpoint
from tasks import finetune, pretrain
from tests.conftest import blob_digits

PARAMS = parse_params(
    {
        "pretrain": {
            "model": {"channels": [4, 8], "hidden": 16},
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "num_threads": 1,
                "augment": {"shift": 0.1, "lowres_prob": 0.5},
            },
        },
        "finetune": {
            "strategy": "gradual",
            "head_epochs": 1,
            "train": {"epochs": 2, "batch_size": 8, "num_threads": 1},
        },
    }
)


def blobs(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


def weights(path: Path) -> list[torch.Tensor]:
    return list(read_checkpoint(path)["state_dict"].values())


VIT_PARAMS = parse_params(
    {
        **PARAMS.model_dump(mode="json"),
        "pretrain": {
            **PARAMS.pretrain.model_dump(mode="json"),
            "model": {"arch": "vit", "patch_size": 7, "dim": 16, "depth": 2, "heads": 2},
        },
        "finetune": {**PARAMS.finetune.model_dump(mode="json"), "layer_decay": 0.75},
    }
)


MAE_PARAMS = parse_params(
    {
        **VIT_PARAMS.model_dump(mode="json"),
        "pretrain": {
            **VIT_PARAMS.pretrain.model_dump(mode="json"),
            "objective": "mae",
            "mae": {"decoder_dim": 16, "knn_k": 3},
        },
    }
)


LORA_PARAMS = parse_params(
    {
        **MAE_PARAMS.model_dump(mode="json"),
        "finetune": {
            **PARAMS.finetune.model_dump(mode="json"),
            "strategy": "lora",
            "lora": {"rank": 2, "dropout": 0.1},
        },
    }
)


SIMCLR_PARAMS = parse_params(
    {
        **PARAMS.model_dump(mode="json"),
        "pretrain": {
            **PARAMS.pretrain.model_dump(mode="json"),
            "objective": "contrastive",
            "contrastive": {"proj_dim": 8, "knn_k": 3},
        },
    }
)


@pytest.mark.parametrize(
    "params",
    [PARAMS, VIT_PARAMS, MAE_PARAMS, LORA_PARAMS, SIMCLR_PARAMS],
    ids=["cnn", "vit", "vit-mae", "vit-mae-lora", "cnn-contrastive"],
)
def test_pretrain_and_finetune_are_reproducible(tmp_path: Path, params: Params) -> None:
    save_splits(tmp_path / "pre", {"train": blobs(12, 0), "val": blobs(4, 1)}, {})
    save_splits(
        tmp_path / "task", {"train": blobs(3, 2), "val": blobs(3, 3), "test": blobs(3, 4)}, {}
    )
    runs = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # a different global random state before each run
        out = tmp_path / f"run{i}"
        pretrain.run(
            params,
            data=tmp_path / "pre",
            out=out / "pre",
            reports=out / "rp",
            checkpoints=out / "ck",
        )
        finetune.run(
            params,
            data=tmp_path / "task",
            pretrained=out / "pre",
            finetuned_out=out / "ft",
            scratch_out=out / "sc",
            reports=out / "rf",
            checkpoints=out / "ck",
        )
        runs.append(out)
    if params.pretrain.objective != "supervised":  # no labels used, monitored by k-NN
        history = (runs[0] / "rp" / "history.csv").read_text().splitlines()[0]
        assert "val_knn_acc" in history and "train_acc" not in history
        objective = read_checkpoint(runs[0] / "pre" / "model.pt")["objective"]
        assert objective == params.pretrain.objective
    for model in ("pre", "ft", "sc"):
        a, b = (weights(r / model / "model.pt") for r in runs)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), model
    assert (runs[0] / "rf" / "finetuned_history.csv").read_text() == (
        runs[1] / "rf" / "finetuned_history.csv"
    ).read_text()


def test_layer_decay_scales_each_vit_layer_by_its_depth() -> None:
    """MAE's recipe: the head and final norm at the full LR, each layer below one factor of
    layer_decay lower, the embedding lowest; every parameter in exactly one group."""
    from graftline.models import build_classifier
    from tasks.finetune import strategy_groups

    vit = VIT_PARAMS.pretrain.model.model_dump()
    model = build_classifier(vit, 1, 28, 3)
    p = VIT_PARAMS.finetune.model_copy(
        update={"strategy": "full", "layer_decay": 0.5, "backbone_lr_scale": 1.0}
    )  # model_copy skips validation: fine for these valid values
    groups = strategy_groups(model, p)
    scales = {g.name: g.lr_scale for g in groups}
    assert scales == {
        "backbone.layer0": 0.125,  # the embedding: patches, positions, class token
        "backbone.layer1": 0.25,
        "backbone.layer2": 0.5,
        "backbone.layer3": 1.0,  # the final norm
        "head": 1.0,
    }
    grouped = [id(t) for g in groups for t in g.module.parameters()]
    assert sorted(grouped) == sorted(id(t) for t in model.parameters())
    cnn = build_classifier(PARAMS.pretrain.model.model_dump(), 1, 28, 3)
    with pytest.raises(ArtifactError, match="layer_decay needs a backbone made of layers"):
        strategy_groups(cnn, p)
    with pytest.raises(ConfigError, match="layer_decay applies to strategy full or gradual"):
        parse_params({"finetune": {"strategy": "linear_probe", "layer_decay": 0.7}})


def test_pretraining_on_a_corpus_without_labels(tmp_path: Path) -> None:
    """A folder of images with no class folders: preprocess keeps the task's labelled splits
    beside it for the k-NN monitor; contrastive pretraining reads no corpus label, reports
    k-NN accuracy each epoch and saves a headless backbone that fine-tunes; supervised
    pretraining on it fails naming the key."""
    from PIL import Image

    from graftline import layout as paths
    from graftline.data.store import load_split, read_manifest
    from tasks import preprocess

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    x, _ = blob_digits(10, classes=4, seed=5)
    for i, img in enumerate(x):
        Image.fromarray(img).save(corpus / f"{i:03}.png")
    task, y = blob_digits(20, classes=3, seed=6)
    rows = [",".join(map(str, [k, *img.ravel()])) for img, k in zip(task, y, strict=True)]
    header = "label," + ",".join(f"p{i}" for i in range(task[0].size))
    (tmp_path / "task.csv").write_text("\n".join([header, *rows]) + "\n")
    raw = SIMCLR_PARAMS.model_dump(mode="json")
    raw["preprocess"] = {
        "image_size": 16,
        "pretrain": {"source": {"kind": "folder", "path": str(corpus)}, "val_fraction": 0.25},
        "task": {"source": {"kind": "csv", "path": str(tmp_path / "task.csv")}},
    }
    params = parse_params(raw)
    preprocess.run(params, out=tmp_path / "processed")
    data = tmp_path / "processed" / "pretrain"
    manifest = read_manifest(data)
    assert manifest["labelled"] is False and manifest["classes"] == []
    assert manifest["splits"]["train"]["count"] == 30
    bank = load_split(data, paths.PROBE_BANK)
    assert bank.classes == ["0", "1", "2"] and (bank.labels >= 0).all()
    assert (load_split(data, "train").labels == -1).all()

    result = pretrain.run(
        params, data=data, out=tmp_path / "pre", reports=tmp_path / "rp", checkpoints=tmp_path / "c"
    )
    history = result["history"][""]
    assert len(history) == 2 and all(0 <= h["val_knn_acc"] <= 1 for h in history)
    ckpt = read_checkpoint(tmp_path / "pre" / "model.pt")
    assert ckpt["classes"] == [] and not any(k.startswith("head.") for k in ckpt["state_dict"])
    finetune.run(
        params,
        data=tmp_path / "processed" / "task",
        pretrained=tmp_path / "pre",
        finetuned_out=tmp_path / "ft",
        scratch_out=tmp_path / "sc",
        reports=tmp_path / "rf",
        checkpoints=tmp_path / "c",
    )
    assert read_checkpoint(tmp_path / "ft" / "model.pt")["classes"] == ["0", "1", "2"]

    supervised = PARAMS.model_copy(update={"preprocess": params.preprocess})
    with pytest.raises(DataError, match=r"pretrain\.objective: supervised needs labels.*folder:"):
        pretrain.run(supervised, data=data, out=tmp_path / "p2", reports=tmp_path / "r2")


class _RaisesWhenCollected:
    def __init__(self, err: Exception) -> None:
        self.err = err

    def __del__(self) -> None:
        raise self.err


def test_a_stopping_stage_drops_only_the_late_signal_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once stopping, a late signal's "ignored due to race condition" report is dropped (it
    is expected in a burst); any other unraisable error is still reported."""
    from tasks import _stage

    monkeypatch.setattr("sys.unraisablehook", _stage._quiet_about_late_signals)
    obj = _RaisesWhenCollected(OSError("Signal 15 ignored due to race condition"))
    del obj
    assert capsys.readouterr().err == ""
    obj = _RaisesWhenCollected(ValueError("a real problem"))
    del obj
    assert "a real problem" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv0", "orig_argv", "stage"),
    [
        ("-m", ["python", "-m", "tasks.pretrain", "--params", "p.yaml"], True),
        ("-m", ["python", "-X", "importtime", "-m", "tasks.distill"], True),
        ("-m", ["python", "-m", "graftline.cli", "run"], False),  # the flow imports stages
        ("-c", ["python", "-c", "import tasks.pretrain"], False),
        ("/venv/bin/pytest", ["python", "/venv/bin/pytest", "-m", "tasks.x"], False),
    ],
)
def test_only_a_stage_process_imports_with_the_collector_off(
    monkeypatch: pytest.MonkeyPatch, argv0: str, orig_argv: list[str], stage: bool
) -> None:
    import tasks

    monkeypatch.setattr("sys.argv", [argv0])
    monkeypatch.setattr("sys.orig_argv", orig_argv)
    assert tasks._started_as_a_stage() is stage


def test_importing_a_stage_module_leaves_the_collector_on() -> None:
    import subprocess
    import sys

    code = "import gc, tasks.pretrain; print(gc.isenabled(), gc.get_freeze_count())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["True", "0"]
