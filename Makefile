# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup run test bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps "jax-cuda12-plugin==0.10.2" "jax-cuda12-pjrt==0.10.2"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m moejax.main --config=experiments/default.py --workdir=runs/default

test: setup
	$(PY) -m pytest -n auto --durations=20 $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/gmm.py
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/parallel.py > benchmarks/results/parallel.txt
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
