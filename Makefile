# Two entry points: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# hypothesis keeps its cache beside pytest's, which git ignores
export HYPOTHESIS_STORAGE_DIRECTORY ?= .pytest_cache/hypothesis

.PHONY: install demo long results results-long report lint test test-all fmnist bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build that pip finds locally; the package then adds nothing heavy.
	$(PIP) install -q torch==2.13.0
	# the core needs only torch, numpy and pyyaml; dev adds every extra the tests use, pytest, hypothesis and ruff
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package when apt is usable.
fmnist:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || echo "apt could not install dataset-fashion-mnist"; \
	fi

# the demo replaces its own earlier run in runs/demo
demo: install fmnist
	$(VENV)/bin/eqprop train fmnist_demo out_dir=runs/demo --overwrite

# the longer CPU config (fmnist_cpu, the demo's wider network, for 5 epochs; about 45 minutes on
# 2 cores), in runs/long
long: install fmnist
	$(VENV)/bin/eqprop train fmnist_cpu_long out_dir=runs/long --overwrite

# docs/results.md is written by `eqprop report` from the runs' files kept in
# benchmarks/results/{demo_run,long_run,demo_long_run}; `make results` re-runs the demo, `make
# results-long` the long config, and each rewrites the page (demo_long_run: fmnist_demo_long,
# `eqprop train fmnist_demo_long out_dir=runs/long --overwrite`, copied there by hand)
RUN_FILES := config.yaml metrics.jsonl run_info.json curves.png
REPORT_RUNS := benchmarks/results/demo_run benchmarks/results/long_run benchmarks/results/demo_long_run
report:
	$(VENV)/bin/eqprop report $(REPORT_RUNS) --out docs/results.md

results: demo
	mkdir -p benchmarks/results/demo_run
	cd runs/demo && cp $(RUN_FILES) ../../benchmarks/results/demo_run/
	$(MAKE) report

results-long: long
	mkdir -p benchmarks/results/long_run
	cd runs/long && cp $(RUN_FILES) ../../benchmarks/results/long_run/
	$(MAKE) report

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install fmnist
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -m "not slow" -x

test-all: install fmnist
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
