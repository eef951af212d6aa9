"""The cityhub error tree.

Every error the project raises on purpose derives from ``HubError``. Adapters
translate library errors (psycopg, paho, pyserial, OS errors) into the most
specific type here, once, with ``raise ... from exc``. The split that matters
to callers is *input* (poison: retrying cannot help; store it as a reject and
move on) versus *unavailable* (retryable: back off and try again).

    HubError
     +-- SettingsError                 bad or missing configuration (names the key)
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
     +-- UnavailableError              retryable: a dependency does not answer
     |    +-- BrokerUnavailableError
     |    +-- DatabaseUnavailableError
     +-- OutboxFullError               a gateway outbox at its size bound refuses new readings
     +-- SchemaError                   the database schema is not what the code expects
     |    +-- MigrationError
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


class UnavailableError(HubError):
    """A dependency does not answer; retry with backoff."""


class BrokerUnavailableError(UnavailableError):
    pass


class DatabaseUnavailableError(UnavailableError):
    pass


class OutboxFullError(HubError):
    """The gateway's outbox is at ``outbox_max_bytes`` and its policy is to refuse."""


class SchemaError(HubError):
    """The database schema is not what this code expects."""


class MigrationError(SchemaError):
    pass


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
