"""One byte flipped inside a data page of a committed file, end to end: found by ``verify --deep``,
refused by every icefleet read that touches it, quarantined, and its rows restored.

Real Redis, the SQLite catalog, the CLI as an operator runs it, the write and commit tasks in this
process; the table read back with pyiceberg and with iceberg-rust.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from common.coord import keys
from common.errors import CorruptDataFileError
from common.lake.integrity import verified
from common.maintenance.deletes import delete_rows, live_data_files
from common.maintenance.quarantine import RECORD_SUFFIX, QuarantineRecord
from tests.integration.test_canary import take_messages
from tests.integration.test_maintenance import rust_rows
from tests.support.corruption import flip_byte_in_data_page
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import TABLE, Stack, make_stack
from workers.cli.main import main
from workers.runtime import Runtime
from workers.tasks.commit import commit_table
from workers.tasks.write import write_batch

pytestmark = pytest.mark.integration

BATCHES = 6
PER_BATCH = 40
ROW_GROUP_ROWS = 10  # four row groups a file: the damage stays in one of them


@pytest.fixture
def pipe(
    rt: Runtime, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    """The pipeline on the runtime's home and Redis, and the environment the CLI reads."""
    home = tmp_path / "home"
    pipeline = make_stack(redis_url, home, row_group_rows=ROW_GROUP_ROWS)
    monkeypatch.setenv("ICEFLEET_HOME", str(home))
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    for n in range(BATCHES):
        pipeline.write(f"b{n}", make_events(f"b{n}", PER_BATCH))
        pipeline.commit()
    yield pipeline
    pipeline.close()


def icefleet(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def rows(table: Any) -> list[dict[str, Any]]:
    return sorted(table.scan().to_arrow().to_pylist(), key=lambda r: r["id"])


def damage_one_file(pipe: Stack) -> str:
    """Flip a byte in the second row group's raw_event page of one live file; its path."""
    path = sorted(live_data_files(pipe.table()))[2]
    flip_byte_in_data_page(local_path(path), "raw_event", row_group=1)
    return path


def test_a_flipped_byte_is_found_refused_quarantined_and_restored(
    pipe: Stack, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given six committed files, and one byte flipped in a raw_event page of one of them
    healthy = rows(pipe.table())
    bad = damage_one_file(pipe)
    snapshot = pipe.table().current_snapshot()
    assert snapshot is not None
    bad_ids = {r["id"] for r in healthy if r["_batch_id"] == "b2"}
    assert bad.split("/")[-1].startswith("b2-") and len(bad_ids) == PER_BATCH

    # When the operator runs verify, then deep verify
    shallow = icefleet("verify", TABLE)
    deep = icefleet("verify", "--deep", TABLE)
    as_json = icefleet("verify", "--deep", "--json", TABLE)

    # Then sizes and footers are fine (the old check sees nothing), but the deep check names the
    # file, the row group, the column and the CRC failure, and exits 1
    assert shallow.exit_code == 0, shallow.output
    assert deep.exit_code == 1, deep.output
    assert f"{bad}: row group 1: column raw_event" in deep.output
    assert "CRC checksum verification failed" in deep.output
    assert "1 table(s) failed verification" in deep.output
    report = json.loads(as_json.output.splitlines()[0])
    assert (report["ok"], report["bad_files"], report["checked"]) == (False, [bad], BATCHES)

    # And readers that do not check page checksums return other values without any error:
    # pyiceberg's scan and iceberg-rust (what icefleet cannot change, shown here as it is)
    silently_wrong = [r for r in rows(pipe.table()) if r not in healthy]
    assert silently_wrong and {r["id"] for r in silently_wrong} <= bad_ids
    assert rust_rows(pipe.table()) != healthy

    # And every icefleet read that touches the file fails loudly, naming it, changing nothing:
    # compaction (from the CLI), a copy-on-write delete, a verified scan
    compacted = icefleet("compact", TABLE)
    assert compacted.exit_code == 1
    assert f"data file {bad} is corrupt" in " ".join(compacted.output.split())
    table = pipe.table()
    assert table.current_snapshot() == snapshot
    assert not list(local_path(table.location()).rglob("compacted-*.parquet"))
    with pytest.raises(CorruptDataFileError, match="CRC checksum verification failed"):
        delete_rows(table, "id = 'b2-0'")
    with pytest.raises(CorruptDataFileError) as raised:
        verified(pipe.table()).scan().to_arrow()
    assert raised.value.path == bad and pipe.table().current_snapshot() == snapshot

    # When the operator quarantines it
    quarantined = icefleet("quarantine", "--json", TABLE, bad)

    # Then one snapshot took it out; the table is whole again: deep verify passes, both readers
    # read every other row exactly as written
    assert quarantined.exit_code == 0, quarantined.output
    record = QuarantineRecord(**json.loads(quarantined.output))
    table = pipe.table()
    assert bad not in live_data_files(table) and len(live_data_files(table)) == BATCHES - 1
    summary = table.current_snapshot().summary  # type: ignore[union-attr]
    assert summary is not None and summary["icefleet.operation"] == "quarantine"
    assert icefleet("verify", "--deep", TABLE).exit_code == 0
    rest = [r for r in healthy if r["id"] not in bad_ids]
    assert rows(table) == rest and rust_rows(table) == rest
    # And the report is complete: every row of the file accounted for, the lost ones by id
    assert (record.status, record.record_count) == ("removed", PER_BATCH)
    assert (record.restorable_rows, record.lost_rows, record.undecodable_rows) == (30, 10, 0)
    assert sorted(record.lost_ids) == sorted(f"b2-{n}" for n in range(10, 20))
    assert record.snapshot_id == table.current_snapshot().snapshot_id  # type: ignore[union-attr]
    # And the file is kept aside, byte for byte, with its record beside it and in Redis
    copy = local_path(record.quarantine_path)
    assert copy.stat().st_size == record.file_size_in_bytes
    assert json.loads((copy.parent / (copy.name + RECORD_SUFFIX)).read_text())["status"] == (
        "removed"
    )
    assert redis_client.hget(keys.quarantine(TABLE), bad) is not None
    # ... where orphan removal leaves it, and where the original stays until expiry
    swept = icefleet("remove-orphans", TABLE, "--older-than", "0s")
    assert swept.exit_code == 0 and copy.exists() and local_path(bad).exists()
    listed = icefleet("quarantine", "--list", TABLE)
    assert bad in " ".join(listed.output.split()) and "removed" in listed.output

    # When the operator restores its rows (twice: an interrupted restore run again)
    first = icefleet("quarantine", "--restore", "--json", TABLE, bad)
    again = icefleet("quarantine", "--restore", "--json", TABLE, bad)
    for name, kwargs in take_messages(redis_client):
        assert name == "icefleet.write_batch"
        write_batch.apply(kwargs=kwargs).get()
    commit_table.apply(args=[TABLE]).get()

    # Then the 30 readable events are back once, exactly as they were received, and only the ten
    # listed as lost are missing
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    restored = QuarantineRecord(**json.loads(first.output))
    assert (restored.status, restored.restored_rows) == ("restored", 30)
    after = rows(pipe.table())
    back = {r["id"]: r["raw_event"] for r in after if r["id"] in bad_ids}
    assert sorted(back) == sorted(bad_ids - set(record.lost_ids))
    assert back == {r["id"]: r["raw_event"] for r in healthy if r["id"] in back}
    assert len(after) == len(rest) + 30

    # When the producer sends the ten lost events again, as the record asks (a new batch id)
    lost = tmp_path / "lost.ndjson"
    lost.write_text(
        "".join(r["raw_event"] + "\n" for r in healthy if r["id"] in bad_ids - set(back))
    )
    assert icefleet("send", str(lost), "--table", TABLE).exit_code == 0
    for _, kwargs in take_messages(redis_client):
        write_batch.apply(kwargs=kwargs).get()
    commit_table.apply(args=[TABLE]).get()
    # Then they land (quarantine gave back their per-event claims): the table is whole again
    after = rows(pipe.table())
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in healthy)
    # ... and compaction runs again, reading every page verified
    assert icefleet("compact", TABLE).exit_code == 0
    assert rows(pipe.table()) == after


def test_quarantine_refuses_a_file_the_table_does_not_have(pipe: Stack) -> None:
    result = icefleet("quarantine", TABLE, "file:///nowhere/x.parquet")
    assert result.exit_code == 1
    assert "is not a live data file of events.order" in result.output
    assert icefleet("quarantine", TABLE).exit_code == 2
    missing = icefleet("quarantine", "--restore", TABLE, "file:///nowhere/x.parquet")
    assert missing.exit_code == 1 and "has no quarantine record" in missing.output


def test_beat_runs_the_sampled_validation_on_the_ingest_queue(
    pipe: Stack, rt: Runtime, redis_client: redis.Redis
) -> None:
    from workers.app import celery_config
    from workers.tasks.validation import VERIFY_SAMPLE_TASK, verify_sample

    # Given the beat schedule of a committer, and a table with one damaged file
    config = celery_config(rt.settings)
    entry = config["beat_schedule"]["validation-verify-sample"]
    assert (entry["task"], entry["schedule"], entry["options"]["queue"]) == (
        VERIFY_SAMPLE_TASK,
        600.0,
        "ingest",
    )
    assert config["task_routes"][VERIFY_SAMPLE_TASK] == {"queue": "ingest"}
    bad = damage_one_file(pipe)
    # When beat's task runs (in this process)
    run = verify_sample.apply().get()
    # Then it checked every file (fewer than the sample size) and counted the bad one
    assert (run["files"], run["failures"], run["bad_files"][0]["file"]) == (BATCHES, 1, bad)
    assert int(redis_client.get(keys.verify_failures()) or 0) == 1
