"""Creating the namespace's work-queue stream and its consumers (idempotent)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from tdist.config import RequestPlaneConfig
from tdist.request_plane import subjects

# Durable consumers of operators nobody pulls from for this long are removed.
SHARED_CONSUMER_IDLE = 7 * 24 * 3600.0
# A worker's directed consumer outlives its worker by this long.
DIRECTED_CONSUMER_IDLE = 300.0
MAX_ACK_PENDING = 100_000


def stream_config(rp: RequestPlaneConfig, max_payload: int) -> StreamConfig:
    return StreamConfig(
        name=subjects.stream_name(rp.namespace),
        description=f"tdist requests of namespace {rp.namespace}",
        subjects=subjects.stream_subjects(rp.namespace),
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE if rp.storage == "file" else StorageType.MEMORY,
        num_replicas=rp.replicas,
        max_age=rp.max_age,
        max_msgs=rp.max_msgs,
        max_bytes=rp.max_bytes,
        max_msg_size=max_payload,
        discard=DiscardPolicy.NEW,
    )


async def ensure_stream(js: JetStreamContext, rp: RequestPlaneConfig, max_payload: int) -> None:
    """Create the stream, or bring an existing one to this configuration."""
    cfg = stream_config(rp, max_payload)
    try:
        await js.add_stream(cfg)
    except BadRequestError:
        await js.update_stream(cfg)


def shared_consumer_config(rp: RequestPlaneConfig, operator: str, version: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.shared_consumer(operator, version),
        filter_subject=subjects.request_subject(rp.namespace, operator, version),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=rp.ack_wait,
        max_deliver=rp.max_deliver,
        max_ack_pending=MAX_ACK_PENDING,
        max_waiting=4096,
        inactive_threshold=SHARED_CONSUMER_IDLE,
    )


def directed_consumer_config(rp: RequestPlaneConfig, worker_id: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.directed_consumer(worker_id),
        filter_subject=subjects.directed_filter(rp.namespace, worker_id),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=rp.ack_wait,
        max_deliver=rp.max_deliver,
        max_ack_pending=MAX_ACK_PENDING,
        max_waiting=512,
        inactive_threshold=DIRECTED_CONSUMER_IDLE,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create or update a durable consumer (the same call does both on 2.10+ servers)."""
    await js.add_consumer(stream, cfg)


async def consumer_exists(js: JetStreamContext, stream: str, name: str) -> bool:
    try:
        await js.consumer_info(stream, name)
        return True
    except NotFoundError:
        return False
