"""``icefleet quarantine``: take a bad data file out of its table, keep it aside, restore its rows.

The steps and what each guarantees are in :mod:`common.maintenance.quarantine`; the operator's
path (find, quarantine, restore) in docs/integrity.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click
from rich.markup import escape

from common.maintenance.quarantine import QuarantineRecord
from workers.cli.errors import fail
from workers.cli.maintenance import _errors, _maintainer, out


def _print(record: QuarantineRecord, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(asdict(record)))
        return
    out.print(
        f"{record.table}: {escape(record.original_path)} [bold]{record.status}[/]"
        + (f" (snapshot {record.snapshot_id})" if record.snapshot_id else "")
    )
    out.print(f"  kept at {escape(record.quarantine_path)}")
    out.print(
        f"  {record.record_count:,} row(s) in the file: {record.restorable_rows:,} restorable "
        f"from raw_event, {record.lost_rows:,} in pages that fail their checksums, "
        f"{record.undecodable_rows:,} whose raw_event is not JSON"
    )
    for reason in record.reasons:
        out.print(f"  why: {escape(reason)}")
    if record.lost_ids:
        shown = ", ".join(record.lost_ids[:20])
        more = (
            f" (+{len(record.lost_ids) - 20} more in --json)" if len(record.lost_ids) > 20 else ""
        )
        out.print(f"  ids of rows lost from the file (send them again): {escape(shown)}{more}")
    if record.status == "restored":
        out.print(
            f"  {record.restored_rows:,} row(s) sent again as batch(es) "
            f"{escape(', '.join(record.restored_batch_ids))}"
        )
    elif record.status == "removed" and record.restorable_rows:
        out.print(f"  restore: icefleet quarantine --restore {record.table} {record.original_path}")


@click.command()
@click.argument("table", required=False)
@click.argument("file", required=False)
@click.option("--restore", is_flag=True, help="Send the rows of a quarantined FILE again.")
@click.option("--list", "list_", is_flag=True, help="List quarantined files (of TABLE).")
@click.option("--json", "as_json", is_flag=True, help="JSON records, one per line.")
def quarantine(
    table: str | None, file: str | None, restore: bool, list_: bool, as_json: bool
) -> None:
    """Take FILE out of TABLE in one snapshot, keeping it aside with a record of its rows.

    FILE is the path `icefleet verify --deep` names. --restore re-enqueues the file's raw_event
    values that still read and decode (batch quarantine-<digest>, landing once however often it
    runs); --list shows the records.
    """
    from common.maintenance.quarantine import QuarantineStore, quarantine_file
    from common.maintenance.quarantine import restore as restore_rows

    if list_:
        with _maintainer() as m, _errors():
            name = m.table_names([table])[0] if table else None
            records = QuarantineStore(m.client).all(name)
        for record in records:
            _print(record, as_json)
        if not records and not as_json:
            out.print("no quarantined files")
        return
    if not table or not file:
        fail("usage: icefleet quarantine [--restore] TABLE FILE (or --list [TABLE])", code=2)
    with _maintainer() as m, _errors():
        (name,) = m.table_names([table])
        iceberg_table = m.load(name)
        store = QuarantineStore(m.client)
        window_s = m.settings.dedup_window_s
        if not restore:
            from common.coord.claims import EventClaims, forget_identities

            record = quarantine_file(
                iceberg_table,
                file,
                store,
                lock=m.lock(name),
                forget=lambda pairs, target: forget_identities(
                    EventClaims(m.client), target, pairs, window_s
                ),
            )
        else:
            from common.coord.claims import EventClaims, forget_raw_events
            from common.ingest.producer import Producer

            found = store.get(iceberg_table.io, iceberg_table, file)
            if found is None:
                fail(f"{file} has no quarantine record for {name}")
            with Producer(m.settings, client=m.client) as producer:
                record = restore_rows(
                    iceberg_table,
                    found,
                    store,
                    lambda lines, target, batch_id: producer.enqueue_many(
                        lines, table=target, batch_id=batch_id
                    ),
                    forget=lambda lines, target: forget_raw_events(
                        EventClaims(m.client), target, lines, window_s
                    ),
                )
    _print(record, as_json)
