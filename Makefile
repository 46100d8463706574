# Every target bootstraps .venv on first use, so a newcomer types one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0
PYTEST_ARGS ?=
DEMO_RANKS ?= 2

.PHONY: setup demo demo-assets test test-slow reproduce bench lint format clean

setup: $(STAMP)

# No NVIDIA GPU: install the CPU wheel of torch first, or pip would resolve `torch` to the CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded defaults: tiny Llama, bundled data, 2 ZeRO-3 ranks, MLflow in ./mlflow.db.
demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_accelerators $(DEMO_RANKS) launch/train.py \
	  --ds ds_configs/zero3.json --config configs/demo.yaml

# Regenerates configs/data/demo and configs/models/tiny-demo (committed; byte-identical for a seed).
demo-assets: $(STAMP)
	$(PY) -m hdpo_ds.demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The slow tests, and the toy reproduction of H-DPO's alpha trade-off (which rewrites its part of docs/results.md).
test-slow: $(STAMP) reproduce
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# SFT -> sampled pairs -> H-DPO for alpha 0.8 / 0.9 / 1.0 / 1.1 -> pass@k, 3 seeds, on CPU (under an hour on
# 2 cores). Stages whose outputs exist in outputs/toy are skipped; rm -rf outputs/toy starts over.
reproduce: $(STAMP)
	$(PY) -m hdpo_ds.toy.reproduce --out outputs/toy --results docs/results.md --plot docs/img/toy-passk.png

bench: $(STAMP)
	$(PY) bench/token_stats_memory.py
	$(PY) bench/packing.py
	$(PY) bench/train_throughput.py
	$(PY) bench/ref_modes.py
	$(PY) bench/plan_rss.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
