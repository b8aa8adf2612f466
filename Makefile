# make demo: set up and train the small tokenizer on the built-in scenes, then write an HTML report.
# make test: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-cache-dir: torch's CUDA libraries are ~3 GB of wheels; a cached copy of each doubles the disk the setup needs
# (CI ran out of disk once while installing them).
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir -c constraints.txt

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

# vector-quantize-pytorch, the peer library bench/peer_quantizers.py compares against: never a dependency of
# the package, so it lives in its own environment, which sees .venv's packages through a .pth file.
.venv-peer/.installed: setup
	$(PYTHON) -m venv .venv-peer
	$(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])" > .venv-peer/lib/$$(ls .venv-peer/lib)/site-packages/main-venv.pth
	echo "$(CURDIR)/src" >> .venv-peer/lib/$$(ls .venv-peer/lib)/site-packages/main-venv.pth
	.venv-peer/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt vector-quantize-pytorch
	touch $@

clean:
	rm -rf runs .pytest_cache .cache .venv-bench .venv-peer
