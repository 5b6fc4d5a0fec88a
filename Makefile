# Set-up and the two everyday jobs. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU build of torch FIRST (so nothing pulls a multi-GB CUDA build),
# then goose with its test extras.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/goose generate --prompt "The Eiffel tower is in the city of" --max-tokens 60

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/goose bench wkv

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
