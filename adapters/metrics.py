"""Prometheus /metrics on 127.0.0.1: the one place that imports prometheus_client.

A service describes what it exposes as ``Family`` values read at scrape time
(its counters and gauges, each labelled with the service's own instance
label, e.g. ``gateway`` or ``worker``) and may add histograms it observes
itself. ``MetricsExporter.serve`` binds the port in a daemon thread; a port
that cannot be bound (taken, or privileged) is a SettingsError naming the
setting, which services check before they connect anywhere.
``check_ports`` checks a range of ports before a supervisor starts workers.

What is counted, and the metric names (Grafana boards and alerts read
them), are the services' business.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from contracts.errors import SettingsError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

Labels = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as read at scrape time.

    ``name`` is without the exporter's prefix; ``labels`` are the labels
    after the instance label, and each sample gives their values.
    """

    kind: Literal["counter", "gauge"]
    name: str
    help: str
    samples: Sequence[tuple[Labels, float]]
    labels: Labels = ()


def counter(name: str, help_text: str, value: float) -> Family:
    """A monotonic total with only the instance label (exposed as ``{name}_total``)."""
    return Family("counter", name, help_text, [((), value)])


def gauge(name: str, help_text: str, value: float) -> Family:
    """A current value with only the instance label."""
    return Family("gauge", name, help_text, [((), value)])


def counters_by(name: str, help_text: str, totals: Mapping[str, float], *, label: str) -> Family:
    """Totals keyed by one label's value (a reject reason), in a stable order."""
    return Family(
        "counter",
        name,
        help_text,
        [((value,), total) for value, total in sorted(totals.items())],
        labels=(label,),
    )


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class MetricsServer:
    """The HTTP server of one exporter; ``close`` stops it and frees the port."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MetricsExporter:
    """A registry of one service instance: families read by ``collect``, plus histograms."""

    def __init__(
        self,
        *,
        prefix: str,
        instance_label: str,
        instance: str,
        collect: Callable[[], Iterable[Family]],
    ) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry()
        self.registry.register(_FamilyCollector(prefix, instance_label, instance, collect))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> Observer:
        """A histogram ``{prefix}_{name}`` (no instance label, as each process has its own port)."""
        return Histogram(
            f"{self.prefix}_{name}", help_text, buckets=buckets, registry=self.registry
        )

    def serve(self, port: int, *, setting: str) -> MetricsServer:
        """Serve /metrics on 127.0.0.1:``port`` in a daemon thread; SettingsError if unbindable."""
        try:
            server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise port_error(setting, port, exc) from exc
        return MetricsServer(server)


class _FamilyCollector(Collector):
    def __init__(
        self,
        prefix: str,
        instance_label: str,
        instance: str,
        collect: Callable[[], Iterable[Family]],
    ) -> None:
        self.prefix = prefix
        self.instance_label = instance_label
        self.instance = instance
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        for family in self._collect():
            make = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = make(
                f"{self.prefix}_{family.name}",
                family.help,
                labels=[self.instance_label, *family.labels],
            )
            for labels, value in family.samples:
                metric.add_metric([self.instance, *labels], value)
            yield metric


def port_error(setting: str, port: int, exc: OSError) -> SettingsError:
    reason = exc.strerror or str(exc)
    return SettingsError(setting, f"cannot listen on 127.0.0.1:{port}: {reason}")


def check_ports(first_port: int, count: int, *, setting: str) -> None:
    """Raise SettingsError unless ``first_port`` .. ``first_port + count - 1`` can be bound now.

    A port taken between this check and a worker's start is still that
    worker's SettingsError.
    """
    for port in range(first_port, first_port + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # What the HTTP server sets too: a port in TIME_WAIT is not taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise port_error(setting, port, exc) from exc
