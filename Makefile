# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for development and CI (users get whatever torch>=2.4 fits their machine).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-test browser test demo lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" -e ".[test]"
	@$(MAKE) --no-print-directory browser
	touch $@

# The browser the web page tests drive: Debian's chromium (never `playwright install`, which downloads browsers).
# Installed when missing and apt-get is usable as root; never fails the set-up (the tests then skip and say why).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) \
			|| echo "warning: could not install chromium; the web page tests (tests/serve/test_web.py) will skip"; \
	else \
		echo "note: /usr/bin/chromium is missing and apt-get is not usable as root; the web page tests will skip"; \
	fi

venv: $(BIN)/python
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test browser

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/af3 demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
