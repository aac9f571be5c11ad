-- Runs once, when the PostgreSQL volume is first initialised.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
