# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv first, with
# what it needs: the demo the `demo` extra, the tests every extra (`dev`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(VENV)/.installed-%: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$*]"
	touch $@

install: $(VENV)/.installed-dev

# `make demo` runs on NPROC processes under torch's own launcher: the teacher trains beside the
# student's pretraining, then each process trains whole held-out domains. Its figures do not
# depend on NPROC (each process runs one compute thread). TRIALS=N: DomainBed's trials 0..N-1.
NPROC ?= 2
TRIALS ?= 1
demo: $(VENV)/.installed-demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m vl2v demo --trials $(TRIALS)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
