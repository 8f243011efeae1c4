"""Where each stage reads and writes, relative to the repo root (the stages, the CLI and
the library share it).

``dvc.yaml`` declares the same paths; ``tests/unit/test_dvc_wiring.py`` checks that the two
agree, so neither can drift.
"""

from pathlib import Path

# The DVC stages in the flow's order (deploy follows them, outside DVC).
STAGES = ("preprocess", "pretrain", "finetune", "distill", "evaluate")
PARAMS = Path("params.yaml")
RAW = Path("data/raw")
PROCESSED = Path("data/processed")
PRETRAIN_DATA = PROCESSED / "pretrain"
TASK_DATA = PROCESSED / "task"
# Splits beside an unlabelled pretraining corpus: the task's labelled train and val splits,
# which its k-NN monitor uses as bank and queries.
PROBE_BANK, PROBE_QUERY = "probe_bank", "probe_query"
MODELS = Path("models")
PRETRAINED = MODELS / "pretrained"
FINETUNED = MODELS / "finetuned"
SCRATCH = MODELS / "scratch"
STUDENT = MODELS / "student"
MODEL_FILE = "model.pt"
REPORTS = Path("reports")
PRETRAIN_REPORT = REPORTS / "pretrain"
FINETUNE_REPORT = REPORTS / "finetune"
DISTILL_REPORT = REPORTS / "distill"
EVALUATE_REPORT = REPORTS / "evaluate"
METRICS = REPORTS / "metrics.json"
# Resume checkpoints live outside DVC's outs: DVC deletes a stage's outs before re-running
# it, and a crashed run must find its last epoch again.
CHECKPOINTS = Path(".graftline/checkpoints")
# What each model's training ran on (graftline.train.environment), beside the checkpoints and
# outside DVC's outs for the same reason, and because it differs between machines whose
# models may be bit-identical: in an out it would make their hashes differ.
ENVIRONMENT = Path(".graftline/environment")
