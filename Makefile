# Two entry points a fresh machine needs: `make quickstart` and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test typecheck clean

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

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of links in build/
# that lays callbacks/ out as bnlightning/callbacks, the way it is installed.
TYPECHECK_TREE := build/typecheck
typecheck: $(STAMP)
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/bnlightning
	for entry in bnlightning/*; do ln -s "$(CURDIR)/$$entry" $(TYPECHECK_TREE)/bnlightning/; done
	ln -s "$(CURDIR)/callbacks" $(TYPECHECK_TREE)/bnlightning/callbacks
	ln -s "$(CURDIR)/configs" $(TYPECHECK_TREE)/bnlightning/configs
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(PY) -m mypy --config-file $(CURDIR)/pyproject.toml -p bnlightning
	# bench/ is a folder of scripts (not a package): checked as files, importing the installed bnlightning
	$(PY) -m mypy --config-file pyproject.toml --cache-dir $(TYPECHECK_TREE)/.mypy_cache_bench bench/

test: $(STAMP) typecheck
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs wandb lightning_logs .pytest_cache build
