"""Trigram indexes for the inbox search (substring matches on name, phone and text).

Django's `icontains` on PostgreSQL is `UPPER(col::text) LIKE UPPER(%q%)`: the
indexes are on that expression so the planner can use them.

PostgreSQL only: SQLite has no pg_trgm, and an embedded install is small enough
to scan.
"""

from django.db import migrations

INDEXES = {
    "conv_name_trgm": ("conversations_conversation", "contact_name"),
    "conv_phone_trgm": ("conversations_conversation", "contact_phone"),
    "msg_text_trgm": ("conversations_message", "text"),
}


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, (table, column) in INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON {table} "
            f"USING gin ((UPPER({column}::text)) gin_trgm_ops)"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0003_inbox_indexes")]

    operations = [migrations.RunPython(create, drop)]
