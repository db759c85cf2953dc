PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# uv installs the same versions as pip in a few seconds instead of most of a minute; pip
# is the fallback wherever uv cannot be installed or cannot reach the index.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/python -m pip install --quiet uv && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[dev]") || \
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
