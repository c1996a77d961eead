"""``python -m pinecall_sdk.simulator``: run the simulated Pinecall server.

Logs one line per frame in and out at INFO; stops cleanly on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .server import Simulator

log = logging.getLogger("pinecall_sdk.simulator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pinecall_sdk.simulator",
        description="A local Pinecall server simulator (WhatsApp, phone calls, human takeover).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free)")
    p.add_argument("--demo", action="store_true",
                   help="simulated customers write in as soon as a WhatsApp agent connects, and "
                        "callers ring the phone numbers the client adds (the first within a few "
                        "seconds, then about every --call-interval seconds)")
    p.add_argument("--demo-speed", type=float, default=1.0,
                   help="demo timing factor, > 1 is faster (default 1)")
    p.add_argument("--call-interval", type=float, default=60.0,
                   help="seconds between demo phone calls (default 60)")
    p.add_argument("--voice-pace", type=float, default=0.3,
                   help="seconds per spoken word in calls (default 0.3)")
    p.add_argument("--call-idle-timeout", type=float, default=30.0,
                   help="seconds of silence before a call ends (default 30)")
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="accepted API key (repeatable; default: accept any non-empty key)")
    p.add_argument("--ai-delay", type=float, default=0.4,
                   help="seconds before the AI answers (default 0.4)")
    p.add_argument("--status-delay", type=float, default=0.5,
                   help="seconds between sent/delivered/read statuses (default 0.5)")
    p.add_argument("--idle-timeout", type=float, default=7200.0,
                   help="seconds without activity before a session ends (default 7200)")
    p.add_argument("--resume-grace", type=float, default=60.0,
                   help="seconds an agent is held for agent.resumed after a drop (default 60)")
    p.add_argument("--on-duplicate-agent", choices=("displace", "conflict"), default="displace")
    p.add_argument("--capacity", type=int, default=None, help="maximum number of online agents")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    sim = Simulator(
        host=args.host,
        port=args.port,
        api_keys=args.api_keys,
        ai_delay=args.ai_delay,
        status_delay=args.status_delay,
        idle_timeout=args.idle_timeout,
        resume_grace=args.resume_grace,
        on_duplicate_agent=args.on_duplicate_agent,
        capacity=args.capacity,
        demo=args.demo,
        demo_speed=args.demo_speed,
        demo_call_interval=args.call_interval,
        voice_pace=args.voice_pace,
        call_idle_timeout=args.call_idle_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # e.g. Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    async with sim:
        await stop.wait()
        log.info("shutting down")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
