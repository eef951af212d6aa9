"""Whether a prepared batch must be built again because device ownership changed.

A batch's rows are built against the device -> gateway map of the moment
(``ingest.rows``: readings of a device the sending gateway does not own are
rejects with reason ``not_owned``). Before a group is committed, the map is
brought up to date for the devices found not owned (``suspect_devices``:
perhaps registered a moment ago), and a batch whose devices changed owner
in the meantime is prepared again from its payload (``rebuild_if_changed``).

Pure: the ownership map, the time and the topic prefix come in as
arguments. Loading the map from the database is the writer's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ingest.prepare import GoodBatch, WriteItem, prepare_item
from ingest.rows import NOT_OWNED


def suspect_devices(items: Iterable[WriteItem]) -> set[str]:
    """The devices whose readings in ``items`` were refused as not owned by their sender."""
    return {
        r.device_id
        for item in items
        if isinstance(item, GoodBatch)
        for r in item.rows.rejects
        if r.reason == NOT_OWNED
    }


def ownership_changed(item: GoodBatch, owners: Mapping[str, str | None]) -> bool:
    """Whether a device of ``item`` is owned by its gateway in ``owners`` but was not, or the
    other way round, in the map its rows were built with."""
    if item.owners is owners:
        return False
    gw = item.gateway_id
    return any((item.owners.get(d) == gw) != (owners.get(d) == gw) for d in item.devices)


def rebuild_if_changed(
    item: WriteItem, owners: Mapping[str, str | None], *, prefix: str, now_ms: int
) -> WriteItem:
    """``item`` prepared again against ``owners`` if its devices' ownership changed, else itself.

    Decoded again from the kept payload (a GoodBatch keeps no Batch).
    """
    if isinstance(item, GoodBatch) and ownership_changed(item, owners):
        return prepare_item(item.topic, item.payload, prefix=prefix, now_ms=now_ms, owners=owners)
    return item
