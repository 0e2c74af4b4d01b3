# Two entry points (see README): `make demo` and `make test`.
# A local virtual environment keeps the set-up self-contained. torch is installed first and
# pinned to 2.13.0: an unpinned torch pulls several GB of CUDA packages on CPU-only machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean wheel-check

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
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The package as a user gets it, with no checkout: build the sdist and, from it, the wheel; install
# the wheel into a fresh virtual environment (torch first, as above); from a directory outside the
# checkout run `zshard demo`, `zshard init` and 3 steps of `zshard train tiny`, then verify the
# checkpoint. Any failure fails the target; the temporary directory is removed either way. For
# speed the throwaway venv gets no pip of its own (.venv's pip installs into it with --python) and
# no byte-compiling; the build uses .venv's setuptools (--no-isolation).
wheel-check: venv
	@set -eu; unset PYTHONPATH; \
	tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/zshard-wheel-check.XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
	echo "wheel-check: build the sdist and wheel"; \
	$(BIN)/python -m build --no-isolation --outdir "$$tmp/dist" . >"$$tmp/build.log" 2>&1 \
		|| { cat "$$tmp/build.log"; exit 1; }; \
	echo "wheel-check: install $$(cd "$$tmp/dist" && ls *.whl) into a fresh venv"; \
	$(PYTHON) -m venv --without-pip "$$tmp/venv"; \
	install() { $(BIN)/pip --python "$$tmp/venv/bin/python" install -qq --no-compile "$$@"; }; \
	install "$(TORCH_SPEC)"; \
	install "$$tmp"/dist/zshard-*.whl; \
	mkdir "$$tmp/work"; cd "$$tmp/work"; \
	"$$tmp/venv/bin/python" -c 'import importlib.metadata as m, importlib.resources as r; \
		files = [str(f) for f in m.files("zshard")]; \
		assert any(f.endswith("LICENSE") for f in files), "no LICENSE"; \
		assert r.files("zshard").joinpath("py.typed").is_file(), "no py.typed"; \
		assert r.files("zshard.configs").joinpath("tiny.yaml").is_file(), "no tiny.yaml"; \
		print("wheel-check: LICENSE, py.typed and configs/tiny.yaml installed")'; \
	echo "wheel-check: zshard demo"; "$$tmp/venv/bin/zshard" demo; \
	echo "wheel-check: zshard init"; "$$tmp/venv/bin/zshard" init; \
	echo "wheel-check: zshard train tiny (3 steps)"; \
	"$$tmp/venv/bin/zshard" train tiny --set train.steps=3 --set checkpoint.dir="$$tmp/work/ckpt"; \
	"$$tmp/venv/bin/zshard" verify "$$tmp/work/ckpt"; \
	echo "wheel-check: ok"

clean:
	rm -rf $(VENV) build *.egg-info
