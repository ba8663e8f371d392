# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/vl2v: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/vl2v

install: $(BIN)/vl2v

demo: install
	$(BIN)/vl2v demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
