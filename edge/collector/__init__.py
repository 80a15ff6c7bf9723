"""The lab collector: edges ship their audit logs and review sessions through NATS JetStream (ship),
the collector stores them idempotently in one SQL database (db, ingest) and serves a lab page (web)."""
