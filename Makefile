# `make demo` and `make test` set everything up on a fresh machine (a .venv in the repo), then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.apm-fast-installed
PYTEST_ARGS ?=

.PHONY: demo test bench plots gpu-check clean

# reinstalled (the CUDA extension rebuilt) when the build's inputs change: its settings and the
# sources of csrc/
BUILD_INPUTS := requirements.txt constraints.txt setup.py pyproject.toml $(wildcard csrc/*.py csrc/*/*)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps -c constraints.txt nvidia-cutlass  # CUTLASS headers only
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apm-fast demo

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS) tests

# the benchmark suite (quick sizes on the CPU, full on a GPU); BENCH_ARGS="--preset ttt-l14 ..."
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m apm_fast.bench $(BENCH_ARGS)

# PNG plots from the result files of `make bench` (bench-results/, not the committed
# benchmarks/results/, whose PNGs would be overwritten)
plots: $(STAMP)
	$(PY) -m apm_fast.bench.plots bench-results

clean:
	rm -rf $(VENV) build *.egg-info
