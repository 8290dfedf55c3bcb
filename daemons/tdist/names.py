"""Names on the NATS side: subjects, stream, consumers and buckets (pure).

One work-queue stream per namespace holds every operator's requests:

* ``tdist.<ns>.req.<operator>.<version>`` for requests any worker may take,
* ``tdist.<ns>.req.<operator>.<version>.<worker_id>`` for directed requests.

All workers of an operator share one durable pull consumer filtered on the
first subject; each worker also has its own consumer on the second.
Cancellations are core NATS messages on ``tdist.<ns>.cancel.<request_id>``.

Pure naming, at the bottom of the imports: config (name checks), the request plane,
the registry and the agent all take their names from here.
"""

from __future__ import annotations

import re

from tdist.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(kind: str, value: str, key: str | None = None) -> str:
    """Names become subject tokens, consumer names and KV keys: keep them plain."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):  # fullmatch: "$" alone accepts a trailing "\n"
        raise ConfigError(f"{kind} {value!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", key=key or kind)
    return value


def stream_name(namespace: str) -> str:
    return f"TDIST_{namespace}"


def stream_subjects(namespace: str) -> list[str]:
    return [f"tdist.{namespace}.req.>"]


def request_subject(namespace: str, operator: str, version: int) -> str:
    return f"tdist.{namespace}.req.{operator}.{version}"


def directed_subject(namespace: str, operator: str, version: int, worker_id: str) -> str:
    return f"tdist.{namespace}.req.{operator}.{version}.{worker_id}"


def shared_consumer(operator: str, version: int) -> str:
    return f"{operator}_v{version}"


def directed_consumer(worker_id: str) -> str:
    return f"direct_{worker_id}"


def directed_filter(namespace: str, worker_id: str) -> str:
    """Every operator's directed requests to one worker: one consumer per worker."""
    return f"tdist.{namespace}.req.*.*.{worker_id}"


def cancel_subject(namespace: str, request_id: str) -> str:
    return f"tdist.{namespace}.cancel.{request_id}"


def cancel_wildcard(namespace: str) -> str:
    return f"tdist.{namespace}.cancel.*"


def max_deliveries_advisory(namespace: str) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name(namespace)}.*"


def workers_bucket(namespace: str) -> str:
    return f"tdist_{namespace}_workers"


def nodes_bucket(namespace: str) -> str:
    return f"tdist_{namespace}_nodes"
