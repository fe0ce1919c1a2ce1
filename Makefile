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
FAIRSEQ_STAMP := $(VENV)/.installed-fairseq

# Nothing is ever downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-fairseq demo test test-fast test-faults extract train evaluate bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

# The optional fairseq extra (wav2vec 1.0/2.0, HuBERT, RoBERTa checkpoints of the paper). It compiles
# C extensions, so it needs numpy and cython first and --no-build-isolation. It pulls a torchaudio
# wheel that cannot load beside a CPU torch 2.13 (and transformers imports torchaudio when present):
# emofuse never uses torchaudio, so it is removed. If the build fails, its tests skip with a reason.
setup-fairseq: $(FAIRSEQ_STAMP)

$(FAIRSEQ_STAMP): $(STAMP)
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt numpy cython
	$(BIN)/python -m pip install --no-build-isolation -c $(VENV)/constraints.txt "fairseq-fixed==0.12.3.1" \
		|| echo "WARNING: the fairseq extra did not install; tests/test_fairseq.py will skip"
	$(BIN)/python -m pip uninstall -y torchaudio
	touch $(FAIRSEQ_STAMP)

demo: $(STAMP)
	$(BIN)/emofuse demo

test: $(STAMP) $(FAIRSEQ_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The fault-injection tests alone (kill loop, disk full, two writers, hostile inputs, foreign caches;
# docs/reliability.md): `make test` runs them too.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

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
