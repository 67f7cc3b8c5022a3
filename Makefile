# One-command workflows. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
TOOLS := .tools
NODE_STAMP := $(TOOLS)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint install install-test tools system-deps clean bench

$(STAMP): requirements/runtime.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/runtime.txt
	$(BIN)/pip install -q --no-deps -e .
	# OPA itself (Go, c-shared) for the policy kit; its metadata asks for Python 3.14 but the
	# wheel is pure ctypes and runs on 3.11 (docs/dependencies.md, "OPA as the reference engine").
	$(BIN)/pip install -q --ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4
	# xds-protos ships an old opentelemetry/proto and google/rpc that shadow the owners' files;
	# reinstalling the owners last restores them (see docs/dependencies.md).
	$(BIN)/pip install -q --force-reinstall --no-deps \
	  opentelemetry-proto==$$(sed -n 's/^opentelemetry-sdk==//p' requirements/runtime.txt) \
	  googleapis-common-protos==1.76.0
	touch $@

install: $(STAMP)

$(TEST_STAMP): $(STAMP) requirements/test.txt
	$(BIN)/pip install -q -r requirements/test.txt
	$(BIN)/pip install -q --force-reinstall --no-deps googleapis-common-protos==1.76.0
	touch $@

install-test: $(TEST_STAMP)

# Node 22 (from the npm registry) and the official MCP conformance suite, local to the checkout.
$(NODE_STAMP): tests/conformance/package.json
	mkdir -p $(TOOLS)
	cp tests/conformance/package.json $(TOOLS)/package.json
	cd $(TOOLS) && npm install --no-audit --no-fund --loglevel=error
	touch $@

tools: $(NODE_STAMP)

# Debian packages the tests start for real: Redis (shared rate limits), PostgreSQL (database
# server backend), Chromium and its WebDriver (the console's browser tests), wrk (benchmarks
# only, see bench target).
system-deps:
	@need=""; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$$need postgresql"; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	command -v chromedriver >/dev/null || need="$$need chromium-driver"; \
	if [ -n "$$need" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$need"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need; \
	fi

run: $(STAMP)
	$(BIN)/mcp-gateway up

# The tests through the real Envoy run once more with ext_authz over gRPC (the default is
# Envoy's HTTP mode), so both transports stay proven.
test: $(TEST_STAMP) tools system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	MCP_GATEWAY_TEST_AUTHZ_TRANSPORT=grpc $(BIN)/python -m pytest -q tests/e2e tests/security tests/reliability

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks side by side with ContextForge, and tools/call on /mcp against /mcp/<server>
# (bench/, docs/benchmarks.md); QUICK=1 for a short run.
# make bench [QUICK=1] [SOAK=1]: side-by-side benchmarks (docs/benchmarks.md); SOAK=1 adds the
# 10-minute soak of the full gateway (docs/soak.md), 1 minute with QUICK=1.
bench: $(STAMP)
	@command -v wrk >/dev/null || { \
	  echo "wrk (the load generator) is missing; installing it: apt-get install wrk" >&2; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk; }
	$(BIN)/pip install -q -r requirements/bench.txt
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)
	$(if $(SOAK),$(BIN)/python -m bench.soak $(if $(QUICK),--minutes 1))
