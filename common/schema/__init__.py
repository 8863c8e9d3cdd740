"""Table layouts: the Iceberg schema of an event table, inference from JSON, evolution rules."""
