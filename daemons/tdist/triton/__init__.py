"""Triton operators' server side: a ``tritonserver`` process beside a worker, and a thin async client.

One module per concern: ``install`` (finding the binary), ``stub_site`` (numpy<2 for the
python-backend stub), ``model_config`` (config.pbtxt and overrides), ``processes`` (dying with the
worker, hiding the key, sweeping leftovers), ``server`` (the server's life and its control API).
They need only the standard library (plus ``tritonclient[grpc]`` for config overrides);
``client`` needs ``tritonclient[grpc,http]`` and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from tdist.triton.install import TritonInstallation, find_triton
from tdist.triton.model_config import merge_config, read_model_config
from tdist.triton.server import CONTROL_HEADER, RESTRICTED_APIS, TritonServer, TritonServerOptions
from tdist.triton.stub_site import STUB_SITE_REQUIREMENTS, TRITON_PYTHONPATH_ENV, default_stub_site, ensure_stub_site

_CLIENT_NAMES = ("TritonClient", "TritonResult", "cleanup_stale_regions", "map_triton_error")


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from tdist.triton import client

        return getattr(client, name)
    raise AttributeError(f"module 'tdist.triton' has no attribute {name!r}")


__all__ = [
    "CONTROL_HEADER",
    "RESTRICTED_APIS",
    "STUB_SITE_REQUIREMENTS",
    "TRITON_PYTHONPATH_ENV",
    "TritonInstallation",
    "TritonServer",
    "TritonServerOptions",
    "default_stub_site",
    "ensure_stub_site",
    "find_triton",
    "merge_config",
    "read_model_config",
    *_CLIENT_NAMES,
]
