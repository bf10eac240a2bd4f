# The two commands a newcomer needs; each sets up .venv on first use (pinned torch from constraints.txt) and
# is fast when it is already there.
#   make demo            the whole STAS job end to end on the embedded synthetic set (ARGS="--task classification"
#                        for the fundus classification recipe; ARGS="--data ../shared/data/stas_public" for real data)
#   make test            lint (ruff, hadolint, the container's torch-keeping install step) and the test suite
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint setup

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/stas demo $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	PATH="$(abspath $(BIN)):$$PATH" bash docker/check_install.sh

test: lint
	$(BIN)/pytest -q
