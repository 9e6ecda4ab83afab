# One block of commands for a newcomer: make run, make test, make lint, make bench.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two stamps, each rebuilt when the dependencies change (so a target after a pull
# installs): serving needs the package and the embedded database only; the development
# tools come with the first target that needs them. The dev install holds the serving
# one, so it renews both stamps: `make run` after `make test` installs nothing.
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP   := $(VENV)/.installed-dev
DEPS        := $(BIN)/python pyproject.toml requirements.txt

# The lock of the runtime dependencies the Dockerfile installs. The Python version is
# the Dockerfile's base (tests/test_packaging.py checks both); the tool is pinned so a
# relock changes pins, not the file's format. `make lock` keeps every pin that still
# fits pyproject.toml; `make lock LOCK_FLAGS=--upgrade` moves them all to the newest.
LOCK        := requirements.lock
LOCK_PYTHON := 3.11
LOCK_TOOL   := uv==0.13.9
LOCK_FLAGS  ?=
# make run's unsubscribe secret (var/ is ignored by git).
RUN_SECRET  := var/unsubscribe-secret

.PHONY: run test faults lint fmt bench check-config lock clean chromium screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): $(DEPS)
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $(SERVE_STAMP)

$(DEV_STAMP): $(DEPS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(SERVE_STAMP) $(DEV_STAMP)

# make run's (and make check-config's) defaults, unless the environment or ./.env sets
# them: UNSUBSCRIBE_SECRET (made once and kept in var/, so that unsubscribe links
# already mailed keep working after a restart) and PUBLIC_URL (this machine's loopback,
# on PORT). One shell line: each variable is exported to the command that follows.
RUN_DEFAULTS = \
	if [ -z "$$UNSUBSCRIBE_SECRET" ] && ! grep -qs '^UNSUBSCRIBE_SECRET=.' .env; then \
	  if [ ! -s $(RUN_SECRET) ]; then \
	    mkdir -p $(dir $(RUN_SECRET)); \
	    (umask 077; $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $(RUN_SECRET)); \
	  fi; \
	  UNSUBSCRIBE_SECRET=$$(cat $(RUN_SECRET)); export UNSUBSCRIBE_SECRET; \
	fi; \
	if [ -z "$$PUBLIC_URL" ] && ! grep -qs '^PUBLIC_URL=.' .env; then \
	  port=$${PORT:-$$(sed -n 's/^PORT=//p' .env 2>/dev/null | tail -n 1)}; \
	  PUBLIC_URL=http://127.0.0.1:$${port:-5000}; export PUBLIC_URL; \
	fi

## Serve on $$PORT (default 5000); embedded database and mail sink when DB_URI / SMTP_HOST are unset.
run: $(SERVE_STAMP)
	@set -e; $(RUN_DEFAULTS); exec $(BIN)/python -m notification_service serve

## The whole suite against real SecantusDB and SMTP servers the fixtures start, and the
## pages in Debian's headless Chromium. In TEST_WORKERS processes (pytest-xdist), each
## with servers of its own; TEST_WORKERS=0: in this one. xdist's default distribution
## only: schemathesis's items share one node id, which --dist loadfile runs once.
TEST_WORKERS ?= 2
test: $(DEV_STAMP) chromium
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

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
screenshots: $(DEV_STAMP) chromium
	SCREENSHOTS_DIR=docs REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests/test_browser.py \
	  -k "docs_renders or two_tabs"

## The slow runs `make test` leaves out (pytest marker `faults`), minutes: the database
## killed with SIGKILL under load, FAULT_ROUNDS times (default 4), and the other fault
## scenarios; the contract run with its full count of generated requests; the inbox
## model's long run.
faults: $(DEV_STAMP)
	$(BIN)/python -m pytest -m faults -s tests/test_faults.py tests/test_contract.py \
	  tests/test_inbox_model.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Every performance figure side by side, about 10 minutes: bench/RESULTS.md and the
## charts bench/*.png. QUICK=1: two to three minutes, written to bench/quick/ (not recorded).
QUICK ?=
bench: $(DEV_STAMP)
	QUICK=$(QUICK) $(BIN)/python bench/run.py

check-config: $(SERVE_STAMP)
	@set -e; $(RUN_DEFAULTS); exec $(BIN)/python -m notification_service check-config

## Regenerate $(LOCK) from requirements.txt, with hashes, in a throwaway venv.
lock:
	tools=$$(mktemp -d) && trap 'rm -rf "$$tools"' EXIT && \
	$(PYTHON) -m venv "$$tools" && \
	"$$tools/bin/python" -m pip install --quiet $(LOCK_TOOL) && \
	"$$tools/bin/uv" pip compile requirements.txt --quiet --generate-hashes \
		--python-version $(LOCK_PYTHON) --python-platform linux \
		--custom-compile-command 'make lock' $(LOCK_FLAGS) -o $(LOCK)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
