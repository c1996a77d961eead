"""Rows in and out of the database in one statement, where the ORM would spend
more Python than the round trip costs.

Django's `bulk_update` builds a `CASE WHEN pk = … THEN …` per field and row:
for the ingest's batches (up to 500 conversations, seven columns) compiling
that costs more Python than the round trip it saves, and even for one row it
is the slowest statement before the commit that every live screen waits for.
On PostgreSQL `update_rows` sends `UPDATE … FROM UNNEST(…)` instead, one array
per column (as Django's own `bulk_create` does there): a statement of a few
placeholders whatever the rows, which psycopg need not parse per value.
Elsewhere (SQLite, the embedded demo) it is `bulk_update`. One row (most of the
live stream: a customer's message, one at a time) is a placeholder per value on
either: psycopg dumps scalars faster than one-element arrays. The statements are
made once per model and fields (`functools.cache`).

`insert_new` inserts what is not stored yet and says which it was, in one
statement (`ON CONFLICT DO NOTHING RETURNING`) where a read of the repeats and
then an insert were two. `columns`, `from_row` and `from_row_with` (a row with
a joined foreign key) turn written-out SELECTs into model instances, converted
as the ORM would.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from django.db import connection, connections, router

CHUNK = 5000  # rows per statement: bounds one statement's arrays
VALUES_CHUNK = 500  # rows per statement where each value is a placeholder (SQLite)


@functools.cache
def columns(model, alias: str) -> str:
    """The model's columns, qualified by `alias`, in the order `from_row` reads them."""
    return ", ".join(f'{alias}."{field.column}"' for field in model._meta.concrete_fields)


@functools.cache
def _converters(model) -> list[list[tuple]]:
    """Per column of `columns(model)`: the (converter, column) pairs the ORM applies."""
    converters = []
    for field in model._meta.concrete_fields:
        column = field.get_col(model._meta.db_table)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        converters.append([(converter, column) for converter in found])
    return converters


def from_row(model, values):
    """A model instance from a row of `columns(model)`, converted as the ORM would
    (SQLite gives datetimes as text)."""
    converted = []
    for value, field_converters in zip(values, _converters(model)):
        for converter, column in field_converters:
            value = converter(value, column, connection)
        converted.append(value)
    return model.from_db(connection.alias, [field.attname for field in model._meta.concrete_fields], converted)


def from_row_with(model, related: str, values):
    """From a row of `columns(model)` then `columns(<the model `related` points to>)` (a
    LEFT JOIN): the instance with that related object cached (None where the join
    found nothing), and the values after both, as a list."""
    field = model._meta.get_field(related)
    target = field.related_model
    n, m = len(model._meta.concrete_fields), len(target._meta.concrete_fields)
    obj = from_row(model, values[:n])
    joined = values[n : n + m]
    field.set_cached_value(obj, from_row(target, joined) if joined[0] is not None else None)
    return obj, list(values[n + m :])


def insert_new(objs: Iterable, *, unique: str) -> list:
    """Insert the objects (one model, primary keys unset) whose `unique` field holds
    a value not stored yet; returns those inserted, their primary keys set.

    A repeat (stored already, or earlier in `objs`) is left out. An object whose
    `unique` is NULL never conflicts, so it is always inserted.
    """
    objs = list(objs)
    if not objs:
        return []
    model = type(objs[0])
    db = connections[router.db_for_write(model)]
    fields, head, tail, arrays = _insert_sql(model, unique, db.alias)
    rows = [[field.get_db_prep_save(field.pre_save(obj, True), db) for field in fields] for obj in objs]
    returned: list = []
    with db.cursor() as cursor:
        if db.vendor == "postgresql" and len(rows) > 1:
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                cursor.execute(f"{head} SELECT * FROM UNNEST({arrays}) {tail}", [list(c) for c in zip(*chunk)])
                returned += cursor.fetchall()
        else:  # one row (most of the live stream), or SQLite: a placeholder per value
            one = "(" + ", ".join(["%s"] * len(fields)) + ")"
            for start in range(0, len(rows), VALUES_CHUNK):
                chunk = rows[start : start + VALUES_CHUNK]
                values = ", ".join([one] * len(chunk))
                cursor.execute(f"{head} VALUES {values} {tail}", [v for row in chunk for v in row])
                returned += cursor.fetchall()
    # Rows come back in the order given (as Django's bulk_create relies on), repeats
    # skipped: walk both together.
    at = fields.index(model._meta.get_field(unique))
    inserted = []
    pending = iter(returned)
    row = next(pending, None)
    for obj, values in zip(objs, rows):
        if row is not None and row[1] == values[at]:
            obj.pk = row[0]
            obj._state.adding, obj._state.db = False, db.alias
            inserted.append(obj)
            row = next(pending, None)
    return inserted


@functools.cache
def _insert_sql(model, unique: str, alias: str) -> tuple[list, str, str, str]:
    """`insert_new`'s statement parts, made once per model: asking each field its
    column type took longer than the one-row statement's round trip."""
    db = connections[alias]
    meta = model._meta
    quote = db.ops.quote_name
    fields = [field for field in meta.concrete_fields if field is not meta.pk]
    into = ", ".join(quote(field.column) for field in fields)
    head = f"INSERT INTO {quote(meta.db_table)} ({into})"
    key = meta.get_field(unique)
    tail = f"ON CONFLICT ({quote(key.column)}) DO NOTHING RETURNING {quote(meta.pk.column)}, {quote(key.column)}"
    arrays = ", ".join(f"%s::{_array_type(field, db)}[]" for field in fields)
    return fields, head, tail, arrays


def _array_type(field, db) -> str:
    """The field's column type without a length, for an array cast (varchar[], not varchar(200)[])."""
    return field.db_type(db).split("(")[0]


def update_rows(objs: Iterable, fields: Iterable[str]) -> int:
    """Save `fields` of every object in `objs` (one model), as `bulk_update` would.

    Like `bulk_update`, no `pre_save` runs: set `auto_now` fields yourself.
    Returns how many rows were updated.
    """
    objs = list(objs)
    names = tuple(dict.fromkeys(fields))  # each column once, in order
    if not objs or not names:
        return 0
    model = type(objs[0])
    connection = connections[router.db_for_write(model)]
    columns, one_row, many_rows = _update_sql(model, names, connection.alias)
    if len(objs) == 1:  # most of the live stream: a placeholder per value, any database
        obj = objs[0]
        values = [column.get_db_prep_save(getattr(obj, column.attname), connection) for column in columns]
        with connection.cursor() as cursor:
            cursor.execute(one_row, [*values[1:], values[0]])
            return cursor.rowcount
    if connection.vendor != "postgresql":
        return model.objects.bulk_update(objs, list(names))
    updated = 0
    with connection.cursor() as cursor:
        for start in range(0, len(objs), CHUNK):
            chunk = objs[start : start + CHUNK]
            cursor.execute(
                many_rows,
                [
                    [column.get_db_prep_save(getattr(obj, column.attname), connection) for obj in chunk]
                    for column in columns
                ],
            )
            updated += cursor.rowcount
    return updated


@functools.cache
def _update_sql(model, names: tuple[str, ...], alias: str) -> tuple[list, str, str]:
    """`update_rows`' columns (the primary key first) and its two statements: one row
    (`SET c = %s … WHERE pk = %s`) and many (PostgreSQL's `UPDATE … FROM UNNEST`,
    an array per column), made once per model and set of fields."""
    connection = connections[alias]
    meta = model._meta
    columns = [meta.pk, *(meta.get_field(name) for name in names)]
    quote = connection.ops.quote_name
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    one_row = (
        f"UPDATE {table} SET " + ", ".join(f"{quote(c.column)} = %s" for c in columns[1:]) + f" WHERE {pk} = %s"
    )
    if connection.vendor != "postgresql":
        return columns, one_row, ""
    arrays = ", ".join(f"%s::{_array_type(column, connection)}[]" for column in columns)
    into = ", ".join(quote(column.column) for column in columns)
    assign = ", ".join(f"{quote(c.column)} = v.{quote(c.column)}" for c in columns[1:])
    many_rows = f"UPDATE {table} AS t SET {assign} FROM UNNEST({arrays}) AS v({into}) WHERE t.{pk} = v.{pk}"
    return columns, one_row, many_rows
