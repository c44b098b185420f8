# The pipeline without Docker, and the tests. With Docker: `docker compose up` (see docker-compose.yml).
PYTHON ?= python3

.PHONY: up down down-all test

up:  ## broker, topics, serve, train --every, synthetic produce, Prometheus when installed
	PYTHON=$(PYTHON) deploy/local/up

down:  ## stop what `make up` started (the broker keeps running)
	deploy/local/down

down-all:  ## the same, and the broker `make up` started
	deploy/local/down --all

test:  ## every test (the integration tests start a broker when none answers)
	$(PYTHON) -m pytest -q
