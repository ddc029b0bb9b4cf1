# One command each: `make up` (Docker), `make run` (no Docker), `make test`.
SHELL := /bin/sh
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: test lint soak run init-db clean

# A virtualenv from the pinned requirements, rebuilt when they change.
$(STAMP): requirements.txt requirements-dev.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# The reliability battery's long tier (100+ SIGKILLs, 20,000 examples per property, 1,000
# schemathesis examples per operation, ...); prints its figures at the end.
soak: $(STAMP)
	RELIABILITY_TIER=soak $(BIN)/pytest -q -m reliability

# The service on SQLite at ./data/app.db, without Docker.
run: $(STAMP)
	@./scripts/ensure-env
	DATABASE_URL=$${DATABASE_URL:-sqlite:///./data/app.db} ./scripts/with-env $(BIN)/python -m app serve --host $(HOST) --port $(PORT)

init-db: $(STAMP)
	DATABASE_URL=$${DATABASE_URL:-sqlite:///./data/app.db} ./scripts/with-env $(BIN)/python -m app init-db

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
