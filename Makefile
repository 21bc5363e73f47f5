# Two commands for a fresh machine: `make demo` (the whole job on a synthetic cohort) and `make test`.
# The CPU build of torch is installed first: a bare `pip install torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_DIR ?= demo
DEMO_SUBJECTS ?= 300
# Extra BIDS-App options for the demo, e.g. DEMO_ARGS="--backbone saint" or "--device cuda".
DEMO_ARGS ?=

.PHONY: demo test lint install install-test clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first (CPU build), then the package; stamps keep re-runs fast.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[validate]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/normdiff-synth $(DEMO_DIR)/bids --n-subjects $(DEMO_SUBJECTS) --seed 0 --patients 0.1 --overwrite
	$(BIN)/normdiff-bids $(DEMO_DIR)/bids $(DEMO_DIR)/bids/derivatives/normdiff group participant \
		--reference-query "diagnosis == 'HC'" --idp-set aseg aparc-thickness \
		--work-dir $(DEMO_DIR)/work --seed 0 $(DEMO_ARGS)
	@echo ""
	@echo "Demo finished. Open the reports in a browser:"
	@ls -1 $(DEMO_DIR)/bids/derivatives/normdiff/*.html 2>/dev/null | head -n 4 || true

test: $(VENV)/.installed-test
	$(BIN)/ruff check normdiff_bids tests benchmarks workflows
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO_DIR)
