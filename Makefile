# icefleet developer tasks. `make` alone lists them.
# Integration tests need redis-server and PostgreSQL on this machine; .ci/run shows the setup.

PYTHON ?= python
PYTEST  = $(PYTHON) -m pytest
# extra pytest arguments, e.g. make test-unit PYTEST_ARGS="-k routing -x"
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lint test test-unit test-integration test-chaos bench docs clean

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
# together about three minutes). `coverage run` (not pytest-cov) so that [tool.coverage.run]
# patch = ["subprocess", ...] follows Celery workers and other child processes: each writes a
# .coverage.* file, combined here. Lines and branches then each have their own floor.
test: lint ## lint, the whole suite under coverage, then the line and branch floors (85% / 80%)
	$(PYTHON) -m coverage erase
	$(PYTHON) -m coverage run -m pytest $(PYTEST_ARGS)
	$(PYTHON) -m coverage combine --quiet
	$(PYTHON) -m coverage report
	$(PYTHON) -m coverage json --quiet
	$(PYTHON) .ci/check_coverage.py .coverage-report.json --min-lines 85 --min-branches 80

bench: ## benchmarks (python -m benchmarks)
	$(PYTHON) -m benchmarks

docs: ## regenerate docs/configuration.md from common/settings.py (tests/unit/test_docs.py checks it)
	$(PYTHON) -m common.settings_doc docs/configuration.md

clean: ## remove coverage data and tool caches
	$(PYTHON) -m coverage erase
	rm -rf .coverage-report.json htmlcov .pytest_cache .mypy_cache .ruff_cache
