"""Fault schedules: data that says what to break, when, and for how long.

A schedule is a list of ``Fault`` (offset from the start, kind, target,
duration), made deterministically from a seed and a duration by
``make_schedule`` or read from TOML by ``parse_schedule``
(``schedule_toml`` writes one back), so any run can be repeated.

Kinds:

- ``kill_gateway``, ``kill_ingest_worker``, ``kill_broker``, ``kill_db``:
  SIGKILL to the process group; started again after ``duration_s``
  (ingest workers are restarted by their supervisor, ``duration_s`` is
  ignored);
- ``hang_gateway``, ``hang_ingest_worker``, ``hang_broker``, ``hang_db``:
  SIGSTOP for ``duration_s``, then SIGCONT;
- ``cut_uplink``: the gateway's link to the central broker carries nothing
  for ``duration_s`` (bytes are held, not lost, as TCP would);
- ``outbox_full``: the same cut on the gateway whose outbox is small, so it
  fills up (the runner gives every outbox_full target a small outbox; the
  generator puts them all on one gateway and plain cuts on the others).

The generator covers every kind at least once, then picks kinds at
random. The two long link faults run while the short ones go on elsewhere;
a broker kill or hang is never placed while a link is cut (the runner also
waits for the gateways to be connected and caught up before killing the
broker). Pure: no I/O, no clock.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, get_args

import msgspec

from contracts.errors import SettingsError
from contracts.wording import count_noun

FaultKind = Literal[
    "kill_gateway",
    "kill_ingest_worker",
    "kill_broker",
    "kill_db",
    "hang_gateway",
    "hang_ingest_worker",
    "hang_broker",
    "hang_db",
    "cut_uplink",
    "outbox_full",
]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)
LINK_FAULTS: Final = frozenset({"cut_uplink", "outbox_full"})
GATEWAY_FAULTS: Final = frozenset({"kill_gateway", "hang_gateway", *LINK_FAULTS})
WORKER_FAULTS: Final = frozenset({"kill_ingest_worker", "hang_ingest_worker"})
BROKER_FAULTS: Final = frozenset({"kill_broker", "hang_broker"})

# Seconds: how long a killed part stays down / a hang lasts (drawn in this
# range), the pause between two short faults, the quiet start and the end
# kept free of faults so the last restart settles before the drain.
DOWN_S: Final = (2.0, 8.0)
HANG_S: Final = (5.0, 15.0)
GAP_S: Final = (3.0, 8.0)
WARMUP_S: Final = 10.0
# A day of faults every 10 s; more is a mistake in the file, not a soak.
MAX_FAULTS: Final = 10_000
# A broker fault keeps this far from the end of a cut: readings a full outbox
# refused just before must not fall into the broker's crash window (its
# autosave interval, 10 s, plus 1 s), where they would be counted apart.
BROKER_AFTER_LINKS_S: Final = 15.0
COOLDOWN_S: Final = 15.0


class Fault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    at_s: float  # offset from the start of the run
    kind: FaultKind
    target: str = ""  # gateway id, or worker index for worker faults; empty otherwise
    duration_s: float = 0.0

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s


class Schedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seed: int = 0
    duration_s: float
    fault: list[Fault] = msgspec.field(default_factory=list)


def _pick_target(
    kind: FaultKind, rng: random.Random, gateways: Sequence[str], workers: int, busy: set[str]
) -> str:
    if kind in GATEWAY_FAULTS:
        free = [g for g in gateways if g not in busy] or list(gateways)
        return rng.choice(free)
    if kind in WORKER_FAULTS:
        return str(rng.randrange(workers))
    return ""


def make_schedule(
    *,
    seed: int,
    duration_s: float,
    gateways: Sequence[str],
    workers: int,
    cut_s: float = 60.0,
) -> Schedule:
    """A deterministic schedule for this seed, duration, gateways and worker count."""
    if not gateways:
        raise SettingsError("soak", "the fleet has no gateway to put faults on")
    rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not a secret
    kinds: list[FaultKind] = list(FAULT_KINDS)
    rng.shuffle(kinds)
    # The two link faults go first, side by side, on different gateways; the
    # broker's faults last, once the links are back.
    kinds.sort(key=lambda k: (k not in LINK_FAULTS) + (k in BROKER_FAULTS))
    # One gateway gets the small outbox and every outbox_full fault; a plain
    # cut goes to the others, so that it is never an outbox_full in disguise.
    small = rng.choice(list(gateways))
    others = [g for g in gateways if g != small] or [small]
    faults: list[Fault] = []
    t = WARMUP_S
    links_until = 0.0
    busy: set[str] = set()
    end = duration_s - COOLDOWN_S
    while True:
        kind = kinds.pop(0) if kinds else rng.choice(FAULT_KINDS)
        if kind in LINK_FAULTS:
            if t < links_until:
                continue  # one pair of cuts at a time
            if kind == "outbox_full":
                target = small
            else:
                target = _pick_target(kind, rng, others, workers, busy | {small})
            if t + cut_s > end:
                break
            faults.append(Fault(at_s=round(t, 1), kind=kind, target=target, duration_s=cut_s))
            busy.add(target)
            if not kinds or kinds[0] not in LINK_FAULTS:
                links_until = t + cut_s
                t += 1.0
            continue
        if t >= links_until:
            busy.clear()
        if kind in BROKER_FAULTS and t < links_until + BROKER_AFTER_LINKS_S:
            t = links_until + BROKER_AFTER_LINKS_S + rng.uniform(*GAP_S)
            busy.clear()
        low, high = HANG_S if kind.startswith("hang_") else DOWN_S
        duration = round(rng.uniform(low, high), 1)
        if t + duration > end:
            break
        target = _pick_target(kind, rng, gateways, workers, busy)
        faults.append(Fault(at_s=round(t, 1), kind=kind, target=target, duration_s=duration))
        t += duration + rng.uniform(*GAP_S)
    return Schedule(seed=seed, duration_s=duration_s, fault=faults)


def parse_schedule(
    document: Mapping[str, Any], *, gateways: Sequence[str], workers: int
) -> Schedule:
    """A schedule from TOML, checked against the fleet's gateways and the worker count.

    Faults may repeat or overlap: the runner applies those on the same part
    one after the other.
    """
    try:
        schedule = msgspec.convert(document, Schedule)
    except msgspec.ValidationError as exc:
        raise SettingsError("--schedule", str(exc)) from None
    if len(schedule.fault) > MAX_FAULTS:
        raise SettingsError(
            "--schedule",
            f"{count_noun(len(schedule.fault), 'fault', 'faults')};"
            f" at most {MAX_FAULTS} are allowed",
        )
    for i, fault in enumerate(schedule.fault):
        where = f"fault[{i}] ({fault.kind} at {fault.at_s} s)"
        if fault.at_s < 0 or fault.duration_s < 0 or fault.end_s > schedule.duration_s:
            raise SettingsError(
                "--schedule", f"{where}: must lie within 0..duration_s ({schedule.duration_s})"
            )
        if fault.kind in GATEWAY_FAULTS and fault.target not in gateways:
            raise SettingsError(
                "--schedule", f"{where}: target {fault.target!r} is not one of {sorted(gateways)}"
            )
        if fault.kind in WORKER_FAULTS and (
            not fault.target.isdigit() or int(fault.target) >= workers
        ):
            raise SettingsError(
                "--schedule", f"{where}: target must be a worker index below {workers}"
            )
    return schedule


def schedule_toml(schedule: Schedule) -> str:
    """The schedule as TOML that ``parse_schedule`` reads back."""
    lines = [f"seed = {schedule.seed}", f"duration_s = {schedule.duration_s!r}", ""]
    for fault in schedule.fault:
        lines += [
            "[[fault]]",
            f"at_s = {fault.at_s!r}",
            f'kind = "{fault.kind}"',
            f'target = "{fault.target}"',
            f"duration_s = {fault.duration_s!r}",
            "",
        ]
    return "\n".join(lines)
