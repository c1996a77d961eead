"""`manage.py runworker pinecall`: Channels' runworker, with the Pinecall connection
opened at start instead of on the first channel message."""

import sys

from channels.management.commands.runworker import Command as ChannelsRunworker

from conversations.worker import EagerWorker, WorkerFailed


class Command(ChannelsRunworker):
    help = "Run the Pinecall worker: `manage.py runworker pinecall`."
    worker_class = EagerWorker

    def handle(self, *args, **options):
        super().handle(*args, **options)
        if WorkerFailed.error is not None:
            self.stderr.write(f"worker stopped: {WorkerFailed.error}")
            sys.exit(2)
