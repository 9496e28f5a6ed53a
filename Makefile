# One venv at .venv, made and filled by these targets: `make test` and `make demo` do all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
# torch is pinned in the extras (torch==2.13.0: the local CPU wheel), never a looser spec.

# The C++ kernel library is built by the package build (setup.py); its sources trigger rebuilds.
KERNEL_SOURCES := setup.py tools/ort_headers.py $(wildcard src/onnxgen/kernels/csrc/*)

.PHONY: install install-dev run demo test docs asan-test bench clean

$(VENV)/.runtime: pyproject.toml $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# Tests need the kernels: a build that cannot fetch the headers fails here instead of skipping.
$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	ONNXGEN_REQUIRE_KERNELS=1 $(PIP) -e ".[test]"
	touch $@

# The playground's browser test drives Debian's chromium with Playwright (never `playwright install`:
# its own browser builds cannot be downloaded here). apt-get update only when the install needs it.
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get
$(VENV)/.browser: pyproject.toml $(VENV)/.dev
	test -x /usr/bin/chromium || $(APT) install -y --no-install-recommends chromium \
	  || { $(APT) update && $(APT) install -y --no-install-recommends chromium; }
	$(PIP) "playwright>=1.40"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev $(VENV)/.browser

# The main job: the serving engine generates text with the embedded default model (a random-weight
# Mixtral-style MoE with Mistral's tokenizer, built once into ~/.cache/onnxgen) and streams the text.
PROMPT ?= Once upon a time
run: $(VENV)/.runtime
	$(VENV)/bin/onnxgen generate "$(PROMPT)" --max-new-tokens 48 --temperature 0.8 --seed 1

demo: $(VENV)/.runtime
	$(VENV)/bin/onnxgen demo

test: $(VENV)/.dev $(VENV)/.browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q

# The kernel tests once more against a build of the library with AddressSanitizer.
ASAN_LIB := $(CURDIR)/build/asan/onnxgen/kernels/libonnxgen_kernels.so
asan-test: $(VENV)/.dev
	ONNXGEN_SANITIZE=address $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp --force
	ONNXGEN_KERNELS_LIBRARY=$(ASAN_LIB) LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:xdist tests/test_kernels_*.py

# Ours against the peers (one process each, medians and ratios); wants a quiet machine.
bench: $(VENV)/.dev
	$(PIP) -e ".[bench]"
	$(PY) benchmarks/bench_paged_attention.py
	$(PY) benchmarks/bench_moe.py

docs: $(VENV)/.runtime
	$(VENV)/bin/onnxgen docs

clean:
	rm -rf $(VENV) build src/*.egg-info src/onnxgen/kernels/*.so .pytest_cache .hypothesis
