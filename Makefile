# dreambooth-operator: every entry point. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(CURDIR)/.tools/bin
export PATH := $(BIN):$(CURDIR)/$(VENV)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: install
install: ## Create .venv with the four projects (api, operator, trainer, cli) and the pinned test/lint tools (idempotent)
	@bash tests/infra/install-venv.sh

.PHONY: binaries
binaries: ## Build/cache etcd, kube-*, kubectl, helm, kueue, weed, prometheus into .tools/bin (idempotent)
	@bash tests/infra/build-binaries.sh all

.PHONY: lock
lock: ## Re-pin requirements/dev.lock from the pyprojects and requirements/dev.in
	$(VENV)/bin/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--no-emit-package dreambooth-api requirements/workspace.in api/pyproject.toml operator/pyproject.toml cli/pyproject.toml trainer/pyproject.toml requirements/dev.in -o requirements/dev.lock

.PHONY: lint
lint: install ## ruff, mypy (strict), import contracts, hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	@if ls images/*/Dockerfile >/dev/null 2>&1; then $(VENV)/bin/hadolint images/*/Dockerfile; fi

.PHONY: fmt
fmt: install ## Format and auto-fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: crds
crds: install ## Regenerate crds/ and docs/api.md from the typed models
	$(PY) -m dreambooth_api.generate

.PHONY: dashboards
dashboards: install ## Regenerate the chart's Grafana dashboards (charts/dreambooth-operator/files/dashboard-*.json)
	$(PY) charts/dreambooth-operator/dashboards/build.py

.PHONY: verify
verify: crds dashboards ## Fail when generated files differ from the committed ones
	git diff --exit-code -- crds/ docs/api.md charts/dreambooth-operator/crds/ charts/dreambooth-operator/files/

.PHONY: test-unit
test-unit: install ## Unit tests (no services)
	$(PY) -m pytest -m unit tests $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: install binaries ## Integration tests (real control plane, S3 server, Prometheus)
	$(PY) -m pytest -m integration tests $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: install binaries ## End-to-end tests (node agent runs real trainer processes)
	$(PY) -m pytest -m e2e tests $(PYTEST_ARGS)

.PHONY: test-chaos
test-chaos: install binaries ## The chaos suite alone (tests/chaos; `make test` runs it with the e2e tier; DBO_CHAOS_SEED=N)
	$(PY) -m pytest -m chaos tests $(PYTEST_ARGS)

.PHONY: test-gpu
test-gpu: install ## GPU tests (skipped without CUDA)
	$(PY) -m pytest -m gpu tests $(PYTEST_ARGS)

.PHONY: test
test: install binaries lint ## Everything CI runs: lint, then unit + integration + e2e tests
	$(PY) -m pytest -m "unit or integration or e2e" tests $(PYTEST_ARGS)

.PHONY: demo
demo: install ## Run a real DreamBooth job locally on the tiny model (file:// storage); writes .demo/report.html
	$(VENV)/bin/dreambooth demo-subject .demo/subject
	$(VENV)/bin/dreambooth run examples/demo-job.yaml --local --workdir .demo --images .demo/subject

.PHONY: cluster
cluster: install binaries ## Try it locally: control plane, fake GPU nodes, S3, Prometheus, the operator from the chart; stays up
	@$(PY) -m tests.infra.cluster up

.PHONY: cluster-down
cluster-down: ## Stop what `make cluster` started (from another terminal; Ctrl-C in its own does the same)
	@$(PY) -m tests.infra.cluster down

.PHONY: bench
bench: install binaries ## Benchmarks; JSON results under bench/results/
	$(PY) -m bench $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove .venv and build outputs (keeps the shared binary and wheel caches)
	rm -rf $(VENV) .tools .demo .pytest_cache .mypy_cache .ruff_cache
