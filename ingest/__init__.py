"""Central ingest: consumes gateway batches, commits them idempotently into TimescaleDB, acks."""
