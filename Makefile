# The commands a person types. Each one creates or updates .venv from pyproject.toml first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WARM_IMPORTS := graftline.cli, flows.pipeline, graftline.serve.app, tasks.preprocess, \
	tasks.pretrain, tasks.finetune, tasks.distill, tasks.evaluate, tasks.deploy, \
	dvc.cli, mlflow.server, transformers, peft, onnxruntime, pytest
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Bytecode is written when a module is first imported (see the install recipe), so this must
# not be set for the commands below.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help install run repro schedule mlflow-ui test lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	# --no-compile: compiling all 27,000 files of the environment was 65 of pip's 100 s of CPU.
	# What graftline's commands import is compiled by importing it once here; the rest of the
	# environment is compiled when something first imports it.
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev,production]'
	$(BIN)/python -c 'import $(WARM_IMPORTS)'
	touch $(STAMP)

install: $(STAMP)  ## create or update the virtual environment

run: $(STAMP)  ## run the whole pipeline on the default data (Prefect flow: DVC stages, MLflow, gate, deploy)
	$(BIN)/graftline run

repro: $(STAMP)  ## reproduce the DVC pipeline only (no registry changes)
	$(BIN)/dvc repro

schedule: $(STAMP)  ## serve the scheduled retraining deployment (Prefect; Ctrl-C stops)
	$(BIN)/graftline schedule

mlflow-ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000 (runs, registry, aliases)
	# Without MLflow's GenAI job runner (eight processes; graftline submits no jobs).
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

test: $(STAMP)  ## lint, format check and the test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Three workers on two cores, a test file each: a quarter of the suite waits on servers,
	# subprocesses and schedules (measured: 22.7 min against 27.4 with two workers).
	$(BIN)/pytest -n 3 --dist loadfile --durations=10

lint: $(STAMP)  ## ruff lint
	$(BIN)/ruff check .

format: $(STAMP)  ## ruff format in place
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## all benchmarks except full MNIST (see benchmarks/README.md)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_throughput.py
	$(BIN)/python benchmarks/bench_flow.py
	$(BIN)/python benchmarks/bench_stage_startup.py
	$(BIN)/python benchmarks/bench_serve.py

clean:  ## remove pipeline outputs (DVC can restore them: dvc checkout)
	rm -rf data/processed models reports/evaluate .graftline
