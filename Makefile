# falco-talon: the two commands a newcomer needs are `make run` and `make test`; the other
# targets are for development (bench, schemas, images, the local clusters). Python deps come
# from uv.lock, exactly.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha256sum | cut -c1-12)

.PHONY: help install tools run test lint typecheck unit bench schemas fmt clean testenv-up testenv-down jaeger \
	image image-demo image-nats

help:
	@echo "make run    - install, start the local control plane + demo workloads, serve examples/ on 127.0.0.1:2803"
	@echo "make test   - install, then lint, type-check, layering, schemas, tests"
	@echo "make bench  - throughput/latency/memory numbers as JSON"
	@echo "make schemas - regenerate schemas/ from the code"
	@echo "make cluster-up   - a real single-node cluster (containerd, kubelet, ...) running falco-talon from its chart; prints the env file (KUBECONFIG, TALON_URL)"
	@echo "make cluster-down - stop it and remove its bridge, iptables chains, mounts and state"
	@echo "make image  - OCI archive of falco-talon (no registry; see image/README.md); prints its path last"
	@echo "make image-demo - OCI archive of the demo workload image; prints its path last"
	@echo "make image-nats - OCI archive of nats-server (JetStream) for the chart's bundled NATS; prints its path last"

install: $(STAMP)

$(STAMP): pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	$(UV) sync --frozen --quiet
	@rm -f $(VENV)/.installed-* && touch $@

run: install
	bash examples/run.sh

testenv-up: install
	$(BIN)/python -m tests.env.testenv up

testenv-down: install
	$(BIN)/python -m tests.env.testenv down

.PHONY: cluster-up cluster-down
cluster-up: install
	$(BIN)/python -m tests.env.cluster up

cluster-down: install
	$(BIN)/python -m tests.env.cluster down

jaeger: install
	$(BIN)/python -m tests.env.jaeger --state-dir "$${XDG_RUNTIME_DIR:-/tmp}/falco-talon-jaeger"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/falco-talon schemas --check
	$(BIN)/pytest

test: lint typecheck unit

bench: install
	@command -v wrk >/dev/null 2>&1 || \
		echo "wrk not installed: using bench/loadgen.py (.ci/system-packages.sh bench installs it)"
	$(BIN)/python bench/bench.py

tools:
	bash .ci/system-packages.sh bench image cluster

schemas: install
	$(BIN)/falco-talon schemas
	$(BIN)/python -m tests.chart.sync

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# OCI archives (image/README.md: falco-talon from Debian packages + uv.lock; the demo workload;
# NATS: the static nats-server on an empty base), cached by content; last line = archive path.
image:
	@bash image/build.sh talon

image-demo:
	@bash image/build.sh demo

image-nats:
	@bash image/build.sh nats

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
