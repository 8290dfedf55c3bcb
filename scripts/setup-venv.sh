#!/usr/bin/env bash
# Create .venv and install everything tdist needs on a fresh Debian 12 machine (apt included).
# Called by `make`; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

apt_install() {
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: apt-get install $*"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    else
        echo "setup: please install $* (needs root and apt)" >&2
        exit 1
    fi
}

"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv python3-pip

# Triton's python-backend stub links the interpreter's shared libpython.
if ! "$PYTHON" - <<'PY'
import os, sys, sysconfig
v = sysconfig.get_config_var
soname = v("INSTSONAME") or f"libpython3.{sys.version_info[1]}.so.1.0"
dirs = [v("LIBDIR") or "", os.path.join(v("LIBDIR") or "", v("MULTIARCH") or "")]
sys.exit(0 if any(os.path.exists(os.path.join(d, soname)) for d in dirs) else 1)
PY
then
    apt_install "libpython3.$("$PYTHON" -c 'import sys; print(sys.version_info[1])')"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -e '.[test]'
# The Triton server bundled in nvidia-pytriton. --no-deps: it pins numpy<2, which the main venv
# cannot have (ucxx needs numpy>=2); its other dependencies serve PyTriton's own API, unused here.
"${PIP[@]}" --no-deps 'nvidia-pytriton==0.7.0'
# numpy<2 for the python-backend stub, in a site of its own handed to Triton at model load.
"$VENV/bin/python" -m tdist.triton ensure-stub-site
