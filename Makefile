# One command each, on a fresh machine:
#   make demo   set up .venv, train the digits CNN, compile INT8 for x86, verify, run, benchmark
#   make test   set up .venv and run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgekit-installed

.PHONY: install demo test test-fast test-deps bench clean

$(STAMP): pyproject.toml runtime/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/edgekit demo

# The fleet tests start their own Mosquitto (Debian `mosquitto`; `mosquitto_passwd` comes with it)
# and PostgreSQL (Debian `postgresql`: initdb/postgres in /usr/lib/postgresql/<version>/bin; the tests
# run a throwaway cluster in a temp dir, as the `postgres` account when we are root) and make TLS
# certificates with openssl; the `edgekit flash --host` tests start their own sshd (Debian
# `openssh-server`); the firmware scripts are linted with Debian `shellcheck`. Installed here when
# missing and we are root (CI); otherwise say what to install (those tests skip without them, except
# under CI=true where they fail).
test-deps:
	@if { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 \
	    && test -x /usr/sbin/sshd && command -v ssh-keygen >/dev/null 2>&1 && command -v shellcheck >/dev/null 2>&1 \
	    && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    mosquitto mosquitto-clients openssl openssh-server openssh-client shellcheck postgresql; \
	else \
	  echo "make test: the fleet and flash tests need Mosquitto, PostgreSQL, openssl and sshd, the firmware lint" \
	    "shellcheck: sudo apt-get install mosquitto mosquitto-clients postgresql openssl openssh-server shellcheck" >&2; \
	fi

test: install test-deps
	$(BIN)/python -m pytest -q

test-fast: install test-deps
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.int8_vs_fp32
	$(BIN)/python -m benchmarks.runtime_overhead
	$(BIN)/python benchmarks/telemetry_ingest.py --pg
	$(BIN)/python benchmarks/fleet_rollout.py
	$(BIN)/python -m benchmarks.train_tasks

clean:
	rm -rf build .pytest_cache
