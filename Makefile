# The README's commands. `make test` builds everything it needs from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint unit bench bench-featurize bench-fidelity bench-fisher bench-index bench-query bench-build bench-soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: the project's own `torch>=` range then installs nothing more.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[test,bench,hf,milvus]'
	touch $(STAMP)

# A .venv with CPU torch, gradindex in editable mode, the test and bench tools, the
# Hugging Face extra (language models) and the Milvus extra (pymilvus, milvus-lite).
install: $(STAMP)

# Train the digits classifier, index it and serve it (reuses what is built): on 127.0.0.1:8000,
# or GRADINDEX_HOST/GRADINDEX_PORT, or `make demo HOST=... PORT=...`.
demo: $(STAMP)
	$(BIN)/gradindex demo$(if $(HOST), --host $(HOST))$(if $(PORT), --port $(PORT))

lint: $(STAMP)
	$(BIN)/ruff check gradindex client tests bench examples
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests

test: lint unit

# Long measurements; each writes its tables (and plots) and bench/RESULTS.md says which ran.
bench: bench-featurize bench-fidelity bench-fisher bench-query bench-soak bench-index bench-build

bench-featurize: $(STAMP)
	$(BIN)/python bench/featurize.py

bench-fidelity: $(STAMP)
	$(BIN)/python bench/fidelity.py
	$(BIN)/python bench/fidelity.py --fisher

# What the default Fisher adds to a featurize: model passes, and the stage as a build runs it.
bench-fisher: $(STAMP)
	$(BIN)/python bench/fisher_cost.py --mnist --stage
	$(BIN)/python bench/fisher_cost.py --mnist --stage --no-logits
	$(BIN)/python bench/fisher_cost.py

bench-query: $(STAMP)
	BIN=$(BIN) bench/query_load.sh

# 64 clients for 60 s on PostgreSQL (deletes, a refinalize), then again with a database outage.
bench-soak: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/soak.py

# About 45 minutes and 11 GB at 1e6 vectors.
bench-index: $(STAMP)
	$(BIN)/python bench/index_scale.py

# The whole CLI build against plain training epochs, with a breakdown per stage (~5 minutes).
bench-build: $(STAMP)
	$(BIN)/python bench/build_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
