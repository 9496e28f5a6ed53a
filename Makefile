# One venv at .venv, made and filled by these targets: `make test` and `make demo` do all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
# torch is pinned in the extras (torch==2.13.0: the local CPU wheel), never a looser spec.

.PHONY: install install-dev demo test docs clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(VENV)/bin/onnxgen demo

test: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q

docs: $(VENV)/.runtime
	$(VENV)/bin/onnxgen docs

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
