# graft-vfs: every target sets itself up (a virtual environment with the project installed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-quick soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m graft_vfs.demo

# The scale-out tests (3 servers, 6 clients): a 5-minute workload each instead of 8-10 s.
soak: $(STAMP)
	GRAFT_SOAK_SECONDS=300 $(PY) -m pytest -q tests/test_scale_out.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
