# Two commands on a fresh machine (README.md):
#   make demo   set up .venv and train the demo network (GPU if one works, else CPU)
#   make test   set up .venv and run the test suite, then the GPU-marked tests on the CPU
#               stand-in for CuPy (alone: make fake-gpu-test), then the kernels' racecheck
#               on the CPU harness built with ThreadSanitizer (alone: make race-test)
# .venv holds cugrad in editable mode (it follows the checkout; made once, again when
# pyproject.toml changes). `make gpu-venv` adds CuPy (CUDA 12 wheels) and nvtx to it.
# The stand-in (tests/fake_cupy/README.md) runs the GPU-marked tests' host code without a
# GPU, with the kernels on the CPU harness; it is not a GPU run.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test fake-gpu-test race-test gpu-venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cugrad demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory fake-gpu-test
	$(MAKE) --no-print-directory race-test

fake-gpu-test: $(STAMP)
	CUGRAD_FAKE_CUPY=1 $(PY) -m pytest -m "(gpu or fake_cupy) and not slow" $(PYTEST_ARGS)

# Races between the threads of a block (tests/cuda_harness/README.md, "Racecheck"): every
# kernel test of the harness again, its modules built with ThreadSanitizer.
race-test: $(STAMP)
	CUGRAD_HARNESS_SANITIZE=thread $(PY) -m pytest tests/test_cuda_harness_selftest.py \
		tests/test_kernels_cpu.py tests/test_harness_edges.py $(PYTEST_ARGS)

gpu-venv: $(STAMP)
	$(PY) -m pip install --quiet -e ".[gpu,test,examples]"

clean:
	rm -rf $(VENV) build *.egg-info tests/cuda_harness/build
