# The two set-up commands of the README: `make serve` and `make test`. Both build .venv from the repo's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on CPU machines pip takes the local CPU build; a looser spec can pull multi-GB CUDA wheels.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The peers' own client code for the integration tests; --no-deps: their pins (flash-attn, deepspeed, ray,
	# an older transformers) are for training clusters, and the tests import only their HTTP clients.
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2 verl==0.9.1
	touch $@

.PHONY: install serve test lint
install: $(VENV)/.installed

serve: install  ## the reward server on embedded defaults (bundled model, CPU, http://127.0.0.1:8000)
	$(VENV)/bin/r2m serve

lint: install
	$(VENV)/bin/ruff check .

test: lint  ## ruff, then the whole test suite (starts its own servers)
	$(VENV)/bin/pytest -q
