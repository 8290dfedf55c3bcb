"""Hello-world decoder: a standard Triton python-backend model.

output        = ~y[: len(y) // k]     (drops the encoder's extra copies and inverts, so that
                                       decode(encode(x)) == x for every k >= 1)
slept_seconds = [seconds slept], measured here; the model sleeps delay * len(output)

k is the optional `input_copies` input (as the encoder outputs it); else the `input_copies`
request parameter; else the model configuration's `input_copies` parameter (default 1). If both
the input and the request parameter are given they must agree. `delay` (default 0, seconds per
output element) comes from the configuration's `parameters` (string_value), overridden by the
`delay` request parameter. len(y) must be a multiple of k. Bad values or inputs give an error
response for that request only.

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

    def _copies(self, request, params):
        from_param = None
        if "input_copies" in params:
            from_param = parse_copies(params["input_copies"], "the request parameters")
        tensor = pb_utils.get_input_tensor_by_name(request, "input_copies")
        if tensor is not None:
            array = tensor.as_numpy()
            if array.dtype != np.int64 or array.size != 1:
                raise BadRequest(
                    f"input 'input_copies' must be one INT64 value, got {array.dtype} shape {list(array.shape)}"
                )
            from_input = parse_copies(int(array.reshape(-1)[0]), "the input 'input_copies'")
            if from_param is not None and from_param != from_input:
                raise BadRequest(
                    f"input 'input_copies' ({from_input}) and request parameter input_copies ({from_param}) disagree"
                )
            return from_input
        return from_param if from_param is not None else self.input_copies

    def _one(self, request):
        try:
            params = request_parameters(request)
            k = self._copies(request, params)
            delay = self.delay
            if "delay" in params:
                delay = parse_delay(params["delay"], "the request parameters")
            y = int64_vector(request, "input")
            if len(y) % k:
                raise BadRequest(f"input length {len(y)} is not a multiple of input_copies {k}")
            out = np.invert(y[: len(y) // k])
        except BadRequest as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the instance down
            return pb_utils.InferenceResponse(
                output_tensors=[], error=_error(f"decoder failed: {type(exc).__name__}: {exc}", code=None)
            )
        slept, cancelled = sleep_for(delay * len(out), request)
        if cancelled:
            return pb_utils.InferenceResponse(output_tensors=[], error=_error("request cancelled", code="CANCELLED"))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("output", out),
                pb_utils.Tensor("slept_seconds", np.array([slept], dtype=np.float64)),
            ]
        )

    def finalize(self):
        pass
