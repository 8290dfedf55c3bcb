"""Triton operators' server side: a ``tritonserver`` process beside a worker, and a thin async client.

``tdist.triton.server`` needs only the standard library (plus ``tritonclient[grpc]`` for config
overrides); ``tdist.triton.client`` needs ``tritonclient[grpc,http]`` and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from tdist.triton.server import (
    CONTROL_HEADER,
    RESTRICTED_APIS,
    STUB_SITE_REQUIREMENTS,
    TRITON_PYTHONPATH_ENV,
    TritonInstallation,
    TritonServer,
    TritonServerOptions,
    default_stub_site,
    ensure_stub_site,
    find_triton,
    merge_config,
    read_model_config,
)

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
