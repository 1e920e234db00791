# fluster-worker: `make test` runs the whole suite on a fresh machine (it installs
# the Python deps, docker.io + dockerd and the local base image as needed);
# `make run` runs the worker in the foreground on the default address.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)
export FLUSTER_WORKER_BASE_IMAGE ?= fluster-base:bookworm
PYTEST_ARGS ?=

.PHONY: install docker base-image test unit lint typecheck run proto bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

docker:
	scripts/ensure-docker.sh

base-image: docker
	scripts/ensure-base-image.sh

lint: install
	$(BIN)/ruff check fluster_worker tests bench twisted
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

test: install base-image lint typecheck
	scripts/ensure-chromium.sh
	$(BIN)/pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/pytest -m "not docker" $(PYTEST_ARGS)

run: install base-image
	mkdir -p var/cache var/state
	$(BIN)/twistd -n --pidfile= fluster-worker --cache-dir var/cache --state-dir var/state \
	    --ca-bundle /etc/ssl/certs/ca-certificates.crt

# Regenerate the protobuf modules and the test client stubs from the .proto files.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
	    fluster_worker/web/rpc/cluster.proto fluster_worker/web/rpc/errors.proto
	$(BIN)/python -m grpc_tools.protoc -I . --plugin=protoc-gen-connect-python=$(BIN)/protoc-gen-connect-python \
	    --connect-python_out=tests/stubs fluster_worker/web/rpc/cluster.proto
	mv tests/stubs/fluster_worker/web/rpc/cluster_connect.py tests/stubs/cluster_connect.py
	rm -rf tests/stubs/fluster_worker

bench: install base-image
	$(BIN)/pip install -q -e '.[bench]'
	scripts/ensure-wrk.sh
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/logs.py
	$(BIN)/python bench/kill.py
	$(BIN)/python bench/restart.py
	$(BIN)/python bench/access.py
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/fetchlogs.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
