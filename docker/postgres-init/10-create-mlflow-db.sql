-- Run once by the postgres image's entrypoint, on an empty data volume (POSTGRES_DB already made `prefect`).
-- One PostgreSQL 16 server, two databases: `prefect` (Prefect server) and `mlflow` (MLflow tracking server).
CREATE DATABASE mlflow;
