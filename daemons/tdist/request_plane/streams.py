"""Creating the namespace's work-queue stream and its consumers (idempotent).

Only deployers call ``ensure_stream`` (the agent, a worker from its configuration,
``python -m tdist.request_plane.deploy``): a caller never creates the stream with
defaults of its own. Storage and replicas cannot change in place: a stream that
exists with others than configured is used as it is, and the difference reported
(``StreamMismatch`` in the log, and returned); its limits are brought to the
configuration.
"""

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

from tdist import names
from tdist.config import RequestPlaneConfig
from tdist.logs import get_logger

log = get_logger("tdist.streams")

# Durable consumers of operators nobody pulls from for this long are removed.
SHARED_CONSUMER_IDLE = 7 * 24 * 3600.0
# A worker's directed consumer outlives its worker by this long.
DIRECTED_CONSUMER_IDLE = 300.0
MAX_ACK_PENDING = 100_000


def stream_config(rp: RequestPlaneConfig, max_payload: int) -> StreamConfig:
    return StreamConfig(
        name=names.stream_name(rp.namespace),
        description=f"tdist requests of namespace {rp.namespace}",
        subjects=names.stream_subjects(rp.namespace),
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE if rp.storage == "file" else StorageType.MEMORY,
        num_replicas=rp.replicas,
        max_age=rp.max_age,
        max_msgs=rp.max_msgs,
        max_bytes=rp.max_bytes,
        max_msg_size=max_payload,
        discard=DiscardPolicy.NEW,
    )


async def ensure_stream(js: JetStreamContext, rp: RequestPlaneConfig, max_payload: int) -> list[str]:
    """Create the stream if it is missing, else bring its limits to this configuration.

    Returns the differences kept (storage, replicas), each also logged."""
    cfg = stream_config(rp, max_payload)
    try:
        info = await js.stream_info(cfg.name)  # type: ignore[arg-type]
    except NotFoundError:
        try:
            await js.add_stream(cfg)
            log.info("stream_created", stream=cfg.name, storage=rp.storage, replicas=rp.replicas)
            return []
        except BadRequestError:  # created meanwhile by another process
            info = await js.stream_info(cfg.name)  # type: ignore[arg-type]
    have = info.config
    kept = []
    have_storage = str(getattr(have.storage, "value", have.storage) or "file")
    if have_storage != rp.storage:
        kept.append(f"storage is {have_storage}, configured {rp.storage}")
    if (have.num_replicas or 1) != rp.replicas:
        kept.append(f"replicas is {have.num_replicas or 1}, configured {rp.replicas}")
    if kept:
        log.warning("stream_mismatch", stream=cfg.name, differences=kept,
                    fix="delete the stream while no request is queued, or change the configuration")
    cfg.storage, cfg.num_replicas = have.storage, have.num_replicas
    if (have.max_age, have.max_msgs, have.max_bytes, have.max_msg_size) != (
        cfg.max_age, cfg.max_msgs, cfg.max_bytes, cfg.max_msg_size
    ):
        await js.update_stream(cfg)
    return kept


def _work_consumer(rp: RequestPlaneConfig, name: str, filter_subject: str, *, max_waiting: int, idle: float
                   ) -> ConsumerConfig:
    """A durable pull consumer with the namespace's delivery rules (ack wait, tries)."""
    return ConsumerConfig(
        durable_name=name,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=rp.ack_wait,
        max_deliver=rp.max_deliver,
        max_ack_pending=MAX_ACK_PENDING,
        max_waiting=max_waiting,
        inactive_threshold=idle,
    )


def shared_consumer_config(rp: RequestPlaneConfig, operator: str, version: int) -> ConsumerConfig:
    return _work_consumer(
        rp,
        names.shared_consumer(operator, version),
        names.request_subject(rp.namespace, operator, version),
        max_waiting=4096,
        idle=SHARED_CONSUMER_IDLE,
    )


def directed_consumer_config(rp: RequestPlaneConfig, worker_id: str) -> ConsumerConfig:
    return _work_consumer(
        rp,
        names.directed_consumer(worker_id),
        names.directed_filter(rp.namespace, worker_id),
        max_waiting=512,
        idle=DIRECTED_CONSUMER_IDLE,
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
