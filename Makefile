# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; GPU clusters install their own build
# (the package itself accepts torch>=2.4). Override with `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.PHONY: install test demo clean

DEMO_DIR := outputs/demo
DEMO_ARGS ?=

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,align]" "$(TORCH_SPEC)"  # the pin keeps a dependency from swapping torch
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# From nothing: .venv, a synthetic identity set, 2-rank CPU training with NPCFace, evaluation of the
# final checkpoint with the eval tool, and a summary table.
demo: install
	rm -rf $(DEMO_DIR)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 launch/train.py experiment=demo $(DEMO_ARGS)
	$(PY) -m partial_fc.tools.eval $(DEMO_DIR)/checkpoints/$$(cat $(DEMO_DIR)/checkpoints/latest) \
	    $$($(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/summary.json'))['dataset'])")/heldout.bin \
	    -o $(DEMO_DIR)/eval
	$(PY) -m partial_fc.tools.summary $(DEMO_DIR)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
