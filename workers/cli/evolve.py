"""``icefleet evolve``: schema changes an operator asks for, applied under the table lock."""

from __future__ import annotations

import click

from common.errors import IcefleetError, TableNotFoundError
from common.ingest.routing import TableName
from workers.cli.context import connect, load_context, open_catalog_checked
from workers.cli.errors import errors


def _pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise click.BadParameter(f"{text!r}: expected OLD=NEW")
    return old, new


@click.command()
@click.argument("table")
@click.option(
    "--rename",
    "renames",
    multiple=True,
    metavar="OLD=NEW",
    help="Rename a data column; files written before read under NEW, and events that still "
    "carry OLD land in NEW. Repeatable.",
)
def evolve(table: str, renames: tuple[str, ...]) -> None:
    """Change the schema of TABLE (namespace.table) through the committer's lock."""
    # imported here, not with the CLI: pyiceberg takes seconds to import on a busy machine, and
    # `icefleet demo` starts its fleet before it needs it
    from common.coord.locks import table_lock
    from common.schema.evolution import rename_data_field

    try:
        name = TableName.parse(table)
    except IcefleetError as exc:
        raise click.BadParameter(str(exc), param_hint="TABLE") from None
    pairs = [_pair(r) for r in renames]
    if not pairs:
        raise click.UsageError("nothing to do: give at least one --rename OLD=NEW")
    with errors():
        context = load_context()
        client = connect(context)
        catalog = open_catalog_checked(context)
        settings = context.settings
        if not catalog.table_exists(name.parts):
            raise TableNotFoundError(str(name))
        with table_lock(client, str(name), settings):
            current = catalog.load_table(name.parts)
            for old, new in pairs:
                current = rename_data_field(current, old, new)
                click.echo(f"{name}: renamed {old} -> {new}")
        client.close()
