from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_conversation_start(apps, schema_editor):
    Takeover = apps.get_model("conversations", "Takeover")
    Conversation = apps.get_model("conversations", "Conversation")
    Takeover.objects.update(
        conversation_started_at=Subquery(
            Conversation.objects.filter(pk=OuterRef("conversation_id")).values("started_at")[:1]
        )
    )


class Migration(migrations.Migration):

    dependencies = [
        ("conversations", "0015_canned_replies_and_notes"),
    ]

    operations = [
        migrations.AddField(
            model_name="takeover",
            name="conversation_started_at",
            field=models.DateTimeField(null=True),
        ),
        migrations.RunPython(copy_conversation_start, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="takeover",
            name="conversation_started_at",
            field=models.DateTimeField(),
        ),
        migrations.AddIndex(
            model_name="takeover",
            index=models.Index(fields=["conversation_started_at", "conversation"], name="takeover_conv_started"),
        ),
    ]
