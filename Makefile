# rebalab: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup image demo test test-unit test-e2e bench bench-race bench-logs bench-audio bench-throughput soak clean

help:
	@echo "make demo   - set up (apt packages, venv, guest image) and run the default hot-plug cycle"
	@echo "make test   - set up and run the whole test suite (unit + end-to-end under QEMU)"
	@echo "make bench  - run the hot-plug benchmark and print figures"
	@echo "make bench-race - run the race-hunt benchmark (race-planted sweep per planted bug)"
	@echo "make bench-audio - the audio analysis' detection limits and speed (synthetic captures)"
	@echo "make bench-logs - read 100 MB logs with every inspect parser (speed, memory)"
	@echo "make bench-throughput - iterations a minute per reset mode and VM count (race-planted)"
	@echo "make soak   - 500 iterations on one VM: the lab's memory, fds, artifacts, lost connections"
	@echo "make image  - (re)build the built-in Linux guest image if its inputs changed"

setup:
	@bash scripts/setup.sh

image: setup

demo: setup
	$(VENV)/bin/rebalab demo

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: setup
	$(PY) bench/hotplug.py

bench-race: setup
	$(PY) bench/race.py

bench-logs: setup
	$(PY) bench/logs.py

bench-audio: setup
	$(PY) bench/audio_gaps.py

bench-throughput: setup
	$(PY) bench/throughput.py

soak: setup
	$(PY) bench/soak.py --iterations 500

clean:
	rm -rf runs .pytest_cache
