# One block of commands for a newcomer: make run, make test, make lint, make bench.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The stamp is rebuilt when the dependencies change, so `make run` after a pull installs.
STAMP  := $(VENV)/.installed

.PHONY: run test faults lint fmt bench check-config clean chromium screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements.txt
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Serve on $$PORT (default 5000); embedded database and mail sink when DB_URI / SMTP_HOST are unset.
run: $(STAMP)
	$(BIN)/python -m notification_service serve

## The whole suite against real SecantusDB and SMTP servers the fixtures start, and the
## pages in Debian's headless Chromium.
test: $(STAMP) chromium
	$(BIN)/python -m pytest

## Debian's chromium for tests/test_browser.py, installed with apt-get when missing (as
## root); where that cannot be done, those tests are skipped (REQUIRE_BROWSER=1: failed).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || \
	    echo "chromium is not installed (apt-get as root could not): browser tests skipped"; }

## The README's pictures, docs/docs.png and docs/inbox.png, taken by the browser tests.
screenshots: $(STAMP) chromium
	SCREENSHOTS_DIR=docs REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests/test_browser.py \
	  -k "docs_renders or two_tabs"

## The database killed with SIGKILL under load, FAULT_ROUNDS times (default 6): minutes.
faults: $(STAMP)
	$(BIN)/python -m pytest -m faults -s tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/run.py

check-config: $(STAMP)
	$(BIN)/python -m notification_service check-config

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
