"""``icefleet evolve``: schema changes an operator asks for, applied under the table lock."""

from __future__ import annotations

import click

from common.errors import IcefleetError
from common.ingest.routing import TableName
from common.settings import load_settings


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
    import redis

    from common.coord.locks import table_lock
    from common.lake.catalog import open_catalog
    from common.schema.evolution import rename_data_field

    try:
        name = TableName.parse(table)
        pairs = [_pair(r) for r in renames]
        if not pairs:
            raise click.UsageError("nothing to do: give at least one --rename OLD=NEW")
        settings = load_settings()
        catalog = open_catalog(settings)
        client = redis.Redis.from_url(settings.redis_url)
        with table_lock(client, str(name), settings):
            current = catalog.load_table(name.parts)
            for old, new in pairs:
                current = rename_data_field(current, old, new)
                click.echo(f"{name}: renamed {old} -> {new}")
    except IcefleetError as exc:
        raise click.ClickException(str(exc)) from None
