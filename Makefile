# Everyday entry points. `make demo` and `make test` set up .venv on first use:
# torch pinned first (a plain `torch` would fetch a multi-GB CUDA build), then everything else
# with that pin as a constraint so nothing replaces it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
CONFIG ?= configs/demo.yaml
RUN    ?= runs/demo
STAMP  := $(VENV)/.installed-$(TORCH)

# Nothing is ever downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast extract train evaluate bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/emofuse demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

extract: $(STAMP)
	$(BIN)/emofuse extract $(CONFIG)

train: $(STAMP)
	$(BIN)/emofuse train $(CONFIG)

evaluate: $(STAMP)
	$(BIN)/emofuse evaluate $(RUN)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo_out runs cache .pytest_cache
