#!/bin/sh
# Runs once, when the database volume is first initialised (the timescale
# image's /docker-entrypoint-initdb.d): cityhub's schema, owned by the
# application role, and a read-only role for Grafana whose search_path is that
# schema, so the boards' SQL names tables without a schema.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v app="$POSTGRES_USER" -v schema="${CITYHUB_SCHEMA:-cityhub}" \
    -v reader="$GRAFANA_DB_USER" -v password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE EXTENSION IF NOT EXISTS timescaledb;
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"app";
CREATE ROLE :"reader" LOGIN PASSWORD :'password';
GRANT USAGE ON SCHEMA :"schema" TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"app" IN SCHEMA :"schema" GRANT SELECT ON TABLES TO :"reader";
ALTER ROLE :"reader" SET search_path = :"schema", public;
ALTER ROLE :"reader" SET default_transaction_read_only = on;
ALTER ROLE :"reader" SET statement_timeout = '30s';
SQL
