"""The lake: the Iceberg catalog, the warehouse's bytes, retries of their calls, DataFiles on the wire."""
