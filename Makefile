# make demo: set up and train the small tokenizer on the built-in scenes, then write an HTML report.
# make test: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[dev]" scikit-image
	touch $@

demo: setup
	$(PY) -m vqgan.cli demo --out runs/demo --resume

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The benchmark runs our side in .venv-bench (the CPU build of torch 2.13.0, the same as the reference's
# environment) and the reference in /tmp/ref-venv (see ../shared/reference/README.md to set it up).
bench: setup .venv-bench/.installed
	$(PY) bench/bench_stage1.py

.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 numpy pillow pyyaml safetensors tqdm
	touch $@

clean:
	rm -rf runs .pytest_cache .cache .venv-bench
