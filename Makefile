# Two entry points (see README): `make demo` and `make test`.
# A local virtual environment keeps the set-up self-contained. torch is installed first and
# pinned to 2.13.0: an unpinned torch pulls several GB of CUDA packages on CPU-only machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,s3]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/zshard train examples/tiny.yaml

lint: venv
	$(BIN)/ruff check zshard tests tools
	$(BIN)/ruff format --check zshard tests tools
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
