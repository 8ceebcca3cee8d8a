#!/bin/sh
# Runs once, when the data volume is initialised: the exporter's read-only role (farm_ro) and its
# SELECT on every table the owner (farm) creates later (migrations).
set -eu
psql -v ON_ERROR_STOP=1 -v ro_password="$FARM_RO_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE farm_ro LOGIN PASSWORD :'ro_password';
GRANT CONNECT ON DATABASE farm TO farm_ro;
GRANT USAGE ON SCHEMA public TO farm_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO farm_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE farm IN SCHEMA public GRANT SELECT ON TABLES TO farm_ro;
SQL
