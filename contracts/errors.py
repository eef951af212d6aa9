"""The cityhub error tree.

Every error the project raises on purpose derives from ``HubError``. Adapters
translate library errors (psycopg, paho, pyserial, sqlite3, OS errors) into
the most specific type here, once, with ``raise ... from exc``. The split that matters
to callers is *input* (poison: retrying cannot help; store it as a reject and
move on) versus *unavailable* (retryable: back off and try again).

    HubError
     +-- SettingsError                 bad or missing configuration (names the key)
     +-- RuleError                     a bad alert rule file (names the file, the rule and the key)
     +-- ReceiversError                a bad Alertmanager receivers file (names the file, the key)
     +-- CatalogError                  a bad or refused device catalog file (names the file,
     |                                 the type and the key)
     +-- InputError                    bad input; carries a short ``reason`` code
     |    +-- MalformedPayloadError    not decodable (JSON / msgpack syntax)
     |    |    +-- FieldTypeError      decodable, but a field has the wrong type or is missing
     |    |    +-- MqttProtocolError   a broker's byte stream is not valid MQTT v5
     |    +-- PayloadTooLargeError
     |    +-- InvalidIdError           id outside the allow-list ^[a-z0-9][a-z0-9-]{0,63}$
     |    +-- InvalidTopicError
     |    +-- UnknownDeviceTypeError
     |    +-- UnknownMetricError
     |    +-- NonFiniteValueError      NaN or an infinity
     |    +-- OutOfRangeError          outside the metric's physical range
     |    +-- TimestampWindowError     too far in the past or the future
     |    +-- InconsistentBatchError   columns of different lengths, bad indexes
     |    +-- RefusedByDatabaseError   the database refused the data itself (constraint, data)
     |    +-- InvalidPortError         not a serial device path or pyserial URL
     |    +-- AlertNotFoundError       no alert has the id an operator gave
     |    +-- AlreadyAcknowledgedError the alert was acknowledged before
     |    +-- InvalidNoteError         an operator's comment or assignee that cannot be stored
     |    |                            (empty, too long, control characters)
     |    +-- AlertClosedError         the alert is cleared and acknowledged: nothing to assign
     |    +-- SlaveExceptionError      a Modbus slave answered with an exception code
     |    +-- CommandRefusedError      a command request the device type's catalog entry refuses
     |    |                            (names the type, the command and the arg)
     |    +-- UnknownCommandError      an answer or report for a command id not held for its sender
     |    +-- UndecodablePayloadError  a LoRaWAN payload its model's codec cannot decode
     |    +-- ModelMismatchError       a LoRaWAN payload that decodes, without what its model says
     |    +-- ProvisioningError        a technician's request the registry refuses
     |         +-- NotFoundError       unknown site, gateway or device
     |         +-- AlreadyExistsError  the id is taken (also by a revoked device)
     |         +-- ConflictError       contradicts the registry (revoked, other site, ...)
     |         +-- GeographyError      no such ward/commune or former district of Hanoi
     |         +-- SiteFileError       a site import file is malformed (names the file and row)
     +-- UnavailableError              retryable: a dependency does not answer
     |    +-- BrokerUnavailableError
     |    +-- DatabaseUnavailableError
     |    +-- JobLockedError           another alerts job with the same id holds the lock
     |    +-- GrafanaUnavailableError  Grafana did not answer, or answered with a server error
     |    +-- OutboxUnavailableError   the outbox cannot be written now (disk full, I/O, locked)
     |    +-- AlertmanagerUnavailableError  Alertmanager did not answer, or answered with a
     |    |                            server error
     |    +-- SerialUnavailableError   a serial port is not open now, or a write to it failed
     |    |    +-- BusUnavailableError  a Modbus bus's port is not open now, or failed
     |    +-- NoAnswerError            a Modbus slave did not answer within its timeout
     |         +-- GarbledAnswerError  ... but bytes came: a bad CRC, noise, a broken frame
     +-- BrokerControlError            a broker refused a control (dynamic-security) command
     +-- BrokerRefusedError            a broker refused a connection (credentials, client id)
     +-- GrafanaRefusedError           Grafana refused a request (credentials, permissions)
     +-- AlertmanagerRefusedError      Alertmanager refused a post (4xx: a malformed alert)
     +-- PkiError                      missing or unusable CA, certificate or key
     +-- OutboxFullError               a gateway outbox at its size bound refuses new readings
     +-- OutboxUnusableError           the outbox file cannot be used (read-only, no access)
     |    +-- OutboxCorruptError       the outbox file is not an intact SQLite database
     +-- SchemaError                   the database is not what the code expects: a schema not
     |    |                            migrated, a statement refused (grants, server version)
     |    +-- MigrationError           a migration's statement failed
     +-- BackupError                   a backup that is incomplete, altered, or cannot be
     |                                 restored here (names the file or both versions)
     +-- LocalServiceError             the private broker / database of the embedded default
          +-- MissingDependencyError   a program or extension is not installed
          +-- PortInUseError
          +-- ServiceStartError        a server did not come up
          +-- ServiceStopError         a server would not stop
"""

from __future__ import annotations


class HubError(Exception):
    """Root of every error cityhub raises on purpose."""


class SettingsError(HubError):
    """Configuration is missing or mistyped; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"setting {key!r}: {problem}")
        self.key = key
        self.problem = problem


class RuleError(HubError):
    """An alert rule file is unreadable or a rule in it is invalid.

    ``source`` is the file (or ``<defaults>``), ``rule_id`` the rule (None for
    a file-level problem), ``key`` the dotted key inside the rule.
    """

    def __init__(self, source: str, rule_id: str | None, key: str | None, problem: str) -> None:
        where = source
        if rule_id is not None:
            where += f": rule {rule_id!r}"
        if key is not None:
            where += f": key {key!r}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.rule_id = rule_id
        self.key = key
        self.problem = problem


class ReceiversError(HubError):
    """An Alertmanager receivers file is unreadable or invalid.

    ``source`` is the file, ``key`` the dotted key in it (None for the whole file).
    """

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        where = source if key is None else f"{source}: key {key!r}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class CatalogError(HubError):
    """A device catalog file is unreadable, or an entry in it is invalid or refused.

    ``source`` is the file (or the shipped catalog), ``type_name`` the device
    type (None for a file-level problem), ``key`` the key inside the type,
    such as ``metrics.pm25.unit`` (None when the whole entry is at fault).
    """

    def __init__(self, source: str, type_name: str | None, key: str | None, problem: str) -> None:
        where = source
        if type_name is not None:
            where += f": type {type_name!r}"
        if key is not None:
            where += f": key {key!r}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.type_name = type_name
        self.key = key
        self.problem = problem


class InputError(HubError):
    """Bad input from the field or from a user: poison, never retried.

    ``reason`` is a short stable code stored in the rejects table and used as a
    metrics label.
    """

    reason = "invalid"


class MalformedPayloadError(InputError):
    reason = "malformed"


class FieldTypeError(MalformedPayloadError):
    reason = "wrong_type"


class MqttProtocolError(MalformedPayloadError):
    reason = "mqtt_protocol"


class PayloadTooLargeError(InputError):
    reason = "too_large"


class InvalidIdError(InputError):
    reason = "bad_id"


class InvalidTopicError(InputError):
    reason = "bad_topic"


class UnknownDeviceTypeError(InputError):
    reason = "unknown_device_type"


class UnknownMetricError(InputError):
    reason = "unknown_metric"


class NonFiniteValueError(InputError):
    reason = "non_finite"


class OutOfRangeError(InputError):
    reason = "out_of_range"


class TimestampWindowError(InputError):
    reason = "ts_window"


class InconsistentBatchError(InputError):
    reason = "inconsistent_batch"


class RefusedByDatabaseError(InputError):
    """The database refused the data itself (a constraint or data error): poison, not retried."""

    reason = "db_refused"


class InvalidPortError(InputError):
    reason = "bad_port"


class AlertNotFoundError(InputError):
    reason = "unknown_alert"


class AlreadyAcknowledgedError(InputError):
    reason = "already_acked"


class InvalidNoteError(InputError):
    reason = "invalid_note"


class AlertClosedError(InputError):
    reason = "alert_closed"


class CommandRefusedError(InputError):
    """A command request that the device type's catalog entry refuses; nothing is sent.

    ``device_type`` and ``command`` name the catalog entry (None when not known
    yet), ``arg`` the argument at fault (None when the whole request is).
    """

    reason = "command_refused"

    def __init__(
        self, device_type: str | None, command: str | None, arg: str | None, problem: str
    ) -> None:
        parts = []
        if device_type is not None:
            parts.append(f"device type {device_type!r}")
        if command is not None:
            parts.append(f"command {command!r}")
        if arg is not None:
            parts.append(f"arg {arg!r}")
        super().__init__(": ".join([*parts, problem]))
        self.device_type = device_type
        self.command = command
        self.arg = arg
        self.problem = problem


class UnknownCommandError(InputError):
    """An answer or report naming a command its sender was never given."""

    reason = "unknown_command"


class UndecodablePayloadError(InputError):
    """A LoRaWAN uplink's payload its model's codec cannot decode (cut short, an unknown type)."""

    reason = "undecodable"


class ModelMismatchError(InputError):
    """A LoRaWAN payload that decodes but does not carry what the device's model says it does."""

    reason = "model_mismatch"


class ProvisioningError(InputError):
    """A technician's request that the registry refuses; nothing was changed."""

    reason = "refused"


class NotFoundError(ProvisioningError):
    reason = "not_found"


class AlreadyExistsError(ProvisioningError):
    reason = "exists"


class ConflictError(ProvisioningError):
    reason = "conflict"


class GeographyError(ProvisioningError):
    """A ward/commune or former district that is not Hanoi's (``contracts.geography``)."""

    reason = "unknown_place"


class SiteFileError(ProvisioningError):
    """A site import file (CSV or GeoJSON) that cannot be read; names the file and the row."""

    reason = "bad_file"

    def __init__(self, source: str, row: int | None, problem: str) -> None:
        where = source if row is None else f"{source}, row {row}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.row = row
        self.problem = problem


class BrokerControlError(HubError):
    """A broker answered a control command with an error (e.g. "Client already exists")."""


class BrokerRefusedError(HubError):
    """A broker answered CONNECT with a failure reason code; retrying as is cannot help."""

    def __init__(self, where: str, username: str | None, reason: str) -> None:
        super().__init__(f"the {where} refused the connection as {username!r}: {reason}")
        self.where = where
        self.username = username
        self.reason = reason


class PkiError(HubError):
    """The CA, a certificate or a key is missing or unusable."""


class UnavailableError(HubError):
    """A dependency does not answer; retry with backoff."""


class BrokerUnavailableError(UnavailableError):
    pass


class DatabaseUnavailableError(UnavailableError):
    pass


class JobLockedError(UnavailableError):
    """Another alerts job with the same id holds the lock; this one waits as a standby."""


class GrafanaUnavailableError(UnavailableError):
    """Grafana did not answer, or answered with a server error."""


class GrafanaRefusedError(HubError):
    """Grafana refused a request (authentication, permissions, a bad board)."""


class AlertmanagerUnavailableError(UnavailableError):
    """Alertmanager did not answer, or answered with a server error; post again later."""


class SerialUnavailableError(UnavailableError):
    """A serial port is not open now, or writing to it failed; try again later.

    Nothing, or not all of it, was written. The port is reopened with backoff.
    """


class BusUnavailableError(SerialUnavailableError):
    """A Modbus bus's port is not open now, or it failed; it is reopened with backoff."""


class NoAnswerError(UnavailableError):
    """A Modbus slave did not answer a request within its timeout (nothing usable came).

    Polling tries again at the next interval; a command is not written again.
    """


class GarbledAnswerError(NoAnswerError):
    """Bytes came within the timeout, but no valid answer: a bad CRC, noise, a broken frame."""


class SlaveExceptionError(InputError):
    """A Modbus slave answered a request with an exception response (``code``)."""

    reason = "modbus_exception"

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class AlertmanagerRefusedError(HubError):
    """Alertmanager refused a post (4xx); the message holds the start of its answer."""


class OutboxFullError(HubError):
    """The gateway's outbox is at ``outbox_max_bytes`` and its policy is to refuse."""


class OutboxUnavailableError(UnavailableError):
    """The outbox cannot be written now (disk full, an I/O error, locked); nothing was stored."""


class OutboxUnusableError(HubError):
    """The outbox file cannot be used at all (read-only, no permission): a person must act."""


class OutboxCorruptError(OutboxUnusableError):
    """The outbox file is not an intact SQLite database (damaged, or another kind of file)."""


class SchemaError(HubError):
    """The database is not what this code expects; a person must act.

    A missing table, column, function or schema (run `cityhub db migrate`), or
    a statement the server refuses for a reason other than the data: missing
    grants, a server or extension version the code does not support.
    """


class MigrationError(SchemaError):
    """A migration's statement failed; the migration was rolled back."""


class LocalServiceError(HubError):
    """The private broker or database of the embedded default failed."""


class MissingDependencyError(LocalServiceError):
    pass


class PortInUseError(LocalServiceError):
    def __init__(self, port: int, service: str) -> None:
        super().__init__(
            f"port {port} for {service} is already in use on 127.0.0.1; "
            "stop whatever holds it or choose another port"
        )
        self.port = port
        self.service = service


class ServiceStartError(LocalServiceError):
    pass


class ServiceStopError(LocalServiceError):
    pass


class BackupError(HubError):
    """A backup directory is incomplete or altered, or cannot be restored on this target.

    Names the file (missing, hash mismatch, undecryptable) or both versions
    (TimescaleDB of the backup and of the target); a person must act.
    """
