# The README's commands. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000

RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP     := $(VENV)/.dev-installed

.PHONY: run test bench screenshots browser worker simulator clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(RUNTIME_STAMP)

## make run: the dashboard, the worker and (without PINECALL_API_KEY) the demo simulator.
run: $(RUNTIME_STAMP)
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py demo_operator --host $(HOST) --port $(PORT)
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

## make test: everything, including the real-browser tests.
test: $(DEV_STAMP) browser
	$(PY) -m pytest

## make screenshots: the README's screenshots in docs/, taken by the browser tests.
screenshots: $(DEV_STAMP) browser
	SCREENSHOTS=1 $(PY) -m pytest tests/e2e -k screenshots

## make bench: the benchmarks; results in bench/results/latest.json and bench/README.md.
bench: $(DEV_STAMP)
	$(PY) -m bench

## Debian's chromium for the browser tests (Playwright cannot download browsers here).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the browser tests..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| { echo "Could not install chromium: install it (apt-get install chromium) and re-run."; exit 1; }; \
	else \
		echo "The browser tests need Debian's chromium: run 'sudo apt-get install chromium', then 'make test'."; \
		exit 1; \
	fi

## Production-style processes (see README): one worker, and the simulator on its own.
worker: $(RUNTIME_STAMP)
	$(PY) manage.py runworker pinecall

simulator: $(RUNTIME_STAMP)
	$(PY) -m pinecall_sdk.simulator --port 8765 --demo

clean:
	rm -rf $(VENV) staticfiles db.sqlite3 .pytest_cache
