"""`manage.py runworker pinecall`: Channels' runworker, with the Pinecall connection
opened at start instead of on the first channel message, on the worker's own application."""

import sys

from channels.layers import get_channel_layer
from channels.management.commands.runworker import Command as ChannelsRunworker
from django.core.management import CommandError

from conversations.worker import EagerWorker, WorkerFailed, worker_application


class Command(ChannelsRunworker):
    help = "Run the Pinecall worker: `manage.py runworker pinecall`."

    def handle(self, *args, **options):
        layer = get_channel_layer(options["layer"])
        if layer is None:
            raise CommandError("You do not have any CHANNEL_LAYERS configured.")
        EagerWorker(
            application=worker_application, channels=options["channels"], channel_layer=layer
        ).run()
        if WorkerFailed.error is not None:
            self.stderr.write(f"worker stopped: {WorkerFailed.error}")
            sys.exit(2)
