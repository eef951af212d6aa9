"""What one MQTT message becomes in ingest: a batch or state to store, or poison.

``prepare_item`` classifies a batch message (topic -> gateway,
``decode_batch``, the payload's gateway must be the topic's, rows built
against the ownership map by ``ingest.rows``) into a ``GoodBatch`` or a
``PoisonBatch``; ``prepare_state`` does the same for a gateway state message
(``GoodState`` or ``PoisonBatch``). ``refused`` and ``internal_error`` turn an
item into poison when the database refuses it or preparing it failed.

Pure: the time, the topic prefix and the ownership map come in as
arguments, items come out. Receiving messages, storing items, acking them
and logging are the service's and the writer's business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from contracts.errors import InputError, InvalidTopicError
from contracts.ids import parse_batch_id
from contracts.messages import Batch, decode_batch, decode_gateway_state, payload_digest
from contracts.topics import parse_gateway_topic
from ingest.rows import BatchRows, build_rows
from ingest.states import StateRow, state_row

GATEWAY_MISMATCH: Final = "gateway_mismatch"
INTERNAL_ERROR: Final = "internal_error"
POISON_KEY_PREFIX: Final = "poison:"


def poison_key(topic: str, payload: bytes) -> str:
    """The ingested_batches key of a poison message: a redelivery is stored once.

    Not the payload's batch id: a message that lies about its gateway must
    not be able to claim another gateway's batch id.
    """
    digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()
    return f"{POISON_KEY_PREFIX}{digest}"


@dataclass(frozen=True, slots=True)
class GoodBatch:
    """A decoded, checked batch with its rows built.

    The decoded Batch itself is not kept: as Python lists it is ~4x its wire
    size, and a worker holds up to three commit groups of these. The payload
    is kept (for a rebuild after an ownership change, and for the poison path
    if the database refuses the batch).
    """

    topic: str
    gateway_id: str
    batch_id: str
    sent_ms: int
    devices: tuple[str, ...]
    rows: BatchRows
    payload: bytes
    owners: Mapping[str, str | None]  # the ownership map the rows were built with
    digest: str  # payload_digest(payload): what the ack names the batch by

    @classmethod
    def build(
        cls,
        *,
        topic: str,
        batch: Batch,
        rows: BatchRows,
        payload: bytes,
        owners: Mapping[str, str | None],
    ) -> GoodBatch:
        return cls(
            topic=topic,
            gateway_id=batch.gateway_id,
            batch_id=batch.batch_id,
            sent_ms=batch.sent_ms,
            devices=tuple(batch.devices),
            rows=rows,
            payload=payload,
            owners=owners,
            digest=payload_digest(payload),
        )

    @property
    def record(self) -> tuple[str, str]:
        """Its ``ingested_batches`` key: the batch id and the payload's digest."""
        return self.batch_id, self.digest

    @property
    def key(self) -> str:
        return "\0".join(self.record)


@dataclass(frozen=True, slots=True)
class PoisonBatch:
    """A message refused as a whole: stored as one rejects row with its raw payload."""

    topic: str
    gateway_id: str | None  # from the topic, when it parses
    batch_id: str | None  # from the payload, when readable
    reason: str
    detail: str
    payload: bytes

    @property
    def digest(self) -> str:
        return payload_digest(self.payload)

    @property
    def record(self) -> tuple[str, str]:
        """Its ``ingested_batches`` key: the poison key and the payload's digest."""
        return poison_key(self.topic, self.payload), self.digest

    @property
    def key(self) -> str:
        return "\0".join(self.record)


WriteItem = GoodBatch | PoisonBatch


@dataclass(frozen=True, slots=True)
class GoodState:
    """A decoded, checked gateway state message and its row."""

    topic: str
    row: StateRow
    payload: bytes


StateItem = GoodState | PoisonBatch


class _BatchIdOnly(msgspec.Struct):
    batch_id: str


_BATCH_ID_DECODER: Final = msgspec.msgpack.Decoder(_BatchIdOnly)


def _readable_batch_id(payload: bytes, gateway_id: str) -> str | None:
    """The batch id of a refused batch, if readable and the sender's own (then it can be acked)."""
    try:
        value = _BATCH_ID_DECODER.decode(payload).batch_id
        owner, _, _ = parse_batch_id(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, InputError):
        return None
    return value if owner == gateway_id else None


def _topic_gateway(topic: str, prefix: str, kind: str) -> str:
    """The gateway id of ``[prefix/]hub/v1/gw/{id}/{kind}``; InputError for any other topic."""
    gateway_id, found = parse_gateway_topic(topic, prefix)
    if found != kind:
        raise InvalidTopicError(f"topic {topic!r} is not a {kind} topic")
    return gateway_id


def _poison_topic(topic: str, payload: bytes, exc: InputError) -> PoisonBatch:
    return PoisonBatch(
        topic=topic,
        gateway_id=None,
        batch_id=None,
        reason=exc.reason,
        detail=str(exc),
        payload=payload,
    )


def prepare_item(
    topic: str, payload: bytes, *, prefix: str, now_ms: int, owners: Mapping[str, str | None]
) -> WriteItem:
    """Classify one batch message: a GoodBatch with its rows, or a PoisonBatch with the reason.

    Poison: a topic that is not ``[prefix/]hub/v1/gw/{id}/batch``, a payload
    ``decode_batch`` refuses, or a batch whose gateway is not the topic's.
    """
    try:
        gateway_id = _topic_gateway(topic, prefix, "batch")
    except InputError as exc:
        return _poison_topic(topic, payload, exc)
    try:
        batch = decode_batch(payload, now_ms=now_ms)
    except InputError as exc:
        return PoisonBatch(
            topic=topic,
            gateway_id=gateway_id,
            batch_id=_readable_batch_id(payload, gateway_id),
            reason=exc.reason,
            detail=str(exc),
            payload=payload,
        )
    if batch.gateway_id != gateway_id:
        # Its batch id names the other gateway: not ours to ack, nor to record.
        return PoisonBatch(
            topic=topic,
            gateway_id=gateway_id,
            batch_id=None,
            reason=GATEWAY_MISMATCH,
            detail=f"batch {batch.batch_id!r} claims gateway {batch.gateway_id!r}, "
            f"published by {gateway_id!r}",
            payload=payload,
        )
    return GoodBatch.build(
        topic=topic,
        batch=batch,
        rows=build_rows(batch, owners=owners, now_ms=now_ms),
        payload=payload,
        owners=owners,
    )


def prepare_state(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    received_ms: int | None = None,
    retained: bool = False,
) -> StateItem:
    """Classify one state message: a GoodState with its row, or a PoisonBatch with the reason.

    A Will's row carries ``received_ms`` as its time (``ingest.states.state_row``).

    Poison: a topic that is not ``[prefix/]hub/v1/gw/{id}/state``, a payload
    ``decode_gateway_state`` refuses, or a state whose gateway is not the
    topic's.
    """
    try:
        gateway_id = _topic_gateway(topic, prefix, "state")
    except InputError as exc:
        return _poison_topic(topic, payload, exc)
    try:
        state = decode_gateway_state(payload)
    except InputError as exc:
        return PoisonBatch(
            topic=topic,
            gateway_id=gateway_id,
            batch_id=None,
            reason=exc.reason,
            detail=f"gateway state: {exc}",
            payload=payload,
        )
    if state.gateway_id != gateway_id:
        return PoisonBatch(
            topic=topic,
            gateway_id=gateway_id,
            batch_id=None,
            reason=GATEWAY_MISMATCH,
            detail=f"state of gateway {state.gateway_id!r} published by {gateway_id!r}",
            payload=payload,
        )
    return GoodState(
        topic=topic,
        row=state_row(state, received_ms=received_ms, retained=retained),
        payload=payload,
    )


def internal_error(topic: str, payload: bytes, exc: Exception) -> PoisonBatch:
    """The poison a message becomes when preparing it raised: a bug, kept with its payload."""
    return PoisonBatch(
        topic=topic,
        gateway_id=None,
        batch_id=None,
        reason=INTERNAL_ERROR,
        detail=f"{type(exc).__name__}: {exc}",
        payload=payload,
    )


def refused(item: GoodBatch | GoodState, exc: InputError) -> PoisonBatch:
    """The poison a good item becomes when the database refuses it (``exc``: why)."""
    if isinstance(item, GoodState):
        gateway_id, batch_id = item.row.gateway_id, None
    else:
        gateway_id, batch_id = item.gateway_id, item.batch_id
    return PoisonBatch(
        topic=item.topic,
        gateway_id=gateway_id,
        batch_id=batch_id,
        reason=exc.reason,
        detail=str(exc),
        payload=item.payload,
    )


def readings_of(item: WriteItem) -> int:
    """Rows ``item`` stores: what counts toward a commit group's ``max_rows_per_commit``."""
    return item.rows.readings if isinstance(item, GoodBatch) else 0
