# The README's two commands: `make run` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-deps lint typecheck unit bench clean

run: $(VENV)/.installed
	$(BIN)/echowin-gateway quickstart --config config/gateway.example.yaml

test: $(VENV)/.installed test-deps lint typecheck unit

# Redis, Prometheus, Chromium: installed when missing, Redis started when down.
test-deps:
	bash scripts/test-deps.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/hadolint Dockerfile
	$(BIN)/yamllint deploy config .yamllint

typecheck: $(VENV)/.installed
	$(BIN)/mypy --strict proxy

unit: $(VENV)/.installed
	$(BIN)/pytest -q -p no:cacheprovider

# The performance harness (docs/performance.md): a few minutes; writes bench.json, bench.md.
bench: $(VENV)/.installed
	$(BIN)/python -m tests.bench.harness --json bench.json --markdown bench.md

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .run build *.egg-info
