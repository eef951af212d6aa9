"""Which acks a committed group of items earns: per gateway, its batch ids and their digests.

``ack_id`` names what one committed item acks (if anything); ``build_acks``
gathers a group's ids per gateway, in order and without repeats, into
``Ack`` messages of at most ACK_MAX_IDS ids each.

Pure: the time comes in as an argument. Publishing the acks, and the MQTT
PUBACKs that follow them, are the service's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from contracts.messages import Ack
from ingest.prepare import GoodBatch, WriteItem

# An ack carries at most this many batch ids: 1,000 ids of at most 149
# characters and their 32-character digests (~190 KB of JSON) stay under
# contracts' 1 MiB limit for control messages.
ACK_MAX_IDS: Final = 1000


def ack_id(item: WriteItem) -> tuple[str, str, str] | None:
    """(gateway, batch id, payload digest) to put in an Ack once ``item`` is committed, if any.

    The digest is of the payload committed or refused, so the gateway drops
    its batch only if that is the payload it holds: a refused or spoofed
    message that reuses a held batch id acks nothing the gateway keeps.
    """
    if isinstance(item, GoodBatch):
        return item.gateway_id, item.batch_id, item.digest
    if item.gateway_id is not None and item.batch_id is not None:
        return item.gateway_id, item.batch_id, item.digest
    return None


def build_acks(items: Iterable[WriteItem], *, now_ms: int) -> list[tuple[str, Ack]]:
    """(gateway id, Ack) for each ack the committed ``items`` earn, gateways in first-seen order.

    Each gateway's (batch id, digest) pairs keep the items' order, each once,
    split into acks of at most ACK_MAX_IDS.
    """
    # gateway -> (batch id, digest), ordered, unique
    ids: dict[str, dict[tuple[str, str], None]] = {}
    for item in items:
        found = ack_id(item)
        if found is not None:
            ids.setdefault(found[0], {})[found[1], found[2]] = None
    acks: list[tuple[str, Ack]] = []
    for gateway_id, acked_ids in ids.items():
        listed = list(acked_ids)
        for start in range(0, len(listed), ACK_MAX_IDS):
            part = listed[start : start + ACK_MAX_IDS]
            ack = Ack(batch_ids=[b for b, _ in part], digests=[d for _, d in part], ts_ms=now_ms)
            acks.append((gateway_id, ack))
    return acks
