# Two commands do all the set-up on a fresh machine:
#   make demo   generate demo data, train, export, serve, classify an image with curl
#   make test   the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
MODEL ?= vit-classifier

.PHONY: install test test-slow demo serve bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes; torch/torchvision come from the machine's cache.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" PORT=$(PORT) MODEL=$(MODEL) bash scripts/demo.sh

serve: $(STAMP)
	VIT_MODEL_TAG=$(MODEL):latest $(BIN)/bentoml serve vit_service.serving.service:ViTClassifier --port $(PORT)

bench: $(STAMP)
	$(BIN)/python bench/model_speed.py

clean:
	rm -rf runs data/demo
