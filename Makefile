# The README's two commands: `make run` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-deps lint typecheck unit unit-workers bench clean

# The ports `make run` takes (all on 127.0.0.1): make run PORT=18080 ADMIN_PORT=19090 SIM_PORT=18081
PORT ?= 8080
ADMIN_PORT ?= 9090
SIM_PORT ?= 8081

run: $(VENV)/.installed
	$(BIN)/echowin-gateway quickstart --config config/gateway.example.yaml \
	    --port $(PORT) --admin-port $(ADMIN_PORT) --sim-port $(SIM_PORT)

test: $(VENV)/.installed test-deps lint typecheck unit unit-workers

# Redis, PostgreSQL, Prometheus, Chromium: installed when missing, Redis and PostgreSQL
# started when down.
test-deps:
	bash scripts/test-deps.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/hadolint Dockerfile
	$(BIN)/yamllint deploy config .yamllint
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed
	$(BIN)/mypy --strict proxy

unit: $(VENV)/.installed
	$(BIN)/pytest -q -p no:cacheprovider

# The end-to-end budget tests once more, every gateway a `serve --workers 2` on sqlite state
# (tests/procs.py: EGW_TEST_WORKERS; EGW_TEST_STATE=redis for Redis); the classes of service
# once more with three processes sharing Redis, as three replicas would.
unit-workers: $(VENV)/.installed
	EGW_TEST_WORKERS=2 $(BIN)/pytest -q -p no:cacheprovider tests/test_budget_e2e.py \
	    tests/test_restart.py tests/test_classes_e2e.py
	EGW_TEST_WORKERS=3 EGW_TEST_STATE=redis $(BIN)/pytest -q -p no:cacheprovider \
	    tests/test_classes_e2e.py

# The performance harness (docs/performance.md): a few minutes; writes bench.json, bench.md.
# Then the admitted path on SQLite, one Redis and a Redis Cluster (three masters), with
# replicas, in one run (about 1.5 minutes): bench-replicas.json, bench-replicas.md.
bench: $(VENV)/.installed
	$(BIN)/python -m tests.bench.harness --tracing --json bench.json --markdown bench.md
	$(BIN)/python -m tests.bench.replicas --rounds 3 --seconds 3 \
	    --json bench-replicas.json --markdown bench-replicas.md

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .run build *.egg-info
