"""The test harness, one job per module (used by tests/ and benchmarks/).

- :mod:`~tests.support.services`: real servers on 127.0.0.1 (redis-server, PostgreSQL, moto S3);
  a missing one skips locally and fails in CI.
- :mod:`~tests.support.catalogs`: where the catalog lives (embedded SQLite, PostgreSQL, S3), as
  the environment every process of a test reads.
- :mod:`~tests.support.events`: synthetic CloudEvents whose ids say which batch they belong to.
- :mod:`~tests.support.stack`: icefleet in this process (writer, committer, catalog, Redis), the
  Celery tasks in this process, and child-process entry points.
- :mod:`~tests.support.readback`: tables read back (pyiceberg and iceberg-rust) and the one
  exactly-once assertion.
- :mod:`~tests.support.fleet`: a fleet of real worker processes, waiting for it, killing parts.
- :mod:`~tests.support.faults`: fault injectors (throttling S3 proxy, cuttable TCP proxy) and
  fault hooks for the committer.
- :mod:`~tests.support.chaos`: chaos rounds (a feeder, random kills, settling, the report).
- :mod:`~tests.support.metrics`: a Prometheus exposition parsed into samples.
"""
