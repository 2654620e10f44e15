"""The ingest service: records from Kafka and gRPC into validated, versioned datasets."""
