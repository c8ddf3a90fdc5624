# dsv3 — `make help` lists the targets. Every target sets itself up (.venv) first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
export PYTHONUNBUFFERED := 1
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns.db

CONFIG ?= configs/pretrain_small.yaml
LIFECYCLE_CONFIG ?= configs/lifecycle.yaml
FORCE ?=
INIT ?=
CKPT ?=
LIMIT ?=

.PHONY: help sysdeps install test test-scale test-fast lifecycle pretrain data eval eval-data eval-data-ready posttrain serve bench mlflow-ui \
	prefect-ui deploy deploy-down screenshots clean stack-up stack-down stack-status stack-env

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

sysdeps: ## install the Debian packages in infra/apt-packages.txt (root) or list the missing ones
	bash infra/sysdeps.sh

install: sysdeps $(STAMP) ## create .venv and install torch (CPU) + dsv3 with dev extras

test: sysdeps $(STAMP) ## the test suite but the server-mode scenarios (does its own set-up; < 20 min on 2 cores)
	$(BIN)/python -m pytest -q -ra --durations=15 -m "not scale" tests

test-scale: sysdeps $(STAMP) ## the server-mode / multi-node scenarios (stack, Ray head, outages, deploy, screenshots)
	$(BIN)/python -m pytest -q -ra --durations=15 -m scale tests

test-fast: $(STAMP) ## the suite without slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow" tests

lifecycle: sysdeps $(STAMP) ## data -> pretrain -> extend -> post-train -> evaluate -> gate -> promote, one cached flow (FORCE=stage)
	$(BIN)/python -m flows.lifecycle --config $(LIFECYCLE_CONFIG) $(if $(FORCE),--force $(FORCE))

data: $(STAMP) eval-data-ready ## curate the built-in corpus with DVC (dvc repro) and validate it
	$(BIN)/python -m flows.data

pretrain: $(STAMP) eval-data-ready ## data -> pretrain (small preset) -> context extension; registers dsv3-base, dsv3-long
	$(BIN)/python -m flows.pretrain --config $(CONFIG)

eval-data: $(STAMP) ## extract offline MMLU / DROP / HumanEval data (again)
	$(BIN)/python -m dsv3.evals.offline_data

# data/evals (or $DSV3_EVAL_DATA) prepared when missing, a no-op otherwise: the eval sets that
# `make eval` scores and that the curate stage decontaminates against (data.decontam.paths)
eval-data-ready: $(STAMP)
	@$(BIN)/python -m dsv3.evals.offline_data --if-missing

eval: sysdeps $(STAMP) eval-data-ready ## evaluate dsv3-chat@champion, else the furthest stage's candidate (CKPT=..., LIMIT=...)
	$(BIN)/python -m flows.evaluate $(if $(CKPT),--ckpt $(CKPT)) $(if $(LIMIT),--limit $(LIMIT))

posttrain: $(STAMP) ## SFT -> reward model -> GRPO from dsv3-long@champion, else @candidate (INIT=uri|path|fresh)
	$(BIN)/python -m flows.posttrain $(if $(INIT),--init $(INIT))

MODEL ?= models:/dsv3-chat@champion
serve: $(STAMP) ## OpenAI-compatible server on the champion chat model (MODEL=..., ARGS="--port 8000 ...")
	$(BIN)/dsv3 serve $(MODEL) $(ARGS)

bench: $(STAMP) ## run the benchmark scripts (print figures)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

mlflow-ui: $(STAMP) ## open the MLflow UI on the local store
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

prefect-ui: $(STAMP) ## start a local Prefect server with its UI
	$(BIN)/prefect server start

STACK_DIR ?= .stack
stack-up: sysdeps $(STAMP) ## start the server-mode stack (PostgreSQL, S3, MLflow, Prefect, 2 Ray nodes) in .stack/
	$(BIN)/python infra/stack.py up --state $(STACK_DIR)

stack-down: ## stop what stack-up started (keeps .stack/: logs, database)
	$(BIN)/python infra/stack.py down --state $(STACK_DIR)

stack-status: ## health of each stack part
	$(BIN)/python infra/stack.py status --state $(STACK_DIR)

stack-env: ## print the exports that point dsv3 at the stack (or: source .stack/env)
	@$(BIN)/python infra/stack.py env --state $(STACK_DIR)

PREFECT_PORT ?= 4200
deploy: $(STAMP) ## Prefect deployments (prefect.yaml) on a local server + a process worker; stop: make deploy-down
	$(BIN)/python infra/deploy.py up --port $(PREFECT_PORT)

deploy-down: ## stop the worker and the Prefect server that `make deploy` started
	$(BIN)/python infra/deploy.py down

screenshots: sysdeps $(STAMP) ## PNGs of the MLflow compare/registry pages and the Prefect flow-run graph -> docs/img/
	$(BIN)/python infra/screenshots.py --out docs/img

clean: ## remove caches (keeps .venv, data and runs)
	rm -rf .pytest_cache **/__pycache__
