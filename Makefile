# The verbs a newcomer wants.  Everything installs into .venv/ in this tree.
#
#   make run     start the standalone agent on an embedded default
#                (state, dev PKI and logs under .state/, no external services;
#                more options: make run AGENT_ARGS='--listen 127.0.0.1:54321
#                --insecure')
#   make check   install everything the tests need, lint, then run the whole suite
#   make lint    ruff (pyflakes, pycodestyle) and vermin (Python 3.9) only
#   make bench   run the benchmarks in bench/
#   make interop drive the agent with ovirt-engine's own JSON-RPC client,
#                every scenario (docs/interop.md; the suite runs a quick set)
#   make rpm     build the noarch RPM (see managedvolume.spec)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STATE_DIR ?= .state
PYTEST_ARGS ?=
AGENT_ARGS ?=

.PHONY: venv run lint check test sysdeps bench interop rpm clean

venv: $(STAMP)

# A venv without pip (python3 -m venv without Debian's python3-venv leaves
# one) is made again, not kept for ever.
$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	$(PY) -m pip --version >/dev/null 2>&1 || \
	    { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[host,engine,test]'
	touch $@

sysdeps:
	bash scripts/install-sysdeps.sh

run: venv
	$(VENV)/bin/managedvolume-agent --state-dir $(STATE_DIR) $(AGENT_ARGS)

# Settings: [tool.ruff] in pyproject.toml, [vermin] in setup.cfg.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vermin vdsm_managedvolume hooks

check: venv sysdeps lint
	$(PY) -m pytest $(PYTEST_ARGS)

test: check

bench: venv
	$(PY) bench/attach.py
	$(PY) bench/rpc.py
	$(PY) bench/engine.py
	$(PY) bench/enginejava.py
	$(PY) bench/load.py
	$(PY) bench/logcost.py
	$(PY) bench/privsep_rt.py

interop: venv
	$(PY) scripts/enginejava.py --full

rpm:
	bash scripts/build-rpm.sh

clean:
	rm -rf $(VENV) $(STATE_DIR) build dist *.egg-info
