# Two commands on a fresh machine (README.md):
#   make demo   set up .venv and train the demo network (GPU if one works, else CPU)
#   make test   set up .venv and run the test suite
# `make gpu-venv` adds CuPy (CUDA 12 wheels) and nvtx to the same environment.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test gpu-venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cugrad demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

gpu-venv: $(STAMP)
	$(PY) -m pip install --quiet ".[gpu,test,examples]"

clean:
	rm -rf $(VENV) build *.egg-info tests/cuda_harness/build
