"""Prometheus /metrics on a configured address: the one place that imports prometheus_client.

A service describes what it exposes as ``Family`` values read at scrape time
(its counters and gauges, each labelled with the service's own instance
label, e.g. ``gateway`` or ``worker``) and may add histograms it observes
itself. ``MetricsExporter.serve`` binds host and port in a daemon thread; an
address that cannot be bound is a SettingsError naming the setting (the host
key when the address is not one of this machine's, else the port key), which
services check before they connect anywhere. ``check_ports`` checks a range
of ports before a supervisor starts workers. Each service's settings section
has ``metrics_host`` next to ``metrics_port`` (checked to be an IP literal at
settings load); ``MetricsAddress`` carries the pair and their keys here.

What is counted, and the metric names (Grafana boards and alerts read
them), are the services' business.
"""

from __future__ import annotations

import errno
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from contracts.errors import SettingsError, UnavailableError

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


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where an exporter listens, and the settings section that said so.

    ``section`` names the keys in errors: ``{section}.metrics_host`` and
    ``{section}.metrics_port``.
    """

    host: str
    port: int
    section: str

    def at_port(self, port: int) -> MetricsAddress:
        """The same host and keys on another port (a worker's ``metrics_port + index``)."""
        return MetricsAddress(self.host, port, self.section)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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

    def serve(self, address: MetricsAddress) -> MetricsServer:
        """Serve /metrics on ``address`` in a daemon thread; SettingsError if unbindable."""
        try:
            server, _thread = start_http_server(
                address.port, addr=address.host, registry=self.registry
            )
        except OSError as exc:
            raise bind_error(address, exc) from exc
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


def bind_error(address: MetricsAddress, exc: OSError) -> SettingsError:
    """The SettingsError for an address that cannot be bound, naming the key at fault."""
    reason = exc.strerror or str(exc)
    # EADDRNOTAVAIL: no interface of this machine has that address.
    field = "metrics_host" if exc.errno == errno.EADDRNOTAVAIL else "metrics_port"
    return SettingsError(f"{address.section}.{field}", f"cannot listen on {address}: {reason}")


def check_ports(first: MetricsAddress, count: int) -> None:
    """Raise SettingsError unless ``first`` .. ``count - 1`` ports above it can be bound now.

    A port taken between this check and a worker's start is still that
    worker's SettingsError.
    """
    for port in range(first.port, first.port + count):
        address = first.at_port(port)
        try:
            # The address family and socket address as the HTTP server picks them.
            family, _, _, _, sockaddr = socket.getaddrinfo(
                address.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                # What the HTTP server sets too: a port in TIME_WAIT is not taken.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            raise bind_error(address, exc) from exc


# Loopback addresses to scrape a service that listens on all interfaces.
_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def scrape_sample(address: MetricsAddress, name: str, *, timeout_s: float) -> float | None:
    """The first sample named ``name`` in the /metrics at ``address``, None if absent.

    A listener on all interfaces is asked on loopback. UnavailableError when
    nothing answers within ``timeout_s`` (a stopped or hung process) or the
    answer is not the Prometheus text format.
    """
    host = _WILDCARD_LOOPBACK.get(address.host, address.host)
    url = f"http://{MetricsAddress(host, address.port, address.section)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    except (OSError, urllib.error.URLError) as exc:
        raise UnavailableError(f"no answer from {url} within {timeout_s:g} s: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnavailableError(f"{url} did not answer in the metrics format: {exc}") from exc
    return None
