# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup-venv.sh | cksum | cut -d' ' -f1)

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup-venv.sh
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tdist.hello_world.deploy --config etc/tdist/agent.toml --nats-port 0 --log-dir logs \
		--client --requests 100 --concurrency 16

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/request_plane.py
	$(PY) benchmarks/data_plane.py
	$(PY) benchmarks/triton_operator.py
	$(PY) benchmarks/hello_world.py

clean:
	rm -rf $(VENV) .pytest_cache logs
