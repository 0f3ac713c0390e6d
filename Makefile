# food101-benchmark: `make demo` runs the whole benchmark on the bundled sample,
# `make test` runs the test suite. Both create .venv and install on first use.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint browser mlflow-server prefect-server serve constraints clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## set up, then run the whole benchmark on data/sample (CPU, a few minutes)
	$(BIN)/food101 run --profile demo

test: $(STAMP) browser  ## set up, then run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

browser:  ## Debian's chromium, for the report's browser test (needs root and apt; under CI=true a failure fails)
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for the HTML report test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || if [ "$$CI" = true ]; then echo "chromium could not be installed (CI=true: the browser test must run)" >&2; \
	    exit 1; else echo "chromium could not be installed: the browser test will be skipped"; fi; }

mlflow-server: $(STAMP)  ## an MLflow server on 127.0.0.1:5000 over mlflow.db (one worker)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --workers 1 --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlruns

prefect-server: $(STAMP)  ## a Prefect server on 127.0.0.1:4200
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1 --port 4200

serve: $(STAMP)  ## register deployment food101/benchmark (weekly) and serve its runs
	$(BIN)/food101 serve

constraints: $(STAMP)  ## re-pin every package after changing pyproject.toml
	$(BIN)/pip freeze --exclude-editable | sed '1i # Every package of the environment, pinned (Python 3.11, x86_64).' > constraints.txt

clean:  ## remove generated data, artifacts and local state (keeps .venv and data/sample)
	rm -rf data/raw data/manifest data/cache artifacts reports mlflow.db mlruns .state
