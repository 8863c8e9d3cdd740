# icefleet developer tasks. `make` alone lists them.
# Integration tests need redis-server and PostgreSQL on this machine; .ci/run shows the setup.

PYTHON ?= python
PYTEST  = $(PYTHON) -m pytest
# extra pytest arguments, e.g. make test-unit PYTEST_ARGS="-k routing -x"
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lint test test-unit test-integration test-chaos test-stack lock bench docs clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: ## install icefleet in editable mode with the test tools
	$(PYTHON) -m pip install -e '.[test]'

lint: ## ruff check, ruff format --check, mypy (common/ and workers/)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test-unit: ## fast tests of one module, no servers (tests/unit)
	$(PYTEST) -m unit $(PYTEST_ARGS)

test-integration: ## real redis-server, Celery workers, PostgreSQL and moto S3 (tests/integration)
	$(PYTEST) -m integration $(PYTEST_ARGS)

test-chaos: ## real workers killed, Redis restarted, S3 throttled, the catalog cut off (~3 min)
	$(PYTEST) -m chaos $(PYTEST_ARGS)

# The whole suite under coverage, the chaos tests included (each bounded by its own timeout;
# together about three minutes), the stack test aside (make test-stack: it needs Docker).
# `coverage run` (not pytest-cov) so that [tool.coverage.run]
# patch = ["subprocess", ...] follows Celery workers and other child processes: each writes a
# .coverage.* file, combined here. Lines and branches then each have their own floor.
test: lint ## lint, the whole suite under coverage, then the line and branch floors (85% / 80%)
	$(PYTHON) -m coverage erase
	$(PYTHON) -m coverage run -m pytest -m "not stack" $(PYTEST_ARGS)
	$(PYTHON) -m coverage combine --quiet
	$(PYTHON) -m coverage report
	$(PYTHON) -m coverage json --quiet
	$(PYTHON) .ci/check_coverage.py .coverage-report.json --min-lines 85 --min-branches 80

# docs/compose.md's commands on compose.yaml for real: needs a Docker engine with Compose v2 (skips
# without one, fails in CI); docker/stack/engine.sh and prepare.sh set one up where none runs or no
# image can be pulled. -s: the test reports its progress as it goes.
test-stack: ## the compose stack in Docker: 3 writers, 2 committers, faults, every event once
	$(PYTEST) -m stack -s -p no:cacheprovider tests/stack $(PYTEST_ARGS)

# The exact versions the image installs (docker/requirements.lock): icefleet's dependencies and its
# build backend, with hashes, for Python 3.11 on every platform, resolved by uv from PyPI. Existing
# pins are kept while pyproject.toml allows them; LOCK_ARGS=--upgrade takes the newest allowed.
LOCK_ARGS ?=
lock: ## refresh docker/requirements.lock from pyproject.toml (uv pip compile)
	$(PYTHON) -m pip install --quiet 'uv>=0.13,<1'
	$(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(PYTHON) -m uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
			--custom-compile-command 'make lock' $(LOCK_ARGS) pyproject.toml - -o docker/requirements.lock

bench: ## benchmarks (python -m benchmarks)
	$(PYTHON) -m benchmarks

docs: ## regenerate docs/configuration.md from common/settings.py (tests/unit/test_docs.py checks it)
	$(PYTHON) -m common.settings_doc docs/configuration.md

clean: ## remove coverage data and tool caches
	$(PYTHON) -m coverage erase
	rm -rf .coverage-report.json htmlcov .pytest_cache .mypy_cache .ruff_cache
