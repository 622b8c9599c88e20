# The README's two commands. Both create .venv, install torch==2.13.0 first (a bare `torch` requirement
# would pull gigabytes of CUDA packages), then the package with what the target needs.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
TORCH := torch==2.13.0
# Every integration is tested with the real library, so the test set-up installs every extra but `bench`.
TEST_EXTRAS := dev,optim,plot,tensorboard,mlflow,wandb,recipes,hf,torchmetrics,sweep

.PHONY: demo test venv lint mutants

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)

venv: $(VENV)/bin/python

demo: venv
	$(PIP) install --quiet "$(TORCH)" -e ".[recipes]"
	$(VENV)/bin/steadyfit fit

test: venv
	$(PIP) install --quiet "$(TORCH)" -e ".[$(TEST_EXTRAS)]"
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup

lint: venv
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

# One deliberate one-line break per guarantee; each must make its tests fail (see docs/guarantees.md).
mutants: venv
	$(PIP) install --quiet "$(TORCH)" -e ".[$(TEST_EXTRAS)]"
	$(VENV)/bin/python tests/mutants.py
