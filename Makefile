# Two entry points for a fresh machine: `make run` (set up, fetch the default model, compress, evaluate,
# generate, then serve it with the OpenAI API until Ctrl-C) and `make test` (set up, run the whole test
# suite). Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
BITS ?= 5
WORK ?= work
SRC := $(WORK)/models/$(MODEL)
PACK := $(WORK)/packs/$(MODEL)-gsq$(BITS)
TEXT ?= ../shared/data/wikitext-2-raw-test.txt
export UC_CACHE ?= $(CURDIR)/.uc-cache

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

# torch is pinned to the local CPU build; everything else comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/uc fetch-model $(MODEL) $(SRC)
	@if [ -f $(PACK)/manifest.json ]; then echo "$(PACK) already packed"; \
	 else $(BIN)/uc pack $(SRC) $(PACK) --bits $(BITS) --resume; fi
	$(BIN)/uc verify $(PACK)
	$(BIN)/uc info $(PACK)
	$(BIN)/uc eval $(PACK) --base $(SRC) --text $(TEXT) --articles 17-62 --max-windows 4
	$(BIN)/uc generate $(PACK) "The capital of France is" --max-tokens 24
	$(BIN)/uc serve $(PACK)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(WORK)
