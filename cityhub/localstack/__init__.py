"""Private Mosquitto and PostgreSQL/TimescaleDB servers for the embedded default and for tests."""
