# The pipeline without Docker, and the tests. With Docker: `docker compose up` (see docker-compose.yml).
PYTHON ?= python3

.PHONY: up down down-all test test-fast lint docs

up:  ## broker, topics, serve, train --every, synthetic produce, Prometheus when installed
	PYTHON=$(PYTHON) deploy/local/up

down:  ## stop what `make up` started (the broker keeps running)
	deploy/local/down

down-all:  ## the same, and the broker `make up` started
	deploy/local/down --all

# The test dependencies first (pytest, ruff, the notebook runner: extras dev and notebooks), so that
# `make test` works on a fresh clone after `pip install -e .`. PYTEST_ARGS: e.g. a test file, or -m "not slow".
# WORKERS: pytest-xdist workers (0: one process, the default: the fault tests time brokers and services,
# and in parallel on two cores one of them failed now and then; `make test WORKERS=3` takes about 11 minutes)
# WORKERS (more): (tests wait on the broker and on subprocesses much of the time, so more than
# the cores); a file stays on one worker, in one piece (module fixtures such as a running pipeline or a
# secure broker on a fixed port are set up once; spread test by test, a worker may run them in pieces).
PYTEST_ARGS ?=
WORKERS ?= 0

test:  ## installs what the tests need, then every test (the integration tests start a broker when none answers)
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev,notebooks]'
	$(PYTHON) -m pytest -q --durations=25 -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

# The quick loop while working (after `pip install -e '.[dev,notebooks]'`): no broker, two workers. The
# markers are declared in pyproject.toml; tests/integration/ is marked integration as a whole.
test-fast:  ## the tests marked neither slow nor integration
	$(PYTHON) -m pytest -q -m "not slow and not integration" -n 2 $(PYTEST_ARGS)

# The paths .ci/run lints.
LINT_PATHS ?= forecaster tests bench

lint:  ## ruff check and ruff format --check, as CI runs them
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

docs:  ## the documentation site (mkdocs.yml, docs/) into site/; any warning fails it
	$(PYTHON) -m mkdocs build --strict
