"""Hello-world encoder: a standard Triton python-backend model.

output        = np.tile(~x, k)        (bitwise NOT of `input`, repeated k = `input_copies` times)
input_copies  = [k]
slept_seconds = [seconds slept], measured here; the model sleeps delay * len(output)

`input_copies` (default 1) and `delay` (default 0, seconds per output element) come from the
model configuration's `parameters` (string_value); the request parameters of the same names
override them per request. Bad values or inputs give an error response for that request only.

Runs unchanged in a stock Triton container. Outside one, if TDIST_TRITON_PYTHONPATH is set, its
directories go first on sys.path BEFORE numpy is imported: the python-backend stub ignores
PYTHONPATH, and the stub bundled with nvidia-pytriton needs numpy<2 (tdist hands it a small
site directory holding numpy<2). Unset in a stock container, so nothing changes there.
"""

import os
import sys

_extra_path = os.environ.get("TDIST_TRITON_PYTHONPATH")
if _extra_path:
    for _p in reversed([p for p in _extra_path.split(os.pathsep) if p]):
        if _p not in sys.path:
            sys.path.insert(0, _p)

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

_SLEEP_SLICE = 0.05  # seconds between cancellation checks while sleeping


class BadRequest(ValueError):
    """A request's inputs or parameters are invalid (INVALID_ARG)."""


def _error(message, code="INVALID_ARG"):
    """A TritonError with ``code`` (a pb_utils.TritonError constant name, or None for INTERNAL)."""
    code = getattr(pb_utils.TritonError, code, None) if code else None
    if code is not None:
        try:
            return pb_utils.TritonError(message, code)
        except TypeError:  # Triton older than 23.x: no error codes
            pass
    return pb_utils.TritonError(message)


def parse_copies(value, source):
    if isinstance(value, bool):
        raise BadRequest(f"input_copies from {source} must be an integer >= 1, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BadRequest(f"input_copies from {source} must be an integer >= 1, got {value!r}") from None
    if not isinstance(value, int) or value < 1:
        raise BadRequest(f"input_copies from {source} must be an integer >= 1, got {value!r}")
    return value


def parse_delay(value, source):
    if isinstance(value, bool):
        raise BadRequest(f"delay from {source} must be a number of seconds >= 0, got {value!r}")
    try:
        delay = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"delay from {source} must be a number of seconds >= 0, got {value!r}") from None
    if not math.isfinite(delay) or delay < 0:
        raise BadRequest(f"delay from {source} must be a number of seconds >= 0, got {value!r}")
    return delay


def config_parameter(model_config, key, default):
    entry = model_config.get("parameters", {}).get(key)
    if entry is None:
        return default
    if isinstance(entry, dict):
        return entry.get("string_value", default)
    return entry


def request_parameters(request):
    getter = getattr(request, "parameters", None)
    if getter is None:
        return {}
    raw = getter()
    if not raw:
        return {}
    params = json.loads(raw) if isinstance(raw, str) else raw
    return params if isinstance(params, dict) else {}


def int64_vector(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise BadRequest(f"missing input '{name}'")
    array = tensor.as_numpy()
    if array.dtype != np.int64:
        raise BadRequest(f"input '{name}' must be INT64, got {array.dtype}")
    if array.ndim != 1:
        raise BadRequest(f"input '{name}' must have one dimension, got shape {list(array.shape)}")
    return array


def sleep_for(seconds, request):
    """Sleep `seconds` (in slices, stopping early if the request is cancelled); return (slept, cancelled)."""
    if seconds <= 0:
        return 0.0, False
    is_cancelled = getattr(request, "is_cancelled", None)
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            return now - start, False
        if is_cancelled is not None and is_cancelled():
            return now - start, True
        time.sleep(min(_SLEEP_SLICE, end - now))


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.input_copies = parse_copies(config_parameter(model_config, "input_copies", "1"), "the model config")
        self.delay = parse_delay(config_parameter(model_config, "delay", "0"), "the model config")

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            params = request_parameters(request)
            k = self.input_copies
            if "input_copies" in params:
                k = parse_copies(params["input_copies"], "the request parameters")
            delay = self.delay
            if "delay" in params:
                delay = parse_delay(params["delay"], "the request parameters")
            x = int64_vector(request, "input")
            out = np.tile(np.invert(x), k)
        except BadRequest as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the instance down
            return pb_utils.InferenceResponse(
                output_tensors=[], error=_error(f"encoder failed: {type(exc).__name__}: {exc}", code=None)
            )
        slept, cancelled = sleep_for(delay * len(out), request)
        if cancelled:
            return pb_utils.InferenceResponse(output_tensors=[], error=_error("request cancelled", code="CANCELLED"))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("output", out),
                pb_utils.Tensor("input_copies", np.array([k], dtype=np.int64)),
                pb_utils.Tensor("slept_seconds", np.array([slept], dtype=np.float64)),
            ]
        )

    def finalize(self):
        pass
