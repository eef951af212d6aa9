"""check_batch's device checks against their row-by-row definition.

``check_batch`` checks a batch's device ids with one regex and one set, and
the one-type-per-device rule with set operations, looking entry by entry only
when something is wrong; the error (type and message) must be the one the
entry-by-entry loops below raise, for any batch.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import InconsistentBatchError, InputError
from contracts.ids import batch_id, check_id
from contracts.messages import Batch, ReadingBlock, check_batch

NOW_MS = 1_767_225_600_000
GW = "gw-1"
BOOT = "boot-1"


def reference(batch: Batch) -> None:
    """The device checks of check_batch, one entry at a time (its blocks are sound)."""
    seen: dict[str, int] = {}
    for index, device_id in enumerate(batch.devices):
        check_id(device_id, f"devices[{index}]")
        if device_id in seen:
            raise InconsistentBatchError(
                f"devices[{index}] {device_id!r} repeats devices[{seen[device_id]}]"
            )
        seen[device_id] = index
    type_of_device: dict[int, str] = {}
    for block_index, block in enumerate(batch.blocks):
        for device_index in set(block.device_index):
            other = type_of_device.setdefault(device_index, block.device_type)
            if other != block.device_type:
                raise InconsistentBatchError(
                    f"blocks[{block_index}]: device {batch.devices[device_index]!r} appears as"
                    f" {block.device_type!r} and as {other!r}"
                )


ids = st.one_of(
    st.sampled_from(["aq-1", "aq-2", "noise-1", "x", "a" * 64]),
    st.sampled_from(["", "A", "a" * 65, "-a", "a\nb", "a\n", "aq 1", "aq-1\n"]),
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True),
    st.text(max_size=6),
)


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    devices = draw(st.lists(ids, max_size=8))
    blocks = []
    if devices:
        for _ in range(draw(st.integers(0, 3))):
            rows = draw(st.integers(1, 6))
            index = draw(st.lists(st.integers(0, len(devices) - 1), min_size=rows, max_size=rows))
            blocks.append(
                ReadingBlock(
                    device_type=draw(st.sampled_from(["air_quality", "noise_meter"])),
                    device_index=index,
                    seq=list(range(rows)),
                    ts_ms=[NOW_MS] * rows,
                    recv_ms=[NOW_MS] * rows,
                    values={},
                )
            )
    return Batch(
        batch_id=batch_id(GW, BOOT, 1),
        gateway_id=GW,
        boot_id=BOOT,
        sent_ms=NOW_MS,
        devices=devices,
        blocks=blocks,
    )


def outcome(call: object) -> tuple[type, str] | None:
    try:
        call()  # type: ignore[operator]
    except InputError as exc:
        return type(exc), str(exc)
    return None


@given(batches())
def test_check_batch_refuses_devices_as_the_entry_by_entry_checks_do(batch):
    assert outcome(lambda: check_batch(batch, now_ms=NOW_MS)) == outcome(lambda: reference(batch))
