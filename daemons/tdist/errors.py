"""Typed errors shared by every plane.

Each error has a stable wire ``code`` so that a worker can send it in an error
response and the caller can raise the same type again (see ``error_from_code``).
"""

from __future__ import annotations

from typing import Any


class TdistError(Exception):
    """Base of every tdist error; ``details`` carries machine-readable context."""

    code: str = "INTERNAL"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        if not self.details:
            return self.message
        ctx = ", ".join(f"{k}={v!r}" for k, v in sorted(self.details.items()))
        return f"{self.message} ({ctx})"


class ConfigError(TdistError):
    """A configuration file or value is invalid; names the file, key and reason.

    ``message`` is ``FILE:KEY: REASON``; ``reason`` is the bare reason, so that a caller that
    knows better where the value came from (a flag, a table's full key) re-raises with
    ``ConfigError(exc.reason, file=..., key=...)`` instead of rewriting the text.
    """

    code = "CONFIG"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, **details: Any) -> None:
        where = ":".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message, file=file, key=key, **details)
        self.reason = message
        self.file = file
        self.key = key


class DeadlineExceeded(TdistError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(TdistError):
    code = "CANCELLED"


class PayloadTooLarge(TdistError):
    code = "PAYLOAD_TOO_LARGE"


class OperatorNotFound(TdistError):
    code = "OPERATOR_NOT_FOUND"


class OperatorError(TdistError):
    """The operator's own code raised; ``details['type']`` names the exception."""

    code = "OPERATOR_ERROR"


class InvalidRequest(TdistError):
    """A message could not be decoded, or its inputs do not fit the operator."""

    code = "INVALID_REQUEST"


class MaxDeliveriesExceeded(TdistError):
    """Every delivery attempt of a request ended without a final response."""

    code = "MAX_DELIVERIES"


class RequestPlaneFull(TdistError):
    """The work-queue stream refused the request (its limits are reached)."""

    code = "REQUEST_PLANE_FULL"


class RequestPlaneUnavailable(TdistError):
    """The request plane could not take the request (no stream, no connection)."""

    code = "UNAVAILABLE"


class WorkerDraining(TdistError):
    code = "DRAINING"


class RegistryError(TdistError):
    code = "REGISTRY"


class NatsServerError(TdistError):
    """The embedded nats-server failed to start or stop."""

    code = "NATS_SERVER"


_BY_CODE: dict[str, type[TdistError]] = {
    cls.code: cls
    for cls in (
        TdistError,
        DeadlineExceeded,
        Cancelled,
        PayloadTooLarge,
        OperatorNotFound,
        OperatorError,
        InvalidRequest,
        MaxDeliveriesExceeded,
        RequestPlaneFull,
        RequestPlaneUnavailable,
        WorkerDraining,
    )
}


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> TdistError:
    """Rebuild a typed error received in an error response."""
    cls = _BY_CODE.get(code, TdistError)
    err = cls.__new__(cls)
    TdistError.__init__(err, message, **(details or {}))
    return err


class DataPlaneError(TdistError):
    """A tensor could not be stored, pulled, referenced or released."""

    code = "DATA_PLANE"


class TensorNotFound(DataPlaneError):
    """The owner has no tensor with this id (never existed, released or expired)."""

    code = "TENSOR_NOT_FOUND"


class StoreFull(DataPlaneError):
    """The tensor store is at its byte limit; the tensor was not stored."""

    code = "STORE_FULL"


class PeerUnreachable(DataPlaneError):
    """The tensor's owner did not answer within the timeout (dead or unreachable)."""

    code = "PEER_UNREACHABLE"


_BY_CODE.update({cls.code: cls for cls in (DataPlaneError, TensorNotFound, StoreFull, PeerUnreachable)})


class TritonError(TdistError):
    """The Triton server beside a worker: not found, failed to start, crashed, refused a model, or failed a request."""

    code = "TRITON"


class TritonModelNotReady(TritonError):
    """The Triton server does not have the model loaded (never loaded, unloaded, or failed to load)."""

    code = "TRITON_MODEL_NOT_READY"


_BY_CODE.update({cls.code: cls for cls in (TritonError, TritonModelNotReady)})
