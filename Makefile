# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup-venv.sh | cksum | cut -d' ' -f1)

.PHONY: demo test bench venv wheelhouse clean

# Where `make wheelhouse` puts the wheels (ansible/ copies them to the hosts).
WHEELHOUSE ?= dist/wheelhouse

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
	$(PY) benchmarks/scale.py

# tdist and every dependency as wheels, for hosts that install with no index (air-gapped GPU
# hosts; ansible/roles/tdist_agent and nats_server). Built for .venv's CPython (3.11: Debian 12's
# python3 on the hosts). Also nvidia-pytriton (its Triton server; installed --no-deps, as in
# scripts/setup-venv.sh), numpy<2 (the Triton stub site), and setuptools and wheel (so that the
# directory alone can build tdist again: PIP_NO_INDEX=1 make wheelhouse). Wheels already there are
# reused; SHA256SUMS lists them all (the role reinstalls when it changes). The tdist wheel is built
# from a copy of the tree, so nothing is written into it.
wheelhouse: $(STAMP)
	@mkdir -p $(WHEELHOUSE)
	@rm -f $(WHEELHOUSE)/tdist-*.whl $(WHEELHOUSE)/SHA256SUMS
	@src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	  tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml README.md daemons | tar -x -C "$$src" && \
	  $(PY) -m pip wheel --quiet --disable-pip-version-check --find-links $(WHEELHOUSE) \
	    --wheel-dir $(WHEELHOUSE) "$$src" && \
	  $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --find-links $(WHEELHOUSE) \
	    --wheel-dir $(WHEELHOUSE) 'nvidia-pytriton==0.7.0' 'numpy<2' 'setuptools>=68' wheel
	@cd $(WHEELHOUSE) && sha256sum *.whl > SHA256SUMS
	@echo "wheelhouse: $(WHEELHOUSE) ($$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1))"

clean:
	rm -rf $(VENV) .pytest_cache logs
