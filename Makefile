# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for development and CI (users get whatever torch>=2.4 fits their machine).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-test test demo lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" -e ".[test]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/af3 demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
