"""firmware_sim.faults: each fault does what it says when on, nothing when off, and is counted.

The checks use the receivers' own code where it exists: malformed payloads
go through ``contracts.messages.decode_device_uplink`` and serial chunks
through ``contracts.frames.FrameDecoder``, so "the gateway will see what we
counted" is tested, not assumed.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.catalog import DEVICE_TYPES
from contracts.errors import InputError, OutOfRangeError, SettingsError, TimestampWindowError
from contracts.frames import (
    FrameDecoder,
    Pms5003Frame,
    Sds011Frame,
    encode_pms5003,
    encode_sds011,
)
from contracts.ids import DEFAULT_MAX_FUTURE_MS
from contracts.messages import (
    DEVICE_PAYLOAD_MAX_BYTES,
    DeviceUplink,
    decode_device_uplink,
    encode_device_uplink,
)
from firmware_sim import faults
from firmware_sim.faults import (
    EXPECTED_ERRORS,
    MALFORMED_KINDS,
    Emission,
    FaultInjector,
    FaultPlan,
)
from firmware_sim.fleet import parse_fleet_description
from firmware_sim.models import AirQualityModel, ConferenceEndpointModel, DeviceModel, KioskModel

HANOI = dt.timezone(dt.timedelta(hours=7))
START_MS = int(dt.datetime(2025, 1, 6, 8, tzinfo=HANOI).timestamp() * 1000)
# "Always": an episode starts at the first tick (p = 1 - exp(-1e6 / 3600)).
ALWAYS_PER_H = 1e6


def model_for(device_type: str = "air_quality", seed: int = 1) -> DeviceModel:
    if device_type == "kiosk":
        return KioskModel(device_id="kiosk-test-01", seed=seed)
    if device_type == "conference_endpoint":
        return ConferenceEndpointModel(device_id="conf-test-01", seed=seed)
    return AirQualityModel(device_id="aq-test-01", seed=seed)


def run(
    plan: FaultPlan, ticks: int = 60, device_type: str = "air_quality", **kw: Any
) -> tuple[FaultInjector, list[Emission]]:
    injector = FaultInjector(model_for(device_type), plan, **kw)
    emitted: list[Emission] = []
    for i in range(ticks):
        emitted.extend(injector.emit(START_MS + i * 1000))
    return injector, emitted


def plain(ticks: int = 60, device_type: str = "air_quality") -> list[DeviceUplink]:
    model = model_for(device_type)
    return [model.make_uplink(START_MS + i * 1000) for i in range(ticks)]


def decode(emission: Emission, device_type: str = "air_quality") -> DeviceUplink:
    assert emission.payload is not None
    return decode_device_uplink(emission.payload, device_type=device_type, now_ms=emission.at_ms)


# --- off means off ----------------------------------------------------------------------


@pytest.mark.parametrize("device_type", ["air_quality", "kiosk", "conference_endpoint"])
def test_default_plan_changes_nothing(device_type: str) -> None:
    injector, emitted = run(FaultPlan(), device_type=device_type)
    expected = plain(device_type=device_type)
    assert [e.uplink for e in emitted] == expected
    assert [e.payload for e in emitted] == [encode_device_uplink(u) for u in expected]
    assert [e.at_ms for e in emitted] == [u.ts_ms for u in expected]
    assert all(e.faults == () and e.malformed is None for e in emitted)
    c = injector.counters
    assert (c.ticks, c.messages, c.sent) == (60, 60, 60)
    assert c == faults.FaultCounters(ticks=60, messages=60, sent=60)


def test_faults_use_their_own_rng_so_signals_do_not_shift() -> None:
    # Spikes draw from the fault stream: the untouched metrics of every
    # message equal the plain model's.
    _, emitted = run(FaultPlan(spike_probability=0.5))
    for emission, expected in zip(emitted, plain(), strict=True):
        same = {k for k, v in emission.uplink.metrics.items() if expected.metrics[k] == v}
        assert len(same) >= len(expected.metrics) - 1


# --- stuck ----------------------------------------------------------------------------


def test_stuck_value_freezes_one_metric() -> None:
    plan = FaultPlan(stuck_per_h=ALWAYS_PER_H, stuck_duration_s=30.0)
    injector, emitted = run(plan, ticks=31)
    labels = [e.faults for e in emitted]
    stuck = {label.split(":")[1] for ls in labels for label in ls if label.startswith("stuck:")}
    assert len(stuck) == 1
    (name,) = stuck
    values = [e.uplink.metrics[name] for e in emitted[:30]]
    assert len(set(values)) == 1
    assert values[0] == plain(1)[0].metrics[name]  # frozen at the value it had
    assert len({u.metrics[name] for u in plain(30)}) > 10  # it would have moved
    c = injector.counters
    assert c.stuck_episodes == 2  # the second starts at the last tick
    assert (
        c.stuck_samples == 29 == sum(1 for ls in labels if any(x.startswith("stuck") for x in ls))
    )
    # The episode ends after 30 s: the 31st tick starts a new one (rate is "always").
    assert emitted[30].uplink.metrics[name] == plain(31)[30].metrics[name]


# --- spikes ---------------------------------------------------------------------------


def test_out_of_range_spikes_are_rejected_by_the_decoder() -> None:
    plan = FaultPlan(spike_probability=1.0, spike_out_of_range_share=1.0)
    injector, emitted = run(plan)
    for emission, expected in zip(emitted, plain(), strict=True):
        changed = [k for k, v in emission.uplink.metrics.items() if expected.metrics[k] != v]
        assert len(changed) == 1
        (label,) = emission.faults
        assert label == f"spike_out_of_range:{changed[0]}"
        with pytest.raises(OutOfRangeError):
            decode(emission)
    assert injector.counters.spikes == injector.counters.spikes_out_of_range == 60


def test_in_range_spikes_are_outliers_the_decoder_accepts() -> None:
    plan = FaultPlan(spike_probability=1.0, spike_out_of_range_share=0.0)
    injector, emitted = run(plan, device_type="air_quality")
    metrics = {m.name: m for m in DEVICE_TYPES["air_quality"].metrics}
    for emission in emitted:
        decoded = decode(emission)  # accepted
        (label,) = emission.faults
        kind, name = label.split(":")
        assert kind == "spike"
        metric = metrics[name]
        assert decoded.metrics[name] >= metric.min + 0.5 * (metric.max - metric.min)
    assert injector.counters.spikes == 60
    assert injector.counters.spikes_out_of_range == 0


def test_spike_probability_is_respected() -> None:
    injector, _ = run(FaultPlan(spike_probability=0.1), ticks=2000)
    assert 140 <= injector.counters.spikes <= 260


# --- dropout --------------------------------------------------------------------------


def test_dropout_skips_messages_but_not_seq() -> None:
    plan = FaultPlan(dropout_per_h=20.0, dropout_duration_s=20.0)
    injector, emitted = run(plan, ticks=3600)
    seqs = [e.uplink.seq for e in emitted]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(seqs)) + seqs[0]
    gaps += injector.counters.messages - 1 - seqs[-1]  # dropped at the end
    c = injector.counters
    assert c.dropout_episodes >= 5
    assert c.dropped == gaps == c.messages - c.sent
    assert c.dropped >= 20 * c.dropout_episodes - 20  # each lasts ~20 ticks


# --- reboot ---------------------------------------------------------------------------


def test_reboot_resets_seq_and_changes_boot_id() -> None:
    injector, emitted = run(FaultPlan(reboot_per_h=360.0), ticks=600, device_type="kiosk")
    boots = [emitted[0].uplink.boot]
    for before, after in itertools.pairwise(emitted):
        if after.uplink.boot != before.uplink.boot:
            assert after.uplink.seq == 0
            assert "reboot" in after.faults
            assert after.uplink.metrics["uptime"] == 0
            boots.append(after.uplink.boot)
        else:
            assert after.uplink.seq == before.uplink.seq + 1
    assert injector.counters.reboots == len(boots) - 1 >= 20
    assert len(set(boots)) == len(boots)


# --- clock skew -----------------------------------------------------------------------


def test_constant_offset_and_drift() -> None:
    plan = FaultPlan(clock_offset_ms=1500, clock_drift_ppm=100.0)
    injector, emitted = run(plan, ticks=100)
    offsets = [e.uplink.ts_ms - e.at_ms for e in emitted]
    assert offsets[0] == 1500
    # 100 ppm of 99 s is 9.9 ms.
    assert offsets[-1] == 1500 + round(99_000 * 100e-6)
    assert injector.counters.skewed == 100
    assert injector.counters.skewed_beyond_window == 0
    assert all(decode(e).ts_ms == e.uplink.ts_ms for e in emitted)


def test_clock_jumps_sometimes_land_beyond_the_future_window() -> None:
    plan = FaultPlan(clock_jump_per_h=60.0, clock_jump_duration_s=120.0)
    injector, emitted = run(plan, ticks=7200)
    c = injector.counters
    assert c.clock_jumps >= 30
    beyond = [e for e in emitted if "skew_beyond_window" in e.faults]
    assert len(beyond) == c.skewed_beyond_window > 0
    for emission in emitted:
        offset = emission.uplink.ts_ms - emission.at_ms
        assert abs(offset) <= plan.clock_jump_max_ms
        if offset > DEFAULT_MAX_FUTURE_MS:
            assert emission in beyond
            with pytest.raises(TimestampWindowError):
                decode(emission)
        else:
            decode(emission)
    assert c.skewed == sum(1 for e in emitted if e.uplink.ts_ms != e.at_ms)


# --- malformed payloads -------------------------------------------------------------------


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize("device_type", ["air_quality", "kiosk", "conference_endpoint"])
def test_malformed_payload_fails_decoding_with_the_expected_error(
    kind: str, device_type: str
) -> None:
    plan = FaultPlan(malformed_probability=1.0, malformed_kinds=(kind,))  # type: ignore[arg-type]
    injector, emitted = run(plan, ticks=40, device_type=device_type)
    for emission in emitted:
        assert emission.malformed == kind
        assert emission.faults == (f"malformed:{kind}",)
        with pytest.raises(EXPECTED_ERRORS[emission.malformed]) as info:
            decode(emission, device_type)
        assert type(info.value) is EXPECTED_ERRORS[emission.malformed]
    assert injector.counters.malformed == {kind: 40}
    assert injector.counters.malformed_total == 40


def test_malformed_payload_shapes() -> None:
    rng = np.random.default_rng(0)
    uplink = plain(1)[0]
    assert b"NaN" in faults.malformed_payload(uplink, "nan_token", rng)
    assert len(faults.malformed_payload(uplink, "oversized", rng)) > DEVICE_PAYLOAD_MAX_BYTES
    assert faults.UNKNOWN_METRIC_NAME.encode() in faults.malformed_payload(
        uplink, "unknown_metric", rng
    )
    cut = faults.malformed_payload(uplink, "invalid_json", rng)
    assert encode_device_uplink(uplink).startswith(cut)
    assert len(cut) < len(encode_device_uplink(uplink))


def test_malformed_mix_is_counted_per_kind() -> None:
    injector, emitted = run(FaultPlan(malformed_probability=0.5), ticks=1000)
    counted = injector.counters.malformed
    assert set(counted) == set(MALFORMED_KINDS)
    seen: dict[str, int] = {}
    for emission in emitted:
        if emission.malformed is not None:
            seen[emission.malformed] = seen.get(emission.malformed, 0) + 1
        else:
            decode(emission)
    assert seen == counted
    assert 400 <= injector.counters.malformed_total <= 600


def test_serial_devices_get_no_payloads_and_no_malformation() -> None:
    plan = FaultPlan(malformed_probability=1.0, spike_probability=1.0)
    injector, emitted = run(plan, transport="serial")
    assert all(e.payload is None and e.malformed is None for e in emitted)
    assert injector.counters.malformed_total == 0
    assert injector.counters.spikes == 60


@pytest.mark.parametrize("protocol", ["pms5003", "sds011"])
def test_serial_devices_report_and_break_only_what_their_frame_carries(
    protocol: faults.SerialProtocol,
) -> None:
    plan = FaultPlan(spike_probability=1.0, stuck_per_h=ALWAYS_PER_H, stuck_duration_s=3600.0)
    _, emitted = run(plan, transport="serial", protocol=protocol)
    carried = set(faults.PROTOCOL_METRICS[protocol])
    for emission in emitted:
        assert set(emission.uplink.metrics) == carried
        names = {label.split(":")[1] for label in emission.faults}
        assert names <= carried
    assert any(label.startswith("stuck:") for label in emitted[-1].faults)


# --- flooding -------------------------------------------------------------------------


def test_flood_sends_n_times_the_normal_rate() -> None:
    plan = FaultPlan(flood_per_h=ALWAYS_PER_H, flood_factor=5, flood_duration_s=10.0)
    injector, emitted = run(plan, ticks=10, period_ms=1000)
    assert len(emitted) == 50
    assert [e.uplink.seq for e in emitted] == list(range(50))
    assert [e.at_ms for e in emitted[:5]] == [
        START_MS,
        START_MS + 200,
        START_MS + 400,
        START_MS + 600,
        START_MS + 800,
    ]
    assert all("flood" in e.faults for e in emitted)
    assert injector.counters.flood_episodes == 1
    assert injector.counters.flood_extra == 40


# --- serial line faults ---------------------------------------------------------------

PMS_FRAMES = [
    encode_pms5003(
        Pms5003Frame(
            pm1_cf1=i, pm25_cf1=2 * i, pm10_cf1=3 * i, pm1_atm=i, pm25_atm=2 * i, pm10_atm=3 * i,
            n0_3=900 + i, n0_5=300, n1_0=80, n2_5=9, n5_0=2, n10=1,
        )
    )
    for i in range(1, 41)
]  # fmt: skip
SDS_FRAMES = [
    encode_sds011(Sds011Frame(pm25=i * 1.5, pm10=i * 2.5, device_id=0xA160)) for i in range(1, 41)
]


def decode_chunks(chunks: list[bytes], protocol: faults.SerialProtocol) -> FrameDecoder:
    decoder = FrameDecoder(protocol)
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder


@pytest.mark.parametrize(("protocol", "frames"), [("pms5003", PMS_FRAMES), ("sds011", SDS_FRAMES)])
def test_serial_chunks_off_is_the_frames(
    protocol: faults.SerialProtocol, frames: list[bytes]
) -> None:
    result = faults.serial_chunks(
        frames, protocol=protocol, plan=FaultPlan(), rng=np.random.default_rng(0)
    )
    assert result.chunks == frames
    assert (result.garbage_runs, result.split_frames, result.corrupted_checksums) == (0, 0, 0)


@pytest.mark.parametrize(("protocol", "frames"), [("pms5003", PMS_FRAMES), ("sds011", SDS_FRAMES)])
def test_garbage_between_frames_is_what_the_decoder_skips(
    protocol: faults.SerialProtocol, frames: list[bytes]
) -> None:
    plan = FaultPlan(garbage_probability=0.5, garbage_max_bytes=40)
    result = faults.serial_chunks(
        frames, protocol=protocol, plan=plan, rng=np.random.default_rng(1)
    )
    assert 10 <= result.garbage_runs <= 30
    assert len(b"".join(result.chunks)) == len(b"".join(frames)) + result.garbage_bytes
    assert [c for c in result.chunks if c in frames] == frames
    decoder = decode_chunks(result.chunks, protocol)
    assert decoder.frames == len(frames)
    assert decoder.garbage_bytes == result.garbage_bytes
    assert decoder.checksum_errors == decoder.length_errors == 0


@pytest.mark.parametrize(("protocol", "frames"), [("pms5003", PMS_FRAMES), ("sds011", SDS_FRAMES)])
def test_split_frames_reassemble(protocol: faults.SerialProtocol, frames: list[bytes]) -> None:
    plan = FaultPlan(split_probability=1.0)
    result = faults.serial_chunks(
        frames, protocol=protocol, plan=plan, rng=np.random.default_rng(2)
    )
    assert result.split_frames == len(frames)
    assert b"".join(result.chunks) == b"".join(frames)
    assert 2 * len(frames) <= len(result.chunks) <= 3 * len(frames)
    assert all(0 < len(c) < len(frames[0]) for c in result.chunks)
    decoder = decode_chunks(result.chunks, protocol)
    assert decoder.frames == len(frames)
    assert decoder.garbage_bytes == 0


@pytest.mark.parametrize(("protocol", "frames"), [("pms5003", PMS_FRAMES), ("sds011", SDS_FRAMES)])
def test_corrupted_checksums_are_counted_by_the_decoder(
    protocol: faults.SerialProtocol, frames: list[bytes]
) -> None:
    plan = FaultPlan(checksum_error_probability=0.3)
    result = faults.serial_chunks(
        frames, protocol=protocol, plan=plan, rng=np.random.default_rng(3)
    )
    assert 5 <= result.corrupted_checksums <= 20
    changed = [(a, b) for a, b in zip(frames, result.chunks, strict=True) if a != b]
    assert len(changed) == result.corrupted_checksums
    where = faults.CHECKSUM_BYTE[protocol]
    for good, bad in changed:
        diff = [i for i in range(len(good)) if good[i] != bad[i]]
        assert diff == [where]
    decoder = decode_chunks(result.chunks, protocol)
    assert decoder.checksum_errors == result.corrupted_checksums
    assert decoder.frames == len(frames) - result.corrupted_checksums


def test_serial_chunks_refuses_a_foreign_frame() -> None:
    with pytest.raises(ValueError):
        faults.serial_chunks(
            SDS_FRAMES, protocol="pms5003", plan=FaultPlan(), rng=np.random.default_rng(0)
        )


def test_injector_counts_serial_faults() -> None:
    plan = FaultPlan(garbage_probability=1.0, split_probability=1.0, checksum_error_probability=1.0)
    injector = FaultInjector(model_for(), plan, transport="serial")
    chunks = injector.serial_write(PMS_FRAMES[:10], "pms5003")
    c = injector.counters
    assert (c.garbage_runs, c.split_frames, c.corrupted_checksums) == (10, 10, 10)
    assert len(b"".join(chunks)) == 320 + c.garbage_bytes


# --- the plan as configuration ------------------------------------------------------------


def test_plan_constraints_are_checked_when_loaded() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"spike_probability": 1.5}, FaultPlan)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"malformed_kinds": ["bogus"]}, FaultPlan)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"sneeze_probability": 0.1}, FaultPlan)
    with pytest.raises(SettingsError) as info:
        parse_fleet_description({"faults": {"dropout_per_h": -1}})
    assert info.value.key == "fleet.faults.dropout_per_h"


# --- bookkeeping under any mix ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    probabilities=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    rates_per_h=st.tuples(*[st.floats(0, 200)] * 5),
)
def test_counters_agree_with_emissions(
    seed: int,
    probabilities: tuple[float, float],
    rates_per_h: tuple[float, float, float, float, float],
) -> None:
    spike, malformed = probabilities
    dropout_per_h, reboot_per_h, stuck_per_h, flood_per_h, jump_per_h = rates_per_h
    plan = FaultPlan(
        spike_probability=spike,
        malformed_probability=malformed,
        dropout_per_h=dropout_per_h,
        dropout_duration_s=5.0,
        reboot_per_h=reboot_per_h,
        stuck_per_h=stuck_per_h,
        flood_per_h=flood_per_h,
        flood_factor=3,
        flood_duration_s=3.0,
        clock_jump_per_h=jump_per_h,
    )
    injector = FaultInjector(AirQualityModel(device_id="aq-test-01", seed=seed), plan)
    emitted = [e for i in range(120) for e in injector.emit(START_MS + i * 1000)]
    c = injector.counters
    labels = [label.split(":")[0] for e in emitted for label in e.faults]
    assert c.sent == len(emitted) == c.messages - c.dropped
    assert c.messages == c.ticks + c.flood_extra
    assert c.malformed_total == labels.count("malformed")
    assert c.spikes == labels.count("spike") + labels.count("spike_out_of_range")
    assert c.spikes_out_of_range == labels.count("spike_out_of_range")
    assert c.stuck_samples == labels.count("stuck")
    assert c.skewed == labels.count("skew")
    assert c.skewed_beyond_window == labels.count("skew_beyond_window")
    for emission in emitted:
        if emission.malformed is not None:
            with pytest.raises(EXPECTED_ERRORS[emission.malformed]):
                decode(emission)
            continue
        expected_error: type[InputError] | None = None
        if "skew_beyond_window" in emission.faults:
            expected_error = TimestampWindowError
        elif any(label.startswith("spike_out_of_range") for label in emission.faults):
            expected_error = OutOfRangeError
        if expected_error is None:
            assert all(math.isfinite(v) for v in decode(emission).metrics.values())
        else:
            with pytest.raises(expected_error):
                decode(emission)
