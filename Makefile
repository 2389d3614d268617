# Two commands do all the set-up on a fresh machine:
#   make demo   generate demo data, train, export, serve, classify an image with curl
#   make test   the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
# make serve listens on every interface (reachable from other hosts); HOST=127.0.0.1: this host only
HOST ?= 0.0.0.0
MODEL ?= vit-classifier

.PHONY: install test test-slow fuzz mutation mutation-report demo serve bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes; torch/torchvision come from the machine's cache.
# pip's "Collecting ..." lines are the progress (one per package); all of its output is kept in
# $(VENV)/pip-install.log, and its end is shown if it fails.
$(STAMP): pyproject.toml
	@echo "==> installing the project into $(VENV) (first time only: a few minutes; one line per package)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@set -o pipefail; start=$$SECONDS; \
	  $(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]' 2>&1 | tee $(VENV)/pip-install.log \
	  | awk '/^Collecting|^Successfully installed/ { print "    " substr($$0, 1, 116); fflush() }' \
	  || { tail -n 30 $(VENV)/pip-install.log; echo "pip install failed: $(VENV)/pip-install.log"; exit 1; }; \
	  echo "==> installed in $$((SECONDS - start)) s"
	@touch $(STAMP)

# Two pytest-xdist workers, a test file each at a time (module fixtures such as a served model
# stay in one process): one pytest process kept ~1.1 of 2 cores busy (most tests run a subprocess
# or a server start on one core). The longest files are handed out first (tests/file_order.py), so
# the two end together. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The upload fuzz of the fast set (150 examples, fixed seed) at length, with a random seed that
# hypothesis prints with a failure (a failing example is also replayed from .hypothesis/).
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz_uploads.py -q -s

# Mutation testing (mutmut 3; not part of `make test`): every module of scripts/mutation.py's
# MODULES, or MODULE=vit_service/preprocessing.py; results cached in .mutation/ (an interrupted
# run continues). MUTATION_ARGS: e.g. --budget 540 (stop after 9 min), --survivors, --jobs 2.
MODULE ?=
MUTATION_ARGS ?=
mutation: $(STAMP)
	@test -x $(BIN)/mutmut || $(BIN)/python -m pip install -q 'mutmut>=3.8,<4'
	$(BIN)/python scripts/mutation.py run $(MODULE) $(MUTATION_ARGS)

mutation-report:
	$(BIN)/python scripts/mutation.py report $(MODULE)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" PORT=$(PORT) MODEL=$(MODEL) bash scripts/demo.sh

serve: $(STAMP)
	VIT_MODEL_TAG=$(MODEL):latest $(BIN)/bentoml serve vit_service.serving.service:ViTClassifier --host $(HOST) --port $(PORT)

bench: $(STAMP)
	$(BIN)/python bench/model_speed.py

clean:
	rm -rf runs data/demo
