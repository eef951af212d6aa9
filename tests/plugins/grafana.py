"""A schema filled the way production fills it, for the boards' SQL to run on.

``fill_schema`` migrates a schema, seeds the 30 Hanoi sites, registers a
simulated fleet (firmware_sim: every site's default devices, one gateway
per site) and plays ``hours`` of its readings, in accelerated time, through
the real path after the broker: gateway batch building
(``gateway.batching``), the batch codec, ingest's classification
(``ingest.prepare.prepare_item``) and its writer (``ingest.writer``), one
commit per simulated minute plus a stats row. Each gateway reports its
state every simulated minute through ingest's state path
(``ingest.prepare.prepare_state``, ``BatchWriter.write_states``). Then the hourly rollups are
refreshed (``cityhub.database.maintain``) and the alerts job
(``alerts.service.AlertsJob``, the shipped rules) replays every evaluation
time, which fills alerts, transitions and hourly/daily VN_AQI.

Faults make every board have something to show: spikes beyond the valid
range (rejects), a stuck PM sensor and a kiosk dropout (alerts), and one
site whose devices fall silent before the end (offline devices, no-data
alerts), whose gateway's death Will arrives when they stop, and one
gateway whose outbox backs up for a while and drains. Kiosks and camera
counters are sent commands (``_commands``), which succeed, fail or wait. Readings end at
``end_ms`` (the fixture passes the current minute), so "online in the last
five minutes" is meaningful.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources

import psycopg

from alerts.rules import load_rules
from alerts.service import AlertsJob
from cityhub import database
from contracts.commands import encode_command_reports
from contracts.messages import GatewayState, GatewayStatus, encode_batch, encode_gateway_state
from contracts.settings import AlertsSettings, DatabaseSettings, StorageSettings
from contracts.topics import batch_topic, command_report_topic, state_topic
from firmware_sim.fleet import FleetDescription, build_fleet, parse_sites
from gateway.batching import BatchBuilder
from ingest.prepare import GoodBatch, GoodState, prepare_item, prepare_state
from ingest.writer import BatchWriter, StatsRow

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
PERIOD_MS = 30_000  # each device reports every 30 s of simulated time
# The site whose devices stop reporting 40 minutes before the end.
SILENT_SITE = "hk-ward-hang-bac"
SILENT_FOR_MS = 40 * MINUTE_MS
# The gateway whose uplink is down from 90 to 60 minutes before the end: its
# outbox depth (reported in its states) grows a batch a minute, then drains.
BACKLOG_GATEWAY = "gw-hk-hall-quan"
BACKLOG_MS = (90 * MINUTE_MS, 60 * MINUTE_MS)
# The serial readings its full outbox refused, reported by every state after the cut.
BACKLOG_REFUSED_READINGS = 12


@dataclass
class FillReport:
    start_ms: int
    end_ms: int
    devices: int = 0
    readings: int = 0
    rejects: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def _sites():
    text = resources.files("cityhub").joinpath("data/hanoi_sites.toml").read_text("utf-8")
    return parse_sites(tomllib.loads(text))


def _fleet(seed: int):
    description = FleetDescription(
        seed=seed,
        period_ms=PERIOD_MS,
        overrides={
            # Spikes beyond the valid range: rejects at ingest.
            "aq-cg-aq-luu-quang-vu-01": {
                "spike_probability": 0.02,
                "spike_out_of_range_share": 1.0,
            },
            "cam-hk-hall-quan-01": {"spike_probability": 0.01, "spike_out_of_range_share": 1.0},
            # A PM sensor that freezes for an hour and a half: a flatline alert.
            "aq-hk-aq-hang-dau-01": {"stuck_per_h": 2.0, "stuck_duration_s": 5400.0},
            # A kiosk that drops out for twenty minutes at a time: no-data alerts.
            "kiosk-bd-hall-quan-01": {"dropout_per_h": 1.0, "dropout_duration_s": 1200.0},
        },
    )
    return build_fleet(description, _sites())


def fill_schema(
    conn: psycopg.Connection,
    url: str,
    schema: str,
    *,
    end_ms: int,
    hours: float = 5.0,
    seed: int = 7,
) -> FillReport:
    """Migrate and fill ``schema`` with ``hours`` of simulated data ending at ``end_ms``."""
    database.migrate(conn, schema=schema, storage=StorageSettings())
    database.seed_sites(conn, schema=schema, sites=database.load_hanoi_sites())
    specs = _fleet(seed)
    gateways = {spec.site_id: f"gw-{spec.site_id}" for spec in specs}
    database.register_fleet(
        conn,
        schema=schema,
        gateways=[(g, site) for site, g in gateways.items()],
        devices=[
            database.DeviceRecord(
                device_id=spec.device_id,
                device_type=spec.device_type,
                site_id=spec.site_id,
                gateway_id=gateways[spec.site_id],
                transport=spec.transport,
                protocol=spec.protocol,
                label=f"simulated {spec.device_type}",
            )
            for spec in specs
        ],
    )
    start_ms = end_ms - int(hours * HOUR_MS)
    report = FillReport(start_ms=start_ms, end_ms=end_ms, devices=len(specs))
    injectors = [(spec, spec.injector(period_ms=PERIOD_MS)) for spec in specs]
    builders = {
        g: BatchBuilder(gateway_id=g, boot_id="b1", max_rows=100_000, max_age_ms=MINUTE_MS)
        for g in gateways.values()
    }
    writer = BatchWriter(url=url, schema=schema, worker_id="w0")
    try:
        writer.refresh_owners()
        for window_start in range(start_ms, end_ms, MINUTE_MS):
            window_end = window_start + MINUTE_MS
            for spec, injector in injectors:
                silent = spec.site_id == SILENT_SITE and window_start >= end_ms - SILENT_FOR_MS
                offset = hash_offset(spec.device_id)
                for tick in range(window_start + offset, window_end, PERIOD_MS):
                    for emission in injector.emit(tick):
                        if silent:
                            continue
                        builders[gateways[spec.site_id]].add(
                            device_id=spec.device_id,
                            device_type=spec.device_type,
                            seq=emission.uplink.seq,
                            ts_ms=emission.uplink.ts_ms,
                            recv_ms=emission.at_ms + 150,
                            values=dict(emission.uplink.metrics),
                            boot=emission.uplink.boot,
                        )
            items = []
            for gateway_id, builder in builders.items():
                batch = builder.take(window_end)
                if batch is None:
                    continue
                items.append(
                    prepare_item(
                        batch_topic(gateway_id),
                        encode_batch(batch),
                        prefix="",
                        now_ms=window_end,
                        owners=writer.owners,
                    )
                )
            outcome = writer.commit(items)
            writer.write_states(
                _states(
                    gateways.values(), items, start_ms=start_ms, end_ms=end_ms, at_ms=window_end
                )
            )
            report.readings += outcome.readings
            report.rejects += sum(outcome.rejects.values())
            writer.write_stats(
                StatsRow(
                    worker_id="w0",
                    ts_ms=window_end,
                    interval_s=60.0,
                    readings=outcome.readings,
                    duplicates=outcome.duplicates,
                    batches=len(outcome.written),
                    replayed=len(outcome.replayed),
                    poison=0,
                    rejects=sum(outcome.rejects.values()),
                    commits=1,
                    commit_p50_ms=12.0,
                    commit_p95_ms=30.0,
                    lag_p95_ms=450.0,
                    queue_depth=len(items),
                )
            )
    finally:
        writer.close()
    end = datetime.fromtimestamp(end_ms / 1000, UTC)
    database.maintain(conn, schema=schema, now=end, lookback=timedelta(hours=hours + 1))
    _run_alerts(url, schema, start_ms=start_ms, end_ms=end_ms)
    _commands(conn, url, schema, specs, gateways, end_ms=end_ms)
    for table in (
        "alerts",
        "alert_transitions",
        "aqi_hourly",
        "aqi_daily",
        "rejects",
        "gateway_status",
        "gateway_status_history",
        "commands",
        "command_events",
    ):
        row = conn.execute(f"SELECT count(*) FROM {schema}.{table}").fetchone()
        report.counts[table] = int(row[0]) if row else 0
    return report


def _commands(conn, url, schema, specs, gateways, *, end_ms: int) -> None:
    """Commands to every kiosk and camera counter, asked as an operator does
    (``devices.commands``), then their gateways' reports stored through ingest's
    report path: most succeed, one fails with the device's words, one is still
    waiting. Asked "now", they are moved into the filled window, half an hour
    before its end."""
    from contracts.commands import CommandReports, make_report
    from devices.commands import CommandRegistry
    from ingest.commanding import prepare_reports
    from ingest.commandstore import CommandStore

    registry = CommandRegistry(conn, schema=schema)
    store = CommandStore(url=url, schema=schema, worker_id="w0")
    asked_ms = end_ms - 30 * MINUTE_MS
    try:
        targets = [s for s in specs if s.device_type in ("kiosk", "camera_counter")]
        for number, spec in enumerate(targets):
            name = "print_test_page" if spec.device_type == "kiosk" else "reset_count"
            row = registry.ask(spec.device_id, name, [], ttl_s=600, operator="fill")
            conn.execute(
                f"UPDATE {schema}.commands SET created_at = to_timestamp(%s / 1000.0), "
                "expires_at = to_timestamp(%s / 1000.0) + interval '10 minutes' "
                "WHERE command_id = %s",
                (asked_ms, asked_ms, row.command_id),
            )
            if number == 0:
                continue  # still waiting for its gateway
            final = "failed" if number == 1 else "succeeded"
            detail = "printer out of paper" if final == "failed" else "done"
            reports = [
                make_report(row.command_id, spec.device_id, state, asked_ms + 1000 * step)
                for step, state in enumerate(("sent", "delivered"), start=1)
            ]
            reports.append(
                make_report(row.command_id, spec.device_id, final, asked_ms + 3000, detail=detail)
            )
            gateway_id = gateways[spec.site_id]
            message = CommandReports(gateway_id=gateway_id, ts_ms=asked_ms + 3000, reports=reports)
            item = prepare_reports(
                command_report_topic(gateway_id), encode_command_reports(message), prefix=""
            )
            store.store_reports(item)
    finally:
        store.close()


def _outbox_depth(gateway_id: str, *, end_ms: int, at_ms: int) -> int:
    if gateway_id != BACKLOG_GATEWAY:
        return 0
    down_from, down_to = end_ms - BACKLOG_MS[0], end_ms - BACKLOG_MS[1]
    if at_ms <= down_from:
        return 0
    if at_ms <= down_to:
        return (at_ms - down_from) // MINUTE_MS
    # Draining at four times the rate it filled.
    return max(0, (down_to - down_from - 4 * (at_ms - down_to)) // MINUTE_MS)


def _states(gateway_ids, items, *, start_ms: int, end_ms: int, at_ms: int) -> list[GoodState]:
    """Each gateway's state at ``at_ms``, through ingest's state path; the silent one's Will."""
    goods = [i for i in items if isinstance(i, GoodBatch)]
    readings = {i.gateway_id: i.rows.readings for i in goods}
    devices = {i.gateway_id: len(set(i.devices)) for i in goods}
    silent_gateway = f"gw-{SILENT_SITE}"
    silent_from = end_ms - SILENT_FOR_MS
    states = []
    status: GatewayStatus
    for gateway_id in sorted(gateway_ids):
        if gateway_id == silent_gateway and at_ms > silent_from:
            if at_ms - MINUTE_MS > silent_from:
                continue
            # The Will, registered at connect time: it carries the start time.
            status, ts_ms = "offline", start_ms
        else:
            status, ts_ms = "online", at_ms
        depth = _outbox_depth(gateway_id, end_ms=end_ms, at_ms=at_ms)
        # The backlog gateway's outbox filled during the cut: serial readings refused.
        backlog_over = gateway_id == BACKLOG_GATEWAY and at_ms > end_ms - BACKLOG_MS[1]
        state = GatewayState(
            gateway_id=gateway_id,
            status=status,
            birth=1,
            boot_id="b1",
            version="1.0.0",
            outbox_depth=depth,
            ts_ms=ts_ms,
            outbox_readings=depth * 100,
            readings_per_s=readings.get(gateway_id, 0) / 60,
            received=0,
            accepted=0,
            devices_online=devices.get(gateway_id, 0),
            site_ready=status == "online",
            outbox_refused_readings=BACKLOG_REFUSED_READINGS if backlog_over else 0,
        )
        item = prepare_state(state_topic(gateway_id), encode_gateway_state(state), prefix="")
        assert isinstance(item, GoodState), item
        states.append(item)
    return states


def hash_offset(device_id: str) -> int:
    """A device's fixed phase within the reporting period (stable across runs)."""
    return sum(device_id.encode()) * 997 % PERIOD_MS


def _run_alerts(url: str, schema: str, *, start_ms: int, end_ms: int) -> None:
    """The alerts job: a first evaluation an hour in, then every later minute replayed."""
    span_s = (end_ms - start_ms) / 1000
    job = AlertsJob(
        settings=AlertsSettings(
            interval_s=60.0,
            evaluation_delay_s=0.0,
            sample_period_s=PERIOD_MS / 1000,
            max_catchup_s=span_s,
            catchup_steps_per_cycle=100_000,
            aqi_interval_s=60.0,
        ),
        database=DatabaseSettings(url=url, schema=schema),
        rules=load_rules(),
    )
    try:
        job.run_cycle(start_ms + HOUR_MS)
        job.run_cycle(end_ms)
    finally:
        job.close()
