"""The one place where cityhub meets its I/O libraries.

Services (``gateway``, ``ingest``, ``alerts``, ``devices``, ``grafana``,
``firmware_sim``) reach psycopg, paho-mqtt, sqlite3, prometheus_client,
process/signal handling and Alertmanager's HTTP API only through these
modules, which translate library errors into ``contracts.errors`` once, at
the edge. Each module imports only
its own library, so a gateway that never opens a database never imports
psycopg: this ``__init__`` imports nothing.
"""
