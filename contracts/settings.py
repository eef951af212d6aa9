"""Settings: a TOML file plus ``CITYHUB_*`` environment variables, into frozen structs.

Loaded once at start-up by a ``__main__``; nothing reads the environment after
that. Environment variables name a key with double underscores between the
levels (``CITYHUB_DATABASE__URL`` sets ``database.url``) and win over the
file. A missing file, an unknown key or a value of the wrong type raises
``SettingsError`` naming the key (or the variable). ``CITYHUB_CONFIG`` names
the file when the caller passes none.

Secrets (passwords, tokens, passwords inside URLs) are masked by
``describe_settings``, which is what may be logged or printed.

``load_settings`` is also where a process gets its device catalog: it reads
the operators' catalog files of ``catalog.paths`` (once, with the settings)
and installs the result with ``contracts.catalog.use_catalog``; a bad file
stops the start-up with a ``CatalogError`` naming the file, type and key.
``parse_settings`` stays pure and installs nothing.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from contracts.catalog import read_catalog, use_catalog
from contracts.errors import SettingsError

ENV_PREFIX = "CITYHUB_"
CONFIG_ENV = "CITYHUB_CONFIG"
# Where the services' own listeners bind unless a setting says otherwise.
LOOPBACK = "127.0.0.1"
# Fields that name a local address to bind, in whichever section declares one
# (each listener's host sits next to its port); check_bind_hosts checks them.
BIND_HOST_FIELDS = frozenset({"metrics_host", "http_host"})


class DatabaseSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # None: use the embedded default's private server (see `cityhub services`).
    url: str | None = None
    # Every table lives in this schema; tests give each test its own.
    schema: str = "cityhub"
    connect_timeout_s: float = 5.0
    # A file holding the password of database.url's user ("" = none, or in the
    # URL): read once by load_settings, which puts it into the URL.
    password_file: str = ""


class BrokerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # None: use the embedded default's private broker.
    host: str | None = None
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    # TLS: the CA that signed the broker's certificate ("" = the system's CAs),
    # and this client's certificate and key when the listener requires one.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # A file holding the password (its trailing newline dropped), read once by
    # load_settings into ``password``; "" = none (``password`` as given).
    password_file: str = ""


class LocalSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The embedded default: private servers under a state directory."""

    # "" means the platform default: /var/lib/cityhub for root, else
    # $XDG_STATE_HOME/cityhub (~/.local/state/cityhub).
    state_dir: str = ""
    # High, unregistered ports so the machine's own 5432/1883 stay untouched.
    pg_port: int = 55432
    mqtt_port: int = 51883
    # `cityhub up`'s private Alertmanager: its usual 9093, moved up like the others.
    alertmanager_port: int = 59093
    # Dev mode lets local clients connect to the private broker without a
    # password; off (the default), the broker requires the generated
    # credentials: the admin account for provisioning, service accounts for
    # the services (cityhub.localstack.mosquitto).
    dev_mode: bool = False
    # Directory holding postgres/initdb; "" finds the newest PostgreSQL >= 15.
    pg_bindir: str = ""
    mosquitto_bin: str = "mosquitto"
    # Debian's name for it (package prometheus-alertmanager); missing: `up` runs
    # without notifications.
    alertmanager_bin: str = "prometheus-alertmanager"
    # A TLS listener (client certificate required) on this port besides the
    # plain one; 0: none. Its CA, certificate and key come from `cityhub pki`.
    mqtt_tls_port: int = 0
    start_timeout_s: float = 60.0


class StorageSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    chunk_interval_hours: int = 24
    raw_retention_days: int = 90
    rollup_retention_days: int = 1825
    compress_after_days: int = 7


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One site gateway (`cityhub gateway run`); the central broker is ``[broker]``."""

    gateway_id: str = ""
    site_id: str = ""
    # The site broker the MQTT devices publish to; host None means the
    # embedded broker.
    site_broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    # The site broker keeps the devices' QoS 1 messages this long while the
    # gateway is away (restart, crash) and delivers them when it is back.
    site_session_expiry_s: int = 3600
    # Unacknowledged device messages the site broker may have in flight to the
    # gateway (MQTT v5 Receive Maximum). The gateway acknowledges a message
    # only once its reading is in the fsynced outbox, so this must cover the
    # readings of a few batches: 2,000 is four 500-row batches.
    site_receive_maximum: int = 2000
    # "" means {local.state_dir}/gateway-{gateway_id}/outbox.sqlite3.
    outbox_path: str = ""
    # 256 MiB of batches is about 2.5 M readings at ~100 bytes each: a day of
    # a large site at 30 readings/s while the uplink is down.
    outbox_max_bytes: int = 256 << 20
    # "refuse": when full, MQTT device messages wait unacknowledged at the
    # site broker until acks make room (serial readings are refused, counted),
    # the backlog is kept; "drop_oldest": the oldest batches make room (counted).
    outbox_full_policy: Literal["refuse", "drop_oldest"] = "refuse"
    # Caps on a batch, not timers: a batch is cut as soon as the readings
    # waiting on the site socket are handled (the next one forms while its
    # fsync runs; at most one every 5 ms), so at light load a reading waits
    # one fsync, and under load batches grow by themselves up to these. 500
    # rows (~47 KB) keep a batch message far below the 8 MiB limit; 200 ms
    # bounds a batch's age when readings never stop coming.
    batch_max_rows: int = 500
    batch_max_ms: int = 200
    # Unacked batches are resent unchanged after this long.
    ack_timeout_s: float = 15.0
    max_inflight_batches: int = 64
    # Token bucket per device: a sensor sends about 1 reading/s; 5/s with a
    # burst of 20 leaves room for a short reconnect's few readings. A backlog
    # (readings older than 10 s, buffered through an outage) is limited by
    # its own timestamps instead (gateway.ratelimit): readings spaced at the
    # rate pass however fast they arrive, as far back as device_backlog_max_s
    # (a day: what a sensor's flash typically holds at 1 reading/s; also the
    # most a device with made-up timestamps can push at once).
    device_rate_per_s: float = 5.0
    device_burst: float = 20.0
    device_backlog_max_s: Annotated[float, msgspec.Meta(ge=0)] = 86_400.0
    # A device silent this long is offline in the gateway's state reports.
    # 0: its type's offline_after_s from the catalog, the definition the
    # boards, `cityhub status` and the rules use; a positive value overrides
    # it for every device of this gateway.
    no_data_timeout_s: float = 0.0
    state_interval_s: float = 10.0
    # Prometheus /metrics on metrics_host:metrics_port; port 0 turns it off.
    # Loopback by default; "0.0.0.0" (or "::") lets a Prometheus server on
    # another host scrape it. An IP literal (check_bind_hosts says why).
    metrics_host: str = LOOPBACK
    metrics_port: int = 0
    # Prefix for every topic (tests give each test its own).
    topic_prefix: str = ""
    # HTTP devices POST readings to http_host:http_port (contracts.httpapi);
    # port 0 (the default) serves no endpoint. Loopback by default, like
    # /metrics: devices on the site network need "0.0.0.0" (or this
    # machine's address), a choice made together with TLS, since a bearer
    # token crosses the network in clear text without it. An IP literal.
    http_host: str = LOOPBACK
    http_port: int = 0
    # TLS for the endpoint: a PEM certificate (chain) and its key; both or neither.
    http_cert_file: str = ""
    http_key_file: str = ""


class IngestSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The central ingest workers (`cityhub ingest run`, `python -m ingest`).

    The broker is ``[broker]``, the database ``[database]``.
    """

    # Worker processes, each with its own MQTT client and database connection,
    # sharing the batch stream through the shared subscription. Two cores here:
    # one worker keeps the database backend busy about half the time (bench/).
    workers: int = 1
    # A group is committed as soon as no batch waits and the previous commit
    # is done; batches that arrive during a commit form the next group, up
    # to these caps. 64 gateway batches of 500 rows (32k rows) commit in
    # ~0.2 s at the ~150k rows/s of staged COPY + INSERT (bench/RESULTS.md):
    # large enough to amortise the transaction, small enough to ack within a
    # second.
    max_batches_per_commit: int = 64
    max_rows_per_commit: int = 32_000
    # A cap, not a timer: how long the first batch of a group may wait for a
    # busy committer (a long commit, a database outage) before its group is
    # closed and waits, prepared, for the next commit. Batches already
    # waiting join a group regardless. 100 ms keeps the end-to-end ack well
    # under the gateway's 15 s resend timeout.
    max_delay_ms: int = 100
    # Batch messages received and waiting for the collector; also sent as the
    # MQTT v5 Receive Maximum. It bounds the worker's memory together with the
    # three commit groups in its pipeline (256 + 3 x 64 messages of ~47 KB for
    # 500-row batches: ~21 MB of payloads; the 8 MiB message limit makes
    # ~3.5 GiB the theoretical worst case). It must exceed
    # max_batches_per_commit so the broker keeps sending while a commit runs.
    queue_max_messages: int = 256
    # The device -> gateway ownership map is reloaded this often; an unknown
    # device triggers a lookup of just that device at once.
    ownership_refresh_s: float = 30.0
    # A database call that takes longer is cut (the connection is shut down)
    # and retried: a hung server or network must not hold acks forever. A
    # full group commits in well under a second; 30 s covers checkpoints.
    commit_timeout_s: float = 30.0
    # Backoff between database retries while it is down: full jitter, doubling
    # from the minimum up to the maximum.
    retry_min_s: float = 0.5
    retry_max_s: float = 15.0
    # A row per worker in {schema}.ingest_stats this often (Grafana's fleet
    # board plots them); 0 turns the rows off.
    stats_interval_s: float = 10.0
    # Processed batch ids are kept this long to recognise resends. Gateways
    # resend within their ack timeout (15 s) or after a reconnect; a resend
    # older than this is still written only once (ON CONFLICT), just not
    # recognised as a replay. Two days cover a weekend outage of a worker.
    ingested_retention_h: float = 48.0
    # Prometheus /metrics on metrics_host:metrics_port + worker index; port 0:
    # off. Host as for the gateway: loopback unless set to "0.0.0.0" or "::".
    metrics_host: str = LOOPBACK
    metrics_port: int = 0
    # Prefix for every topic (tests give each test its own).
    topic_prefix: str = ""
    # The MQTT v5 shared subscription group ($share/{share_group}/...).
    share_group: str = "ingest"
    # Commands to devices: the dispatcher (worker 0) looks for queued commands
    # this often besides being woken by NOTIFY, and sends a command again to
    # its gateway when no 'sent' report came this long after the last send.
    # A lost notification or message costs at most this; 5 s is well under an
    # operator's patience and one small indexed query per period.
    command_resend_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0


class NotifySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the alerts job sends alert changes: Prometheus Alertmanager's v2 API."""

    # Alertmanager's base URL (http://127.0.0.1:9093); "" turns notifications off.
    alertmanager_url: str = ""
    # Firing alerts are posted again this often with endsAt 4 intervals ahead,
    # as Prometheus does (its resend delay is 1 min): an Alertmanager that
    # restarted without its storage has them back within a minute, and one
    # that hears nothing for 4 min (the job gone) lets them end by themselves.
    resend_s: float = 60.0
    # Alertmanager answers a post in milliseconds; 2 s (a fifth of the 10 s
    # evaluation interval) bounds what a hung one costs the notifier.
    timeout_s: float = 2.0
    # A cleared alert is posted as resolved with every resend for this long,
    # so an Alertmanager that was down at the clear still learns it: 15 min
    # covers a restart or an upgrade, and 15 resends stay a small post.
    resolved_for_s: float = 900.0
    # Backoff between posts while Alertmanager is unavailable (evaluation
    # goes on): from 1 s, doubling up to one resend interval.
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    # The boards as people reach them; notifications link to a device's board.
    boards_url: str = "http://127.0.0.1:3000"
    # An acknowledgement silences its alert in Alertmanager for at most this
    # long (the job expires the silence sooner, at the clear). A day covers a
    # shift and its handover; bounded, so an alert acknowledged and then
    # forgotten notifies again as a reminder, and a silence the job could not
    # expire (the job gone) does not hide a recurrence for ever.
    silence_s: float = 86400.0


class AlertsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The alerts job (`cityhub alerts run`, `python -m alerts`): rules, AQI, alert lifecycle.

    The database is ``[database]``.
    """

    # Evaluation times are multiples of this (UTC): a re-run at the same time
    # finds its transitions already stored.
    interval_s: float = 10.0
    # Readings reach the database ~0.3-1 s after they are taken (gateway
    # batching 200 ms, ingest grouping 100 ms, the commit): an evaluation time
    # is used only this long after it has passed.
    evaluation_delay_s: float = 2.0
    # Extra rule files: a TOML file, or a directory whose *.toml files are all
    # read. "" means none; the shipped rules are read unless turned off.
    rules_path: str = ""
    include_default_rules: bool = True
    # The windows are sized for devices reporting this often: a device type's
    # width is its rules' longest lookback over this period, plus one sample
    # (the longest shipped lookback, 2 h, is 722 samples at 10 s). A device
    # reporting faster keeps its newest samples, which then span less time.
    sample_period_s: float = 10.0
    # Upper bound of any width: 1024 samples x 10k devices x (time + 1
    # metric) x 8 bytes is 160 MB.
    max_window_samples: int = 1024
    # After downtime, missed evaluation times are replayed (so alerts raised and
    # cleared meanwhile are recorded at their times) up to this far back; older
    # ones are skipped and evaluation resumes at the newest.
    max_catchup_s: float = 3600.0
    # Missed evaluation times replayed per cycle: bounds the rows fetched at
    # once (30 x 10 s x 10k devices at 1 reading/s = 3M rows).
    catchup_steps_per_cycle: int = 30
    # The device list (new, moved or revoked devices) is reloaded this often.
    devices_refresh_s: float = 60.0
    # Hourly and daily VN_AQI of air-quality monitors, in the same cycle.
    aqi: bool = True
    # A finished hour's AQI is computed at once; the hour in progress (and its
    # day) at evaluation times that are multiples of this. VN_AQI is hourly,
    # so a minute's delay changes nothing people see, and at 10 s cycles it
    # spares 5 cycles in 6 the AQI arithmetic of every monitor (bench/).
    aqi_interval_s: float = 60.0
    # Backoff between cycles while the database is unavailable.
    retry_min_s: float = 0.5
    retry_max_s: float = 15.0
    # Names the job's stored state (last evaluation time) and its advisory
    # lock: a second job with the same id waits as a standby.
    job_id: str = "alerts"
    # Prometheus /metrics on metrics_host:metrics_port; port 0 turns it off.
    metrics_host: str = LOOPBACK
    metrics_port: int = 0
    # Notifications through Alertmanager (off unless its URL is set).
    notify: NotifySettings = msgspec.field(default_factory=NotifySettings)
    # A cycle still running after this long has its database connection cut
    # and counts as failed (then retried): a server that stopped but whose
    # host still answers (TCP keepalives pass) would hold the cycle forever.
    # A cycle takes well under a second, a catch-up cycle of 30 steps over
    # 10k devices a few seconds (bench/RESULTS.md): 60 s is never a busy one.
    cycle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class ProvisioningSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The technicians' commands (`cityhub devices|gateways|pki|audit`).

    Gateway credentials live on the central broker (``[broker]``), device
    credentials on ``site_broker``; each needs an account allowed to use the
    broker's dynamic-security control API (host None: the embedded broker and
    its admin account).
    """

    site_broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    # Addresses written into bundles, as devices and gateways reach the brokers
    # (the control connection may use another); "" / 0: the control address.
    site_public_host: str = ""
    site_public_port: int = 0
    central_public_host: str = ""
    central_public_port: int = 0
    # TLS port of the central broker written into gateway bundles; 0: plain MQTT.
    central_tls_port: int = 0
    # "" means {local.state_dir}/bundles and {local.state_dir}/pki.
    bundle_dir: str = ""
    pki_dir: str = ""
    # The broker answers a control command within milliseconds; 10 s covers a
    # broker busy saving a large snapshot.
    control_timeout_s: float = 10.0
    # Prefix for every topic and ACL (tests give each test its own).
    topic_prefix: str = ""
    # Where HTTP devices reach their gateway, written into their bundles with
    # "/v1/devices/{device_id}/readings" appended; {gateway_id} is replaced by
    # the gateway's id (a host name on the site network, or write the address).
    gateway_http_url: str = "http://{gateway_id}:8470"
    # The broker's dynamic-security file (accounts, roles, password hashes),
    # which `cityhub backup` copies and `cityhub restore` puts back; "" means
    # the embedded broker's {local.state_dir}/mosquitto/security/dynamic-security.json.
    dynsec_file: str = ""


class CatalogSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Operators' device catalog files, read once at start-up on top of the shipped catalog."""

    # A TOML file or a directory whose *.toml files are all read (in name
    # order), or a list of them; "" means none (the shipped types only).
    paths: str | list[str] = ""

    @property
    def path_list(self) -> list[str]:
        """``paths`` as a list, without empty entries."""
        entries = [self.paths] if isinstance(self.paths, str) else self.paths
        return [entry for entry in entries if entry]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    local: LocalSettings = msgspec.field(default_factory=LocalSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    provisioning: ProvisioningSettings = msgspec.field(default_factory=ProvisioningSettings)
    alerts: AlertsSettings = msgspec.field(default_factory=AlertsSettings)
    catalog: CatalogSettings = msgspec.field(default_factory=CatalogSettings)
    # Who is acting, for audit records ("technician name").
    operator: str = ""
    # Long-running services log lifecycle events at INFO; commands for people stay quiet.
    log_level: str = "WARNING"
    # "text": lines for a person at a terminal; "json": one JSON object a line
    # (journald, a log shipper), with the ids a line names as their own fields.
    log_format: Literal["text", "json"] = "text"


_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _msgspec_key(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's 'Expected `int`, got `str` - at `$.a.b`' into ('a.b', problem)."""
    message = str(exc)
    match = _PATH_RE.search(message)
    path = match.group("path").lstrip(".") if match else ""
    problem = message[: match.start()] if match else message
    unknown = re.match(r"Object contains unknown field `(?P<field>[^`]+)`", problem)
    if unknown:
        field = unknown.group("field")
        return (f"{path}.{field}" if path else field), "unknown key"
    return path, problem


def _field_type(struct_type: type[msgspec.Struct], dotted: str) -> Any:
    current: Any = struct_type
    for part in dotted.split("."):
        if not (isinstance(current, type) and issubclass(current, msgspec.Struct)):
            raise KeyError(dotted)
        info = {f.name: f.type for f in msgspec.structs.fields(current)}
        if part not in info:
            raise KeyError(dotted)
        current = info[part]
    return current


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``CITYHUB_A__B=v`` variables into a nested dict, coerced to the field types."""
    overrides: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        try:
            field_type = _field_type(Settings, dotted)
        except KeyError:
            raise SettingsError(name, "no such setting") from None
        try:
            value = msgspec.convert(raw, field_type, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(name, str(exc)) from None
        node = overrides
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = msgspec.to_builtins(value)
    return overrides


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def parse_settings(document: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Build Settings from an already-parsed TOML document and an environment."""
    merged = _merge(dict(document), _env_overrides(environ))
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        key, problem = _msgspec_key(exc)
        raise SettingsError(key or "<root>", problem) from None
    check_bind_hosts(settings)
    return settings


def check_bind_hosts(settings: Settings) -> None:
    """Raise SettingsError naming the key unless every bind host is an IP literal.

    Host names are refused: a name resolves through DNS or /etc/hosts at
    start-up, may give several addresses (``localhost`` is 127.0.0.1 or ::1
    depending on the machine) of which the server would bind one, and fails
    only when the service starts, not when settings load. What a listener
    binds is an address of this machine's own interfaces, which the operator
    can write down: "0.0.0.0" / "::" for all of them, 127.0.0.1 for loopback.
    """

    def walk(node: msgspec.Struct, path: str) -> None:
        for name in node.__struct_fields__:
            value = getattr(node, name)
            key = f"{path}.{name}" if path else name
            if isinstance(value, msgspec.Struct):
                walk(value, key)
            elif name in BIND_HOST_FIELDS:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise SettingsError(
                        key,
                        f"{value!r} is not an IP address: use one of this machine's addresses, "
                        '"0.0.0.0" or "::" (all interfaces) or "127.0.0.1" (this host only)',
                    ) from None

    walk(settings, "")


def load_settings(
    path: Path | None, environ: Mapping[str, str], *, install_catalog: bool = True
) -> Settings:
    """Read the TOML file (``path``, else ``$CITYHUB_CONFIG``, else none) and the environment.

    Then read the catalog files of ``catalog.paths`` and install the catalog
    (module docstring); CatalogError when one of them is refused. A command
    that examines catalog files itself (``cityhub catalog``) passes
    ``install_catalog=False``.
    """
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError("config", f"file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"{path}: not valid TOML: {exc}") from None
    settings = read_broker_password_files(parse_settings(document, environ))
    if install_catalog:
        use_catalog(read_catalog(settings.catalog.path_list))
    return with_database_password(settings)


def default_state_dir(environ: Mapping[str, str], *, is_root: bool) -> Path:
    """Where the embedded default keeps its servers when ``local.state_dir`` is empty.

    Root uses /var/lib/cityhub: PostgreSQL refuses to run as root, so its data
    directory must be reachable by the ``postgres`` user, which /root is not.
    """
    if is_root:
        return Path("/var/lib/cityhub")
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "~")) / ".local/state")
    return Path(base).expanduser() / "cityhub"


_SECRET_KEY_RE = re.compile(r"(password|secret|token)$")
_URL_PASSWORD_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


# A password given as a parameter: libpq's key=value form (``host=a,b port=1,2
# password=x``, the value maybe in single quotes with backslash escapes) or a
# URL's query (``?password=x&...``).
_PARAM_PASSWORD_RE = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&#]+)")


def mask_secrets(text: str) -> str:
    """Replace the password part of any URL or libpq connection string in ``text`` with ***."""
    return _PARAM_PASSWORD_RE.sub(r"\g<head>***", _URL_PASSWORD_RE.sub(r"\g<head>***@", text))


def describe_settings(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets masked: safe to log or print."""

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, str) and node and _SECRET_KEY_RE.search(key):
            return "***"
        if isinstance(node, str):
            return mask_secrets(node)
        return node

    result: dict[str, Any] = walk(msgspec.to_builtins(settings))
    return result


def with_database_password(settings: Settings) -> Settings:
    """Settings whose database.url carries the password of ``database.password_file``.

    The password goes into the URL's user part, percent-encoded, where
    ``mask_secrets`` hides it and where libpq takes it for every host of a
    multi-host URL (``postgresql://u@h1:5432,h2:5432/db?...``). SettingsError
    naming the key when the file cannot be read, when there is no
    ``postgresql://`` URL to put it in, or when the URL has a password already.
    """
    database = settings.database
    if not database.password_file:
        return settings
    key = "database.password_file"
    password = read_password_file(database.password_file, key)
    url = database.url or ""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise SettingsError(key, "needs database.url as a postgresql:// URL to give it to")
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        raise SettingsError(key, "database.url has a password already: remove one of them")
    secret = urllib.parse.quote(password, safe="")
    rest = f"{userinfo}:{secret}@{hosts}{rest[len(authority) :]}"
    return msgspec.structs.replace(
        settings, database=msgspec.structs.replace(database, url=f"{scheme}://{rest}")
    )


def read_password_file(path: str, key: str) -> str:
    """A secret file's content without its trailing newline; SettingsError naming ``key``."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(key, f"cannot read {path!r}: {exc}") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise SettingsError(key, f"{path!r} is empty")
    return secret


def read_broker_password_files(settings: Settings) -> Settings:
    """Fill each broker's ``password`` from its ``password_file`` (read once, at start-up).

    A missing, unreadable or empty file is a SettingsError naming the key.
    """

    def resolved(broker: BrokerSettings, key: str) -> BrokerSettings:
        if not broker.password_file:
            return broker
        password = read_password_file(broker.password_file, f"{key}.password_file")
        return msgspec.structs.replace(broker, password=password)

    return msgspec.structs.replace(
        settings,
        broker=resolved(settings.broker, "broker"),
        gateway=msgspec.structs.replace(
            settings.gateway,
            site_broker=resolved(settings.gateway.site_broker, "gateway.site_broker"),
        ),
        provisioning=msgspec.structs.replace(
            settings.provisioning,
            site_broker=resolved(settings.provisioning.site_broker, "provisioning.site_broker"),
        ),
    )
