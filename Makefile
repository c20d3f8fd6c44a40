# The README's two commands: `make demo` (main job on the embedded data) and `make test` (whole suite).
# Each creates .venv on first use (python3.11, pinned requirements) and reuses it afterwards.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_OUTPUT ?= runs/demo

.PHONY: demo test bench clean-venv

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py --output $(DEMO_OUTPUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# GPU benchmarks (skip cleanly without CUDA); results go to benchmarks/results/.
bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks -q --benchmark-only

clean-venv:
	rm -rf $(VENV)
