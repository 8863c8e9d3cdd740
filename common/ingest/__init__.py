"""Events in: CloudEvents parsing, routing to tables, the producer and the write-task payload."""
