#!/bin/sh
# Run once by the postgres image on an empty data directory (docker-compose.yml):
# the read-only role Grafana and analysts query with (docs/analytics.md). The
# analytics service creates the tables later, as the owner role, so the default
# privileges below are what let this role read them and every new daily partition.
set -eu
psql -v ON_ERROR_STOP=1 -v reader_password="$GRAFANA_DB_PASSWORD" \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE narrative TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
