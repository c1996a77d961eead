"""Writing many rows, each with its own values, in one statement.

Django's `bulk_update` builds a `CASE WHEN pk = … THEN …` per field and row:
for the ingest's batches (up to 500 conversations, seven columns) compiling
that costs more Python than the round trip it saves, and even for one row it
is the slowest statement before the commit that every live screen waits for.
On PostgreSQL `update_rows` sends `UPDATE … FROM UNNEST(…)` instead, one array
per column (as Django's own `bulk_create` does there): a statement of a few
placeholders whatever the rows, which psycopg need not parse per value.
Elsewhere (SQLite, the embedded demo) it is `bulk_update`.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connections, router

CHUNK = 5000  # rows per statement: bounds one statement's arrays


def update_rows(objs: Iterable, fields: Iterable[str]) -> int:
    """Save `fields` of every object in `objs` (one model), as `bulk_update` would.

    Like `bulk_update`, no `pre_save` runs: set `auto_now` fields yourself.
    Returns how many rows were updated.
    """
    objs = list(objs)
    names = list(dict.fromkeys(fields))  # each column once, in order
    if not objs or not names:
        return 0
    model = type(objs[0])
    connection = connections[router.db_for_write(model)]
    if connection.vendor != "postgresql":
        return model.objects.bulk_update(objs, names)
    meta = model._meta
    columns = [meta.pk, *(meta.get_field(name) for name in names)]
    quote = connection.ops.quote_name
    # An array per column, cast to its type (without a length: varchar[], not varchar(200)[]).
    arrays = ", ".join(f"%s::{column.db_type(connection).split('(')[0]}[]" for column in columns)
    into = ", ".join(quote(column.column) for column in columns)
    assign = ", ".join(f"{quote(c.column)} = v.{quote(c.column)}" for c in columns[1:])
    pk = quote(meta.pk.column)
    sql = (
        f"UPDATE {quote(meta.db_table)} AS t SET {assign} "
        f"FROM UNNEST({arrays}) AS v({into}) WHERE t.{pk} = v.{pk}"
    )
    updated = 0
    with connection.cursor() as cursor:
        for start in range(0, len(objs), CHUNK):
            chunk = objs[start : start + CHUNK]
            cursor.execute(
                sql,
                [
                    [column.get_db_prep_save(getattr(obj, column.attname), connection) for obj in chunk]
                    for column in columns
                ],
            )
            updated += cursor.rowcount
    return updated
