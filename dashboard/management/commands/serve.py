"""`manage.py serve`: the whole product in one process, for a laptop or a demo.

Daphne serves the dashboard, the Pinecall worker runs on the same event loop
(so the in-process channel layer reaches every socket), and, unless
PINECALL_API_KEY is set, a Pinecall simulator in demo mode feeds it believable
customers. Production runs these as separate processes instead (see README).
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.core.management.base import BaseCommand

logger = logging.getLogger("conversations.serve")


DEMO_PHONE_NUMBER = "+15555550100"


class Command(BaseCommand):
    help = "Serve the dashboard, the worker and (without PINECALL_API_KEY) the demo simulator."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--no-simulator",
            action="store_true",
            help="Do not start the simulator, even without PINECALL_API_KEY.",
        )

    def handle(self, *args, host: str, port: int, no_simulator: bool, **options):
        # daphne.server installs Twisted's asyncio reactor: import it before the reactor.
        from daphne.server import Server
        from twisted.internet import defer, reactor

        from channels.layers import get_channel_layer
        from conversations.notify import WORKER_CHANNEL
        from conversations.worker import EagerWorker, worker_application
        from dashboard.asgi import application

        loop = reactor._asyncioEventloop
        background: list[asyncio.Task] = []
        simulator = None
        worker = EagerWorker(
            application=worker_application, channels=[WORKER_CHANNEL], channel_layer=get_channel_layer()
        )
        worker.install_signal_handlers = False

        async def start_background() -> None:
            nonlocal simulator
            if not settings.PINECALL_API_KEY and not no_simulator:
                from pinecall_sdk.simulator import Simulator

                # One line per stored event is enough on a console; not every frame twice.
                for name in ("pinecall_sdk.simulator", "websockets"):
                    logging.getLogger(name).setLevel(logging.WARNING)
                simulator = Simulator(host="127.0.0.1", port=0, ai_delay=0.8, demo=True)
                await simulator.start()
                settings.PINECALL_URL = simulator.url
                if not settings.PINECALL_PHONE_NUMBERS:
                    # A demo number, so the simulator's callers ring too.
                    settings.PINECALL_PHONE_NUMBERS = [DEMO_PHONE_NUMBER]
                self.stdout.write(
                    f"Pinecall simulator (demo customers and callers on {DEMO_PHONE_NUMBER}) at {simulator.url}"
                )
            background.append(asyncio.ensure_future(worker.arun()))

        async def stop_background() -> None:
            worker.request_stop()
            await asyncio.wait(background, timeout=5)
            if simulator is not None:
                await simulator.stop()

        def on_ready() -> None:
            reactor.callWhenRunning(lambda: loop.create_task(start_background()))
            reactor.addSystemEventTrigger(
                "before",
                "shutdown",
                lambda: defer.Deferred.fromFuture(loop.create_task(stop_background())),
            )
            self.stdout.write(f"Dashboard at http://{host}:{port}/  (Ctrl+C stops everything)")

        Server(
            application=application,
            endpoints=[f"tcp:port={port}:interface={host}"],
            signal_handlers=True,
            ready_callable=on_ready,
        ).run()
