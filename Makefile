# rebalab: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist: unit tests on every core; end-to-end tests two at a time (TCG runs a VM on
# one core: more VMs than cores only slows every guest), grouped so that a module-scoped
# VM serves its module on one worker; then the tests marked `serial` alone (pyproject.toml).
UNIT_N ?= auto
E2E_N ?= 2
PYTEST := $(PY) -m pytest
UNIT_PASS = $(PYTEST) tests/unit -n $(UNIT_N) $(PYTEST_ARGS)
E2E_PASSES = \
	run_pass e2e-parallel $(PYTEST) tests/e2e -m "not serial" -n $(E2E_N) --dist loadgroup $(PYTEST_ARGS); \
	run_pass e2e-serial $(PYTEST) tests/e2e -m serial $(PYTEST_ARGS);
# Every pass runs even if one before failed (one CI log shows every failure); make fails
# if any did. Exit 5 (nothing selected, e.g. a -k that matches one pass only) fails only
# when every pass selected nothing. Ctrl-C stops here, not just the current pass.
RUN_PASSES = trap 'echo "make: interrupted"; exit 130' INT; failed=""; ran=0; \
	run_pass() { name=$$1; shift; echo "== $$name:$$(printf " %q" "$$@")"; "$$@"; rc=$$?; \
	  case $$rc in 0) ran=1;; 5) ;; *) ran=1; failed="$$failed $$name(exit $$rc)";; esac; }; \
	$(1) \
	if [ -n "$$failed" ]; then echo "make: failed passes:$$failed"; exit 1; fi; \
	if [ $$ran = 0 ]; then echo "make: no pass selected a test"; exit 5; fi

.PHONY: help setup image demo test test-unit test-e2e bench bench-race bench-logs bench-audio bench-throughput bench-snapshot-mechanism soak clean

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
	@$(call RUN_PASSES,run_pass unit $(UNIT_PASS); $(E2E_PASSES))

test-unit: setup
	$(UNIT_PASS)

test-e2e: setup
	@$(call RUN_PASSES,$(E2E_PASSES))

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

bench-snapshot-mechanism: setup
	$(PY) bench/snapshot_mechanism.py

soak: setup
	$(PY) bench/soak.py --iterations 500

clean:
	rm -rf runs .pytest_cache
