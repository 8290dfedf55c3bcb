"""Model configuration overrides: ``config.pbtxt`` as Triton's repository API takes it, merged
with a deployment's overrides (``config = {instance_group = [...], parameters = {...}}``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdist.errors import TritonError, TritonModelNotReady


def read_model_config(repository: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """``<repository>/<name>/config.pbtxt`` as the JSON dict Triton's repository API takes
    (protobuf field names; needs ``protobuf`` and ``tritonclient[grpc]`` for the schema)."""
    path = Path(repository) / name / "config.pbtxt"
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonError("config overrides need tritonclient[grpc] (protobuf and Triton's model_config schema)") from exc
    try:
        text = path.read_text()
    except OSError as exc:
        raise TritonModelNotReady(f"model '{name}' has no config.pbtxt in the repository", path=str(path)) from exc
    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonError(f"cannot parse config.pbtxt of model '{name}': {exc}", path=str(path)) from exc
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    config["name"] = name
    return config


def normalize_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``overrides``; plain values under ``parameters`` become ``{"string_value": str(v)}``
    (``{"delay": 0.1}`` means ``{"delay": {"string_value": "0.1"}}``)."""
    out = copy.deepcopy(dict(overrides))
    params = out.get("parameters")
    if isinstance(params, Mapping):
        out["parameters"] = {
            str(k): (dict(v) if isinstance(v, Mapping) else {"string_value": _param_str(v)}) for k, v in params.items()
        }
    return out


def _param_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
