# One command each: `make up` (Docker), `make run` (no Docker), `make test`; docs/operations.md
# describes every target.
SHELL := /bin/sh
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
# One port for every target, 8000 unless given: `make run` listens on PORT, `make up`
# publishes on API_PORT (the name docker-compose.yml reads), which follows PORT, and
# `make demo` calls either (scripts/demo). Without PORT or API_PORT nothing is exported,
# so an API_PORT in .env still reaches compose.
ifdef PORT
API_PORT ?= $(PORT)
endif
ifdef API_PORT
export API_PORT
endif
# `make demo` needs only the standard library: the virtualenv's python if there is one,
# else the host's python3.
DEMO_PYTHON ?= $(shell [ -x $(BIN)/python ] && echo $(BIN)/python || echo $(PYTHON))

# checkov, which tests/test_deploy.py runs, in a virtualenv of its own: its pins clash
# with requirements-dev.txt. Inside .venv, so it goes wherever .venv goes.
CHECKOV_VENV := $(VENV)/checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(shell cksum < deploy/requirements-checkov.txt | cut -d' ' -f1)
# The PostgreSQL stack (docker-compose.postgres.yml, docs/scale-out.md).
COMPOSE_PG := docker compose -f docker-compose.yml -f docker-compose.postgres.yml
REPLICAS ?= 3
OPERATOR_PORT ?= 8001

.PHONY: up down logs demo docker-smoke test test-fast lint soak run init-db bench bench-quick \
	bench-costs bench-feed bench-console screenshots wrk clean up-postgres down-postgres drills \
	lb-stats checkov backup restore bench-lifecycle bench-compare

# The Compose stack: a secret (exported, else .env, else a fresh one in .env), a check
# that a port published beyond loopback does not serve open reads (scripts/check-exposure),
# the image built, the service started and waited for (bounded), then where to find it.
up:
	@./scripts/ensure-env
	@./scripts/with-env ./scripts/check-exposure
	@# An exported but empty WEBHOOK_SECRET would override .env in compose: drop it.
	@if [ -z "$${WEBHOOK_SECRET:-}" ]; then unset WEBHOOK_SECRET; fi; \
	  echo "docker compose up -d --build"; docker compose up -d --build
	@./scripts/with-env ./scripts/wait-ready

# Stops the stack and deletes its volume (the stored messages).
down:
	docker compose down -v

# The service's JSON lines, without compose's "api-1 |" prefix, so they pipe into jq.
logs:
	@docker compose logs -f --no-log-prefix api

# Sample traffic against the running service (make up or make run), signed with the
# exported WEBHOOK_SECRET or the one in .env; scripts/demo says which port it calls.
demo:
	@DEMO_PYTHON=$(DEMO_PYTHON) ./scripts/with-env ./scripts/demo

# The Docker path end to end on a clean clone of HEAD, as CI runs it (scripts/docker-smoke).
docker-smoke:
	./scripts/docker-smoke

# A virtualenv from the pinned requirements, rebuilt when they change. Quiet, and on
# stderr: the first `make run | jq` builds it, and jq must see only the service's lines.
$(STAMP): requirements.txt requirements-dev.txt
	@echo "building $(VENV) from the pinned requirements (first use only)" >&2
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt >&2
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint $(CHECKOV_STAMP)
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/pytest -q

$(CHECKOV_STAMP): deploy/requirements-checkov.txt $(STAMP)
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/requirements-checkov.txt
	touch $@

checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov -d deploy/kubernetes --framework kubernetes --skip-download --compact

# The everyday loop: lint, and the tests that neither start server processes (slow) nor
# belong to the reliability battery. `make test` runs everything, as CI does.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 -m "not slow and not reliability"

# The reliability battery's long tier (100+ SIGKILLs, 20,000 examples per property, 1,000
# schemathesis examples per operation, ...); prints its figures at the end.
soak: $(STAMP)
	RELIABILITY_TIER=soak $(BIN)/pytest -q -m reliability

# The service on SQLite at ./data/app.db, without Docker. Silent itself: stdout carries
# only the service's JSON lines, so `make run | jq` works.
run: $(STAMP)
	@./scripts/ensure-env
	@DATABASE_URL=$${DATABASE_URL:-sqlite:///./data/app.db} ./scripts/with-env \
	  $(BIN)/python -m app serve --host $(HOST) --port $(or $(PORT),8000)

# PostgreSQL, HAProxy and REPLICAS api replicas: the public paths on API_PORT, every path
# for operators on 127.0.0.1:OPERATOR_PORT. Secrets as for `make up`; POSTGRES_PASSWORD
# likewise (exported, else .env, else a fresh one written to .env).
up-postgres:
	@./scripts/ensure-env
	@./scripts/ensure-env POSTGRES_PASSWORD
	@# Exported but empty values would override .env in compose: drop them.
	@if [ -z "$${WEBHOOK_SECRET:-}" ]; then unset WEBHOOK_SECRET; fi; \
	  if [ -z "$${POSTGRES_PASSWORD:-}" ]; then unset POSTGRES_PASSWORD; fi; \
	  echo "$(COMPOSE_PG) up -d --build --scale api=$(REPLICAS)"; \
	  OPERATOR_PORT=$(OPERATOR_PORT) $(COMPOSE_PG) up -d --build --scale api=$(REPLICAS)
	@READS_PORT=$(OPERATOR_PORT) ./scripts/with-env ./scripts/wait-ready

# Stops the PostgreSQL stack and deletes its volume (the database).
down-postgres:
	./scripts/with-env sh -c 'POSTGRES_PASSWORD=$${POSTGRES_PASSWORD:-unused} exec $(COMPOSE_PG) down -v'

# The failure drills of docs/scale-out.md against the running `make up-postgres` stack
# (it kills, restarts and stops containers of it); about a minute.
drills:
	OPERATOR_PORT=$(OPERATOR_PORT) ./scripts/with-env $(PYTHON) scripts/scale_drills.py \
	  --public http://127.0.0.1:$(or $(API_PORT),8000) --operator http://127.0.0.1:$(OPERATOR_PORT)

# HAProxy's view of the replicas (its stats page is on the lb container's loopback only).
lb-stats:
	@./scripts/with-env ./scripts/lb-stats

# Benchmarks (docs/performance.md, which also says how long each takes): this service
# beside a naive reference and two raw-ASGI floors, then the service at a million rows,
# then SQLite beside PostgreSQL with one and two API processes, then the feed (1,000
# stream subscribers under a steady ingest; a poller catching up a million messages),
# then the console at a million messages, then the data lifecycle, then the cost bounds
# under attack: about 2 hours in all.
BENCH_ARGS ?= --passes 3 --million --scale-out
FEED_ARGS ?= --passes 3
bench: $(STAMP) wrk
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.feed $(FEED_ARGS)
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.lifecycle $(LIFECYCLE_BENCH_ARGS)
	$(BIN)/python -m bench.costs $(BENCH_COSTS_ARGS)

# The feed section alone (docs/feed.md).
bench-feed: $(STAMP)
	$(BIN)/python -m bench.feed $(FEED_ARGS)

# The console at a million messages: /conversations, /stats/timeline, and the first render
# of / in headless Chromium (docs/console.md).
bench-console: $(STAMP) wrk
	$(BIN)/python -m bench.console

# The data lifecycle alone (docs/lifecycle.md): export and import of a million messages,
# a retention purge of half a million under load, the tombstone check's cost.
LIFECYCLE_BENCH_ARGS ?= --passes 3
bench-lifecycle: $(STAMP) wrk
	$(BIN)/python -m bench.lifecycle $(LIFECYCLE_BENCH_ARGS)

# The cost bounds under attack (docs/limits.md): worst-case searches beside steady ingest
# at a million rows on both backends, 1,000 slow bodies, a 3 MB WhatsApp batch.
BENCH_COSTS_ARGS ?= --passes 3
bench-costs: $(STAMP) wrk
	$(BIN)/python -m bench.costs $(BENCH_COSTS_ARGS)

# Several commits' ingest side by side: make bench-compare REFS="a077d41 HEAD".
REFS ?= HEAD
bench-compare: $(STAMP) wrk
	$(BIN)/python -m bench.compare $(REFS)

bench-quick: $(STAMP) wrk
	$(BIN)/python -m bench.run --passes 1 --duration 3 --query-duration 2 --rows 20000

# wrk, the load generator, from Debian's packages when it is missing.
wrk:
	@command -v wrk >/dev/null || { \
	  echo "installing wrk (Debian package)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; \
	  else sudo apt-get install -y -qq wrk; fi; }

# The console's screenshots in docs/images/, taken by its browser tests.
screenshots: $(STAMP)
	SCREENSHOTS_DIR=docs/images $(BIN)/pytest -q tests/test_console_browser.py -k screenshots

# A consistent copy of the Compose stack's SQLite database, taken while it keeps
# ingesting, in ./backups/ (docs/lifecycle.md). The container's root filesystem is
# read-only, so the copy is made in the volume, copied out, then removed from it.
BACKUP_DIR ?= backups
backup:
	@mkdir -p $(BACKUP_DIR)
	@name=app-$$(date -u +%Y%m%dT%H%M%SZ).db; \
	  docker compose exec -T api python -m app backup /data/backups/$$name && \
	  docker compose cp api:/data/backups/$$name $(BACKUP_DIR)/$$name && \
	  docker compose exec -T api rm -f /data/backups/$$name && \
	  echo "backup: $(BACKUP_DIR)/$$name"

# Puts a backup in place of the stack's database: the service is stopped for it, the
# database it replaces stays in the volume (app.db.before-restore-<time>), and the
# service is started again. `make restore BACKUP=backups/app-<time>.db`
restore:
	@test -n "$(BACKUP)" || { echo "usage: make restore BACKUP=backups/app-<time>.db" >&2; exit 2; }
	docker compose stop api
	docker compose cp $(BACKUP) api:/data/restore.db
	docker compose run --rm --no-deps -T api restore /data/restore.db
	docker compose run --rm --no-deps -T --entrypoint rm api -f /data/restore.db
	docker compose start api
	@./scripts/with-env ./scripts/wait-ready

init-db: $(STAMP)
	DATABASE_URL=$${DATABASE_URL:-sqlite:///./data/app.db} ./scripts/with-env $(BIN)/python -m app init-db

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
