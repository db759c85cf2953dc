PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# uv installs the same versions as pip in a few seconds instead of most of a minute; pip
# is the fallback wherever uv cannot be installed or cannot reach the index. Bytecode is
# compiled at install (pip does by default, uv when asked): where PYTHONDONTWRITEBYTECODE
# is set, every process would otherwise compile jax, flax and the rest from source, about
# 10 s of CPU per `metaopt` command or test process.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/python -m pip install --quiet uv && \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[dev]") || \
	  ($(BIN)/python -m pip install --quiet --upgrade pip && \
	   $(BIN)/python -m pip install --quiet -e ".[dev]")
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/metaopt run lr-schedule --config mlp_heldout

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) results
