# Set-up and entry points. Each target creates .venv at the repo root if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not for users): 2.13.0 is the CPU build this machine carries.
TORCH_PIN ?= torch==2.13.0
# The demo replays real page revisions when the shared data is beside the checkout,
# else the built-in sample pages.
REVISIONS ?= ../shared/data/revisions/doc-revisions.jsonl

.PHONY: setup demo test lint typecheck fast-test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev]"
# promtool (Debian's prometheus package) for the alert-rule tests; skipped when not root or no apt.
	command -v promtool >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null && (service prometheus stop >/dev/null 2>&1 || true)) || true
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/embedstream dev $(if $(wildcard $(REVISIONS)),--revisions $(REVISIONS))

# mypy cannot follow setuptools' package-dir mapping (stream/ -> embedstream.stream):
# it reads the folders through links under .typecheck/embedstream/.
typecheck: setup
	mkdir -p .typecheck/embedstream
	for d in stream sinks bulk; do ln -sfn ../../$$d .typecheck/embedstream/$$d; done
	HF_HUB_OFFLINE=1 $(BIN)/mypy

lint: setup
	$(BIN)/ruff check stream sinks bulk tests bench
	$(BIN)/lint-imports

# Every test, each property test with its full example count (tests/conftest.py profiles).
# Two pytest-xdist workers, a test module each at a time (module fixtures stay whole):
# most of the suite waits on brokers and subprocesses, so two workers on two cores
# take ~10 minutes where one took ~16. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint typecheck
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=15 --hypothesis-profile=full -n $(TEST_WORKERS) --dist loadfile

# The quick loop while editing: no broker, no real model, a tenth of the property
# examples (under a minute).
fast-test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow" --durations=15 --hypothesis-profile=quick

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/stream_freshness.py

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .pytest_cache .ruff_cache *.egg-info
