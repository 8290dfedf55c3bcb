"""Names on the NATS side: subjects, stream, consumers and buckets (pure).

One work-queue stream per namespace holds every operator's requests:

* ``tdist.<ns>.req.<operator>.<version>`` for requests any worker may take,
* ``tdist.<ns>.req.<operator>.<version>.<worker_id>`` for directed requests.

All workers of an operator share one durable pull consumer filtered on the
first subject; each worker also has its own consumer on the second.
Cancellations are core NATS messages on ``tdist.<ns>.cancel.<request_id>``.

A caller's inbox ``<inbox>`` takes everything addressed to the caller (one subscription on
``<inbox>.>``): ``<inbox>.r.<request_id>`` a request's responses (its reply subject),
``<inbox>.b.<count>`` several requests' finals in one message (a batch of response frames),
``<inbox>.a.<key>`` the PubAck of a publish, ``<inbox>.s.<stream seq>`` the notice of a split
batch. A worker answers ``b`` and ``s`` only to reply subjects of the ``r`` form.

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


def reply_subject(inbox: str, request_id: str) -> str:
    return f"{inbox}.r.{request_id}"


def caller_inbox(reply_subject: str) -> str | None:
    """The caller inbox of a request's reply subject, or None if it is not of the
    ``<inbox>.r.<request_id>`` form (a hand-written caller's: answered on it alone)."""
    inbox, sep, request_id = reply_subject.rpartition(".r.")
    return inbox if sep and inbox and request_id and "." not in request_id else None


def finals_subject(inbox: str, count: int) -> str:
    return f"{inbox}.b.{count}"


def pub_ack_subject(inbox: str, key: str) -> str:
    return f"{inbox}.a.{key}"


def split_notice_subject(inbox: str, old_seq: int) -> str:
    return f"{inbox}.s.{old_seq}"


def workers_bucket(namespace: str) -> str:
    return f"tdist_{namespace}_workers"


def nodes_bucket(namespace: str) -> str:
    return f"tdist_{namespace}_nodes"
