# Two entry points a fresh machine needs: `make quickstart` and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch and torchvision resolve together from the registry (never a +cpu torch file:
	# PyPI's torchvision needs a CUDA build of torch, which runs fine on CPU).
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m bnlightning fit --config configs/quickstart.yaml --model.init_args.norm none
	$(PY) -m bnlightning fit --config configs/quickstart.yaml --model.init_args.norm batch

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs wandb lightning_logs .pytest_cache
