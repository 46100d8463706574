# Every target bootstraps .venv on first use, so a newcomer types one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions for Python 3.11 on Linux x86-64 (refresh with `make lock`); pyproject.toml keeps ranges.
LOCK := requirements/cpu.lock
TORCH_PIN := $(shell grep -m1 '^torch==' $(LOCK))
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?= --durations=25
DEMO_RANKS ?= 2

.PHONY: setup lock demo demo-assets test test-slow reproduce-search reproduce bench gpu-wheels gpu-check lint format clean

setup: $(STAMP)

# Installs exactly the lock. Without an NVIDIA GPU, torch is the locked +cpu build: from a wheel pip
# already finds (a local wheel folder), else from PyTorch's CPU index. With one, torch is the CUDA build of
# the same version from PyPI (with the CUDA libraries it pins), and the rest of the lock as it is.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q --no-deps "$(TORCH_PIN)" 2>/dev/null \
	    || $(PY) -m pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)"; \
	  $(PY) -m pip install -q --no-deps -r $(LOCK); \
	else \
	  $(PY) -m pip install -q "$(subst +cpu,,$(TORCH_PIN))"; \
	  $(PY) -m pip install -q --no-deps -r <(grep -v '^torch==' $(LOCK)); \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# Re-resolves the lock to the newest releases pyproject.toml allows, under requirements/pins.txt. The +cpu
# torch wheel comes from pip's local wheel folder where one is configured, else from PyTorch's CPU index.
LOCK_SOURCES ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url $(TORCH_CPU_INDEX))
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --extra dev --upgrade \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
	  $(LOCK_SOURCES) -c requirements/pins.txt --no-emit-index-url --no-emit-find-links \
	  --custom-compile-command "make lock" -o $(LOCK)

# The main job on the embedded defaults: tiny Llama, bundled data, 2 ZeRO-3 ranks, MLflow in ./mlflow.db.
demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_accelerators $(DEMO_RANKS) launch/train.py \
	  --ds ds_configs/zero3.json --config configs/demo.yaml

# Regenerates configs/data/demo and configs/models/tiny-demo (committed; identical for a seed up to the transformers version in config.json).
demo-assets: $(STAMP)
	$(PY) -m hdpo_ds.examples.demo_assets

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The tests beyond CI's budget (marked slow). The toy study is its own target (`reproduce`, 38 min).
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The toy study's setting, chosen once for DPO on validation prompts (16 min on 2 cores); writes
# configs/toy/search.json (committed; `reproduce` reads it) and its section of docs/results.md.
reproduce-search: $(STAMP)
	$(PY) -m hdpo_ds.examples.toy.search --out outputs/toy --results docs/results.md

# SFT -> sampled pairs -> H-DPO for alpha 0.8 / 0.9 / 0.95 / 1.0 / 1.1 with the frozen setting -> pass@k,
# beside an NLL-only control, 3 seeds, and the monitors' run, on CPU (38 min on 2 cores after the search).
# Stages whose outputs exist in outputs/toy are skipped; rm -rf outputs/toy starts over.
reproduce: $(STAMP)
	$(PY) -m hdpo_ds.examples.toy.reproduce --out outputs/toy --results docs/results.md \
	  --plot docs/img/toy-passk.png --trajectory-plot docs/img/toy-monitors.png

# The wheels bench/gpu_check.py carries to a GPU machine without network (DeepSpeed, ...; into .whl/).
gpu-wheels: $(STAMP)
	bash bench/gpu_wheels.sh .whl

# On a machine with a CUDA GPU: the GPU path's checks and throughput (docs/benchmarks.md "GPU check").
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out gpu_check.json

# Every command that produced a table in docs/benchmarks.md (its rows name their commands; some are
# historical, with the commit that produced them).
bench: $(STAMP)
	$(PY) bench/token_stats_memory.py
	$(PY) bench/token_stats_memory.py --kl --dtypes float32,bfloat16 --chunk-sizes 1024,512
	$(PY) bench/packing.py
	$(PY) bench/train_throughput.py --steps 16
	$(PY) bench/ref_modes.py --steps 16 --hidden 128 --layers 4
	$(PY) bench/ref_modes.py --steps 12
	$(PY) bench/mlflow_logging.py
	$(PY) bench/plan_rss.py
	$(PY) bench/token_stats_collision.py --reps 8
	$(PY) bench/fused_head.py head --hidden 128 --dtypes float32
	$(PY) bench/fused_head.py head --hidden 1024 --vocabs 128256 --tokens 4096 --dtypes float32 --reps 2
	$(PY) bench/fused_head.py head --hidden 16 --vocabs 128256 --tokens 4096 --dtypes bfloat16
	$(PY) bench/fused_head.py step
	$(PY) bench/data_scale.py --train-steps 2
	$(PY) bench/lora.py
	$(PY) bench/sequence_parallel.py --steps 4
	$(PY) bench/moe_leaf.py
	$(PY) bench/moe_leaf.py --steps 12

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
