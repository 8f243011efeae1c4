"""Task ``deploy``: log the fine-tuned model, register it, gate it against the champion on
the current test split, and promote it or refuse with a readable reason.

Not a DVC stage: it changes the registry, which ``dvc repro`` must never do.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import graftline
from graftline import layout as paths
from graftline import tracking
from graftline.config import Params
from graftline.data.store import load_split
from graftline.errors import ArtifactError
from graftline.registry import (
    Challenge,
    GateDecision,
    PromotionConflict,
    Registry,
    RegistryError,
    challenge,
)
from tasks._stage import stage_main

log = logging.getLogger("graftline.deploy")

MODEL_CODE = Path(graftline.__file__).parent / "serve" / "mlflow_model.py"


def _requirements(text: bool = False) -> list[str]:
    """The logged model's pip requirements, pinned to this environment's versions; a text
    model also needs its Hugging Face model classes and tokenizer."""
    pins = []
    dists = ["torch", "mlflow", "numpy", "pandas", "pydantic", "pyyaml", "scipy"]
    for dist in dists + (["transformers", "tokenizers", "safetensors"] if text else []):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            pins.append(dist)
    return pins


def deployed(params: Params) -> tuple[str, Path]:
    """Which model deploys: the distilled student when distillation is on, else the
    fine-tuned model; its name in the evaluation metrics and its folder."""
    if params.distill.enabled:
        return "student", paths.STUDENT
    return "finetuned", paths.FINETUNED


def training_environment(params: Params, root: Path = Path(".")) -> dict[str, str]:
    """What the deploying model's training ran on, as lineage tags (``graftline.env.*``),
    from the record its stage left (``.graftline/environment``); ``unknown`` when this
    checkout did not train it (its stage restored from DVC's cache)."""
    name, _ = deployed(params)
    path = root / paths.ENVIRONMENT / f"{name}.json"
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        env = {k: "unknown" for k in ("torch", "cpu_capability", "threads", "device", "cpu")}
    return {f"graftline.env.{k}": str(v) for k, v in env.items()}


def model_tag(params: Params) -> str:
    """The lineage tag holding the dvc.lock hash of the model that deploys."""
    return (
        "graftline.dvc.student_model" if params.distill.enabled else "graftline.dvc.finetuned_model"
    )


def log_model(checkpoint: Path, example: Any, exports: dict[str, Path] | None = None) -> Any:
    """Log a checkpoint as an MLflow pyfunc model (models from code; no pickle on load),
    with its ``exports`` (``{"onnx": model.onnx}``) among the model's artifacts."""
    import mlflow
    from mlflow.models import infer_signature

    from graftline.models.checkpoint import input_transform, load_checkpoint
    from graftline.serve.predict import predict_frame

    model, ckpt = load_checkpoint(checkpoint)
    answer = predict_frame(model, ckpt["classes"], example, transform=input_transform(ckpt))
    signature = infer_signature(example, answer)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={
            "checkpoint": str(checkpoint),
            **{k: str(v) for k, v in (exports or {}).items()},
        },
        code_paths=[str(Path(graftline.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(input_transform(ckpt).get("kind") == "text"),
        # In the MLmodel file: how an image becomes the input the signature describes (the
        # checkpoint carries the same; graftline serve and predict apply it).
        metadata={"graftline_input_transform": input_transform(ckpt)},
    )


FIGURES_HEADER = ["model", "accuracy", "macro-F1", "ECE"]


def figure_rows(metrics: dict[str, Any], decision: GateDecision) -> list[list[str]]:
    """The test figures of every model, and the champion's accuracy re-scored on the same
    items: the rows of the report's, the card's and the HTML page's table."""
    from graftline.evaluate import MODEL_NAMES

    rows = [
        [m, *(f"{metrics[m][k]:.4f}" for k in ("accuracy", "macro_f1", "ece"))]
        for m in MODEL_NAMES
        if m in metrics
    ]
    if decision.champion_accuracy is not None:
        rows.append(
            [
                f"champion v{decision.champion_version} (re-scored)",
                f"{decision.champion_accuracy:.4f}",
                "",
                "",
            ]
        )
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def report_markdown(
    metrics: dict[str, Any], decision: GateDecision, name: str, version: str, promoted: bool
) -> str:
    """The evaluation report: every model side by side, then the gate's decision."""
    lines = [
        f"# graftline: {name} v{version}",
        "",
        *_markdown_table(FIGURES_HEADER, figure_rows(metrics, decision)),
    ]
    verdict = "**promoted** to champion" if promoted else "**not promoted**"
    lines += ["", f"Test items: {decision.n}. Gate: {verdict}. {decision.reason}."]
    return "\n".join(lines) + "\n"


def log_report(
    root: Path,
    name: str,
    version: str,
    decision: GateDecision,
    promoted: bool,
    metrics: dict[str, Any],
    packaged: Packaged,
) -> str:
    """Log the evaluation report to the active MLflow run (``report/report.html``, figures
    embedded: confusion matrices, learning curves of pretraining and fine-tuning, calibration,
    per-class accuracy against the champion, label efficiency); returns the markdown tables
    it adds to the Prefect artifact."""
    import tempfile

    import mlflow
    import pandas as pd

    from graftline.evaluate import per_class_accuracy, plot_per_class
    from graftline.report import html_report, table

    n = len(packaged.classes)
    per_class = {
        f"v{version}": per_class_accuracy(packaged.labels, packaged.scored.challenger_correct, n)
    }
    if packaged.scored.champion_correct is not None:
        per_class[f"champion v{packaged.scored.champion_version}"] = per_class_accuracy(
            packaged.labels, packaged.scored.champion_correct, n
        )
    rows = [[c, *(float(a[i]) for a in per_class.values())] for i, c in enumerate(packaged.classes)]
    efficiency_csv = root / paths.REPORTS / "label_efficiency.csv"
    efficiency = pd.read_csv(efficiency_csv) if efficiency_csv.exists() else None
    tables = {
        "Test figures": table(FIGURES_HEADER, figure_rows(metrics, decision)),
        "Per-class accuracy": table(["class", *per_class], rows),
    }
    if efficiency is not None:
        tables["Label efficiency (benchmarks/bench_label_efficiency.py)"] = table(
            list(efficiency.columns), efficiency.values.tolist()
        )
    verdict = (
        f"{'Promoted to champion' if promoted else 'Not promoted'}: {decision.reason} "
        f"({decision.n} test items)."
    )
    evaluate_dir = root / paths.EVALUATE_REPORT
    with tempfile.TemporaryDirectory(prefix="graftline-report-") as tmp:
        per_class_png = Path(tmp) / "per_class.png"
        plot_per_class(packaged.classes, per_class, per_class_png)

        def fig(path: Path, missing: str) -> Path | str:
            return path if path.exists() else missing

        figures = {
            "Confusion matrices (test split)": fig(
                evaluate_dir / "confusion.png", "not found (run evaluate)"
            ),
            "Learning curves: pretraining and fine-tuning": fig(
                evaluate_dir / "learning_curves.png", "not found (run evaluate)"
            ),
            "Per-class accuracy against the champion": per_class_png,
            "Calibration": fig(evaluate_dir / "calibration.png", "not found (run evaluate)"),
            "Label efficiency: test accuracy by labels per class": fig(
                efficiency_csv.with_suffix(".png"),
                "not measured yet: `python benchmarks/bench_label_efficiency.py` draws it",
            ),
        }
        page = html_report(f"graftline: {name} v{version}", verdict, tables, figures)
        mlflow.log_text(page, "report/report.html")
        mlflow.log_artifact(str(per_class_png), "report")
    lines = [
        "",
        "## Per-class accuracy",
        "",
        *_markdown_table(
            ["class", *per_class], [[r[0], *(f"{v:.4f}" for v in r[1:])] for r in rows]
        ),
    ]
    if efficiency is not None:
        lines += [
            "",
            "## Label efficiency (test accuracy)",
            "",
            *_markdown_table(
                ["labels per class", "finetuned", "scratch", "svc"],
                [
                    [
                        f"{r.labels_per_class} ({r.train_labels})",
                        *(
                            f"{v:.4f}"
                            for v in (r.finetuned_accuracy, r.scratch_accuracy, r.svc_accuracy)
                        ),
                    ]
                    for r in efficiency.itertuples()
                ],
            ),
        ]
    lines += ["", f"Figures: MLflow run {packaged.run_id}, artifact `report/report.html`."]
    return "\n".join(lines) + "\n"


def _source_text(manifest: dict[str, Any]) -> str:
    fit = (manifest.get("transform") or {}).get("fit", "resize")
    return f"`{manifest.get('source', '?')}` (fit: {fit})"


def _pretrained_text(params: Params, lineage: dict[str, str]) -> str:
    """How the backbone was pretrained, for the card: by graftline, or elsewhere (the
    Hugging Face checkpoint it started from, with its hash)."""
    if params.pretrain.init is not None:
        return (
            f"Started from the pretrained Hugging Face checkpoint "
            f"`{lineage.get('graftline.init.path', params.pretrain.init.path)}` "
            f"({lineage.get('graftline.init.model_type', '?')}, "
            f"{lineage.get('graftline.init.architectures', '?')}, "
            f"{lineage.get('graftline.init.weights', '?')} weights; folder sha256 "
            f"`{lineage.get('graftline.init.sha256', '?')[:16]}`), nothing pretrained here"
        )
    how = {
        "mae": "without labels (masked autoencoding) ",
        "contrastive": "without labels (contrastive, SimCLR) ",
        "causal_lm": "without labels (language modelling: the next token) ",
        "mlm": "without labels (masked language modelling: 15 % of the tokens) ",
    }.get(params.pretrain.objective, "with labels (supervised) ")
    return f"Pretrained {how}for {params.pretrain.train.epochs} epochs"


def start_tags(params: Params, root: Path = Path(".")) -> dict[str, str]:
    """Which pretrained checkpoint the model started from (``graftline.init.*`` lineage
    tags), as the pretrain stage recorded it; none when graftline pretrained it itself."""
    from graftline.models.checkpoint import read_checkpoint

    if params.pretrain.init is None:
        return {}
    try:
        record = read_checkpoint(root / paths.PRETRAINED / paths.MODEL_FILE)["model_config"]["init"]
    except (ArtifactError, KeyError):
        return {"graftline.init.path": params.pretrain.init.path}
    return {
        f"graftline.init.{k}": ", ".join(v) if isinstance(v, list) else str(v)
        for k, v in record.items()
        if k != "kind"
    }


# who labels the corpus for the student (distill.teacher), in the model card's words
_TEACHERS = {
    "finetuned": "that model",
    "nb_em": "naive Bayes trained with EM over the corpus (Nigam et al., 2000)",
    "both": "that model and naive Bayes trained with EM over the corpus, multiplied",
}


def model_card(
    root: Path,
    params: Params,
    version: str,
    decision: GateDecision,
    promoted: bool,
    lineage: dict[str, str],
    metrics: dict[str, Any],
    exports: dict[str, str] | None = None,
) -> str:
    """The registered version's description in the MLflow UI: what the model is, the data
    it learnt from, its test figures against the baselines and the champion, the gate's
    decision, its exports, and how to rebuild it."""
    from graftline.data.store import read_manifest
    from graftline.data.text import describe_text_transform
    from graftline.data.transforms import describe_transform
    from graftline.models.checkpoint import input_transform, load_checkpoint

    name, folder = deployed(params)
    model, ckpt = load_checkpoint(root / folder / paths.MODEL_FILE)
    n_params = sum(p.numel() for p in model.parameters())
    hidden = ("normalize", "hf_config", "init")  # shown apart, or too long for a line
    arch = ", ".join(
        f"{k}={v}" for k, v in ckpt["model_config"].items() if v is not None and k not in hidden
    )
    norm = ckpt["model_config"].get("normalize")
    tf = input_transform(ckpt)
    shape = "x".join(str(d) for d in ckpt["input_shape"])
    ft = params.finetune
    lines = [
        f"## {params.deploy.model_name} v{version}",
        "",
        "**Model.** "
        f"Backbone `{ckpt['model_config'].get('arch', '?')}` ({arch}), {n_params:,} parameters, "
        f"{len(ckpt['classes'])} classes ({', '.join(ckpt['classes'])}). "
        + _pretrained_text(params, lineage)
        + ", then a new head grafted on and "
        f"fine-tuned with strategy `{ft.strategy}` for {ft.train.epochs} epochs"
        + (
            "; this is the student distilled on the corpus's soft targets from "
            + _TEACHERS[params.distill.teacher]
            + f" (T={params.distill.temperature}) and the labels, "
            + (
                "starting from the pretrained backbone (self-training), "
                if params.distill.init == "pretrained"
                else "trained from scratch, "
            )
            + f"{params.distill.train.epochs} epochs."
            if name == "student"
            else "."
        ),
        (
            f"Input: texts; {describe_text_transform(tf)}. "
            if tf.get("kind") == "text"
            else f"Input: {shape} images; transform `{tf['fit']}`: {describe_transform(tf)}"
        )
        + (
            f", then normalised by the backbone, mean {norm['mean']} and std {norm['std']} per "
            "channel. "
            if norm
            else ". "
        )
        + "Serving and batch prediction apply the same.",
        *(
            [
                "",
                "**Word model.** Its class distribution is the network's multiplied by a naive "
                "Bayes over word 1- to "
                f"{model.words.ngrams}-grams ({model.words.size:,} of them) trained "
                "with EM over the "
                "labels and the corpus (Nigam et al., 2000; `finetune.nb_em`), and normalised "
                f"at temperature {model.words.temperature:.2f} (fitted on the validation "
                "split: it calibrates the product), "
                "in evaluation, serving and batch prediction alike. The ONNX and Hugging Face "
                "exports are the network's part alone.",
            ]
            if getattr(model, "words", None) is not None
            else []
        ),
        "",
        "**Data.**",
        "",
        "| set | source | splits | content hash (DVC) |",
        "|---|---|---|---|",
    ]
    for name, folder, key in (
        ("pretraining corpus", paths.PRETRAIN_DATA, "graftline.dvc.pretrain_data"),
        ("task set", paths.TASK_DATA, "graftline.dvc.task_data"),
    ):
        try:
            m = read_manifest(root / folder)
        except ArtifactError:
            continue
        splits = ", ".join(f"{s} {v['count']}" for s, v in m["splits"].items())
        src = _source_text(m)
        lines.append(f"| {name} | {src} | {splits} | `{lineage.get(key, '?')}` |")
    lines += [
        "",
        f"Label budget: {params.preprocess.task.labels_per_class} labelled examples per class.",
        "",
        "**Test figures** (the task's test split; the champion re-scored on the same items).",
        "",
        *_markdown_table(FIGURES_HEADER, figure_rows(metrics, decision)),
    ]
    verdict = "promoted to champion" if promoted else "not promoted"
    lines += [
        "",
        f"**Gate.** {verdict}: {decision.reason} ({decision.n} test items"
        + (f", McNemar p={decision.p_value:.3g}" if decision.p_value is not None else "")
        + ").",
        "",
        *(
            [
                "**Exports.** `model.onnx` (ONNX Runtime: `graftline serve --runtime onnx`), "
                f"{int(exports['graftline.export.onnx_bytes']):,} bytes, its logits within "
                f"{exports['graftline.export.onnx_max_abs_diff']} of PyTorch's on the test items.",
                "",
            ]
            if exports and "graftline.export.onnx_bytes" in exports
            else []
        ),
        *(
            [
                f"Hugging Face: `{exports['graftline.export.huggingface']}` in the artifact "
                "folder `huggingface/` (with its tokenizer and label names): "
                "`AutoModelForSequenceClassification.from_pretrained` loads it offline.",
                "",
            ]
            if exports
            and exports.get("graftline.export.huggingface", "none").endswith("Classification")
            else []
        ),
        "**Reproduce.** "
        f"`graftline reproduce {version}` rebuilds it from git commit "
        f"`{lineage.get('graftline.git_commit', '?')}` and the data above (DVC), and compares "
        "the weights. Trained with torch "
        f"{lineage.get('graftline.env.torch', '?')} on {lineage.get('graftline.env.device', '?')}"
        f" ({lineage.get('graftline.env.cpu', '?')}, "
        f"{lineage.get('graftline.env.threads', '?')} threads, CPU kernels at "
        f"{lineage.get('graftline.env.cpu_capability', '?')}): another CPU model, CPU "
        "capability or torch version may compute other last bits."
        + (
            f" Prefect flow run `{lineage['graftline.prefect_flow_run_id']}`."
            if lineage.get("graftline.prefect_flow_run_id")
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def already_registered(
    params: Params, root: Path = Path("."), model_md5: str | None = None
) -> str | None:
    """The version already registered from the current deployed model (fine-tuned or
    student, by its dvc.lock hash, read from ``root`` unless given), if any: re-registering
    an unchanged model would only add a duplicate version."""
    from mlflow import MlflowClient

    tracking.configure(root)
    tag = model_tag(params)
    md5 = model_md5 or tracking.dvc_lock_hashes(root).get(tag)
    if not md5:
        return None
    name = params.deploy.model_name
    for mv in MlflowClient().search_model_versions(f"name = '{name}'"):
        if mv.tags.get(tag) == md5:
            return str(mv.version)
    return None


def export_huggingface(
    checkpoint: Path, test: Any, folder: Path
) -> tuple[Path | None, dict[str, str]]:
    """A text checkpoint as its ``transformers`` sequence-classification model (with its
    tokenizer and label names) in ``folder/huggingface``, checked against graftline's logits
    on the test split; ``None`` for a mean-pooled model, which no Hugging Face class reads
    (its tag says so). A failed check is an :class:`ArtifactError`."""
    from graftline.export import (
        HF_DIR,
        ExportError,
        export_huggingface_classifier,
        hf_classifier_class,
    )
    from graftline.models.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    name = hf_classifier_class(model)
    if name is None:
        return None, {
            "graftline.export.huggingface": "none: a mean-pooled model has no Hugging Face "
            "class (pool: last for llama, cls for bert exports)"
        }
    try:
        diff = export_huggingface_classifier(
            model, list(ckpt["classes"]), test.transform, folder / HF_DIR, test.images[:256]
        )
    except ExportError as err:
        raise ArtifactError(f"{checkpoint}: {err}; nothing was registered") from None
    return folder / HF_DIR, {
        "graftline.export.huggingface": name,
        "graftline.export.huggingface_max_abs_diff": f"{diff:.3g}",
    }


@dataclass
class Packaged:
    """The fine-tuned model logged to MLflow and scored, with the champion scored beside it:
    everything the gate needs, none of it visible in the registry yet."""

    run_id: str
    model_uri: str
    scored: Challenge
    labels: np.ndarray  # the test items' true class indices, for per-class figures
    classes: list[str]
    # What the exports' checks found, as the version's tags (graftline.export.*).
    export_tags: dict[str, str] = field(default_factory=dict)


def export_onnx(
    checkpoint: Path, test: Any, folder: Path, tolerance: float
) -> tuple[Path, dict[str, str]]:
    """``model.onnx`` of a checkpoint in ``folder``, checked against PyTorch on the test split;
    the file and its tags (the largest logit difference, its size, the seconds it took).
    An export that fails or disagrees is an :class:`ArtifactError` naming the difference."""
    import time

    from graftline.data.modules import data_module
    from graftline.export import ONNX_FILE, ExportError, export_checked
    from graftline.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    started = time.perf_counter()
    path = folder / ONNX_FILE
    try:
        diff = export_checked(model, data_module(test), path, tolerance)
    except ExportError as err:
        raise ArtifactError(
            f"{checkpoint}: {err}; nothing was registered (deploy.export.onnx: false skips "
            "the export)"
        ) from None
    return path, {
        "graftline.export.onnx_max_abs_diff": f"{diff:.3g}",
        "graftline.export.onnx_bytes": str(path.stat().st_size),
        "graftline.export.onnx_seconds": f"{time.perf_counter() - started:.1f}",
        "graftline.export.onnx_tolerance": f"{tolerance:g}",
    }


def package(params: Params, root: Path = Path(".")) -> Packaged:
    """Log the fine-tuned model to the active MLflow run and score it, and the champion, on
    the task test split.

    It needs only what ``finetune`` wrote, so the flow runs it beside ``evaluate``; the
    registry is not touched until :func:`run`. Scoring the champion early is safe: the
    promotion re-reads the champion and refuses if it changed since.
    """
    import mlflow

    name, folder = deployed(params)
    checkpoint = root / folder / paths.MODEL_FILE
    if not checkpoint.exists():
        raise ArtifactError(f"{checkpoint}: no {name} model (run the pipeline first)")
    test = load_split(root / paths.TASK_DATA, "test")
    truth = [test.classes[i] for i in test.labels]
    images: Any = test.images.astype(np.float32)
    if test.transform.get("kind") == "text":  # scored as served: the texts, tokenized there
        if test.texts is None:
            raise ArtifactError(f"{root / paths.TASK_DATA}: the test split keeps no texts")
        images = pd.DataFrame({"text": test.texts})
    run_id = mlflow.active_run().info.run_id
    with tempfile.TemporaryDirectory(prefix="graftline-export-") as tmp:
        exports: dict[str, Path] = {}
        export_tags: dict[str, str] = {}
        if params.deploy.export.onnx:
            exports["onnx"], export_tags = export_onnx(
                checkpoint, test, Path(tmp), params.deploy.export.tolerance
            )
        if test.transform.get("kind") == "text":
            folder, hf_tags = export_huggingface(checkpoint, test, Path(tmp))
            export_tags |= hf_tags
            if folder is not None:
                exports["huggingface"] = folder
        info = log_model(checkpoint, images[:1], exports)
    # Score what was logged, loaded back through MLflow: this is what will serve, and a
    # partial write fails here, before any alias moves.
    champion = Registry(params.deploy.model_name).champion()
    champ_version = None if champion is None else str(champion.version)
    try:
        scored = challenge(params.deploy.model_name, info.model_uri, champ_version, images, truth)
    except RegistryError as err:
        raise ArtifactError(str(err)) from None
    return Packaged(run_id, info.model_uri, scored, test.labels, list(test.classes), export_tags)


def run(
    params: Params,
    root: Path = Path("."),
    flow_run_id: str | None = None,
    packaged: Packaged | None = None,
) -> dict[str, Any]:
    """Register, gate and (if it passes) promote the fine-tuned model, packaging it first
    unless ``packaged`` (from :func:`package`, in the active run) is given."""
    import mlflow

    p = params.deploy
    if packaged is None:
        packaged = package(params, root)
    lineage = {
        **tracking.lineage_tags(root, flow_run_id),
        **training_environment(params, root),
        **start_tags(params, root),
    }
    registry = Registry(p.model_name)
    version = registry.register(packaged.model_uri, packaged.run_id, tags=lineage)
    champ_version = packaged.scored.champion_version
    decision = packaged.scored.decide(**p.gate.model_dump())
    promoted = False
    if decision.passed:
        try:
            registry.promote(version, expected_champion=champ_version, reason=decision.reason)
            promoted = True
        except PromotionConflict as err:
            decision = GateDecision(
                False,
                str(err),
                decision.challenger_accuracy,
                decision.champion_accuracy,
                champ_version,
                decision.p_value,
                decision.n,
            )
    for key, value in {
        **decision.as_tags(),
        **packaged.export_tags,
        "graftline.params": json.dumps(params.model_dump(mode="json"), sort_keys=True)[:5000],
    }.items():
        registry.client.set_model_version_tag(p.model_name, version, key, value)
    mlflow.set_tags({**lineage, "graftline.model_version": version, **decision.as_tags()})
    metrics_path = root / paths.METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    markdown = report_markdown(metrics, decision, p.model_name, version, promoted)
    card = model_card(
        root, params, version, decision, promoted, lineage, metrics, packaged.export_tags
    )
    registry.client.update_model_version(p.model_name, version, description=card)
    markdown += log_report(root, p.model_name, version, decision, promoted, metrics, packaged)
    log.info(
        "deploy: %s v%s %s: %s",
        p.model_name,
        version,
        "promoted" if promoted else "not promoted",
        decision.reason,
    )
    return {
        "metrics": {
            "challenger_accuracy": decision.challenger_accuracy,
            "promoted": float(promoted),
        },
        "version": version,
        "promoted": promoted,
        "decision": decision,
        "model_uri": packaged.model_uri,
        "markdown": markdown,
    }


if __name__ == "__main__":
    sys.exit(stage_main("deploy", run))
