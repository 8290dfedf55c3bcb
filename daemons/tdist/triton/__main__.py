"""``python -m tdist.triton ensure-stub-site [PATH]`` builds the numpy<2 site the python-backend
stub of nvidia-pytriton needs (idempotent; for the Makefile's install step) and prints its path.
``python -m tdist.triton find`` prints where the tritonserver binary and its parts are (JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from tdist.errors import TritonError
from tdist.triton.install import find_triton, libpython_dirs
from tdist.triton.stub_site import default_stub_site, ensure_stub_site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdist.triton")
    sub = parser.add_subparsers(dest="command", required=True)
    site = sub.add_parser("ensure-stub-site", help="build the stub site (numpy<2) if missing")
    site.add_argument("path", nargs="?", default=None, help=f"default: {default_stub_site()}")
    sub.add_parser("find", help="print the tritonserver installation")
    args = parser.parse_args(argv)
    try:
        if args.command == "ensure-stub-site":
            print(ensure_stub_site(args.path))
        else:
            inst = find_triton()
            print(json.dumps({
                "binary": str(inst.binary), "backends": str(inst.backends),
                "lib_dirs": [str(d) for d in inst.lib_dirs],
                "python_stub": str(inst.python_stub) if inst.python_stub else None,
                "source": inst.source, "libpython_dirs": [str(d) for d in libpython_dirs()],
                "stub_site": str(default_stub_site()),
            }, indent=2))
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
