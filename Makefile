# Two commands from a fresh clone; each sets up what it needs on first use.
#   make run    the main job: every notebook headless on the embedded default model
#   make test   the whole test suite (make test-fast: the under-a-minute loop, no notebooks, on
#               every core with pytest-xdist)
# The virtual environment (.venv) is built on first use and rebuilt only when
# requirements.txt or pyproject.toml change. Extra arguments: make run ARGS="--smoke --run /tmp/s"
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-fast setup

run: $(STAMP)
	$(VENV)/bin/python -m sae_nb run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" -n auto $(ARGS)

setup: $(STAMP)
	$(VENV)/bin/python -m sae_nb setup

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $(STAMP)
