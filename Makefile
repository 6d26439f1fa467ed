# IWSegmentation developer entry points. `make demo` and `make test` set up .venv on first use.
#
# TORCH_SPEC picks the PyTorch build installed into .venv. The default is the CPU build
# (fast, no multi-GB CUDA download). GPU users: see README "GPU install".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: all venv demo test lint bench clean help

help:
	@echo "make demo   - synthetic data -> train a small iw-Dice U-Net -> predict -> evaluate (demo_output/)"
	@echo "make test   - the full test suite (pytest, Testing/)"
	@echo "make lint   - ruff"
	@echo "make bench  - every benchmark (scripts/bench/), tables into docs/benchmarks.md;"
	@echo "              BENCH=\"weights evaluate\" picks some, QUICK=1 runs each one's smallest mode (no report)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,train,slicer,dicom,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_output

test: $(STAMP)
	$(PY) -m pytest Testing -q

lint: $(STAMP)
	$(VENV)/bin/ruff check IWSegmentationLib IWSegmentation Testing scripts

bench: $(STAMP)
	$(PY) -m scripts.bench $(if $(QUICK),--quick) $(BENCH)

clean:
	rm -rf demo_output Testing/_output .pytest_cache
