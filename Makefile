# food101-benchmark: `make demo` runs the whole benchmark on the bundled sample,
# `make test` runs the test suite. Both create .venv and install on first use.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint browser mlflow-server prefect-server serve server-env constraints clean help

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

# Two pytest-xdist workers, a file at a time; the files that use the session's demo run share one
# worker (tests/conftest.py), and each worker gets its share of the torch threads.
TEST_WORKERS ?= 2

test: $(STAMP) browser  ## set up, then run the test suite
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

browser:  ## Debian's chromium, for the report's browser test (needs root and apt; under CI=true a failure fails)
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for the HTML report test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || if [ "$$CI" = true ]; then echo "chromium could not be installed (CI=true: the browser test must run)" >&2; \
	    exit 1; else echo "chromium could not be installed: the browser test will be skipped"; fi; }

# The local servers listen on 127.0.0.1 only. Prefect wants a secret on every request (a browser
# page or a DNS-rebound name cannot supply it), CSRF tokens, and allows no other origin; MLflow
# refuses other Host names and cross-origin writes (its basic-auth app needs `mlflow[auth]`, not
# installed here). The secret is made on first use under $(STATE) (git-ignored, mode 600);
# `eval "$$(make -s server-env)"` exports what the clients (food101, prefect, mlflow) need.
STATE            ?= $(CURDIR)/.state
PREFECT_HOME     ?= $(STATE)/prefect
PREFECT_PORT     ?= 4200
MLFLOW_PORT      ?= 5000
MLFLOW_DB        ?= $(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns

$(STATE)/%.secret:
	@mkdir -p $(STATE) && umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > $@

mlflow-server: $(STAMP)  ## MLflow on 127.0.0.1:5000 over mlflow.db: loopback only, Host and Origin checked
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --workers 1 --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --allowed-hosts 127.0.0.1:$(MLFLOW_PORT),localhost:$(MLFLOW_PORT) \
	  --cors-allowed-origins http://127.0.0.1:$(MLFLOW_PORT),http://localhost:$(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(MLFLOW_DB) --default-artifact-root $(MLFLOW_ARTIFACTS)

prefect-server: $(STAMP) $(STATE)/prefect.secret  ## Prefect on 127.0.0.1:4200: basic auth, CSRF tokens, no cross-origin calls
	PREFECT_HOME=$(PREFECT_HOME) PREFECT_SERVER_ANALYTICS_ENABLED=false \
	  PREFECT_SERVER_API_AUTH_STRING="food101:$$(cat $(STATE)/prefect.secret)" \
	  PREFECT_SERVER_CSRF_PROTECTION_ENABLED=true \
	  PREFECT_SERVER_CORS_ALLOWED_ORIGINS=http://127.0.0.1:$(PREFECT_PORT),http://localhost:$(PREFECT_PORT) \
	  $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

server-env: $(STATE)/prefect.secret  ## print the exports the servers' clients need
	@echo "export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api"
	@echo "export PREFECT_API_AUTH_STRING=food101:$$(cat $(STATE)/prefect.secret)"
	@echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)"

serve: $(STAMP) $(STATE)/prefect.secret  ## register deployment food101/benchmark (weekly) and serve its runs
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_API_AUTH_STRING="food101:$$(cat $(STATE)/prefect.secret)" \
	  $(BIN)/food101 serve

constraints: $(STAMP)  ## re-pin every package after changing pyproject.toml
	$(BIN)/pip freeze --exclude-editable | sed '1i # Every package of the environment, pinned (Python 3.11, x86_64).' > constraints.txt

clean:  ## remove generated data, artifacts and local state (keeps .venv and data/sample)
	rm -rf data/raw data/manifest data/cache artifacts reports mlflow.db mlruns .state
