# make serve: venv + pinned install + database + gunicorn on $(HOST):$(PORT).  make test: lint + every test.
# make fuzz: the fuzz suite alone with FUZZ_EXAMPLES (default 5000) generated bodies per route.
# make test-unit / test-inproc / test-e2e: one tier alone (tests/unit, tests/inproc, tests/e2e).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
export GATEWAY_CONFIG ?= $(CURDIR)/config.toml

.PHONY: serve test test-unit test-inproc test-e2e fuzz lint key bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

serve: $(VENV)/.runtime
	$(BIN)/flask --app app init-db
	HOST=$(HOST) PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py 'app:create_app()'

key: $(VENV)/.runtime
	$(BIN)/flask --app app keys create --name "$${NAME:-me}" --credits "$${CREDITS:-5}"

lint: $(VENV)/.dev
	$(BIN)/ruff check .

# Much test time is waiting (deliberate upstream timeouts, streams, server start-ups), so TEST_WORKERS pytest-xdist
# workers (each with its own fakes and gateway on free ports) overlap it: one more than the cores, at most 8 (on 2
# cores, 2026-12-01: 2 workers 47.6 s wall / 59.7 s CPU, 3 workers 43.1 s / 67.2 s). Bytecode is cached for the
# test run: every worker, gunicorn worker and CLI subprocess would otherwise compile (and assert-rewrite) the same
# files.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n + 1 < 8 ? n + 1 : 8 )))
PYTEST = PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup

test-unit test-inproc test-e2e: test-%: $(VENV)/.dev
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup tests/$*

fuzz: $(VENV)/.dev
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(BIN)/python -m pytest -q tests/e2e/test_fuzz.py

bench: $(VENV)/.dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# LiteLLM and Portkey beside the gateway; installed once into ~/.cache/gateway-bench, never into .venv
bench-peers: $(VENV)/.dev
	$(BIN)/python bench/run.py --peers $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
