"""``python -m pinecall_sdk.simulator`` as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]


async def start_cli(*args: str) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """Start the CLI on a free port (--port 0); return it, its port and its first log lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pinecall_sdk.simulator", "--port", "0", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    async with asyncio.timeout(15):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"the simulator exited: {''.join(lines)}")
            lines.append(line)
            found = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/client", line)
            if found:
                return proc, int(found.group(1)), lines


async def connect_when_up(port: int):
    return await connect(f"ws://127.0.0.1:{port}/client")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_cli_serves_logs_frames_and_stops_cleanly(sig):
    proc, port, _ = await start_cli("--api-key", "secret", "--ai-delay", "0", "--status-delay", "0")
    try:
        ws = await connect_when_up(port)
        await ws.send(json.dumps({"event": "connect", "api_key": "secret"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"event": "connected"}
        await ws.send(json.dumps({"event": "agent.create", "agent_id": "support"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {
            "event": "agent.created", "agent_id": "support"}
        await ws.send(json.dumps({"event": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"event": "pong"}

        proc.send_signal(sig)
        returncode = await asyncio.wait_for(proc.wait(), 10)
        assert returncode == 0
        # The server said goodbye with a close frame (1001 going away).
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert getattr(info.value, "rcvd", None) is not None and info.value.rcvd.code == 1001
        stderr = (await proc.stderr.read()).decode()
        assert "Traceback" not in stderr
        assert '<- {"event": "ping"}' in stderr and '-> {"event":"pong"}' in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_a_wrong_key():
    proc, port, _ = await start_cli("--api-key", "secret")
    try:
        ws = await connect_when_up(port)
        await ws.send(json.dumps({"event": "connect", "api_key": "nope"}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["code"] == "UNAUTHORIZED"
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1008
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_cli_demo_mode_writes_in():
    proc, port, _ = await start_cli("--demo", "--ai-delay", "0.1")
    try:
        ws = await connect_when_up(port)
        for frame in ({"event": "connect", "api_key": "k"},
                      {"event": "agent.create", "agent_id": "support"},
                      {"event": "channel.add", "agent_id": "support", "type": "whatsapp",
                       "ref": "1", "accessToken": "t"}):
            await ws.send(json.dumps(frame))
        events = []
        async with asyncio.timeout(5):
            while "whatsapp.message" not in events:
                events.append(json.loads(await ws.recv())["event"])
        assert events[:2] == ["connected", "agent.created"]
        assert "whatsapp.session_started" in events
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_cli_demo_mode_calls_the_phone_number_the_client_added():
    proc, port, _ = await start_cli("--demo", "--demo-speed", "20", "--voice-pace", "0")
    try:
        ws = await connect_when_up(port)
        for frame in ({"event": "connect", "api_key": "k"},
                      {"event": "agent.create", "agent_id": "support", "llm": "openai/gpt-4.1-mini"},
                      {"event": "channel.add", "agent_id": "support", "type": "phone",
                       "ref": "+13186330963"}):
            await ws.send(json.dumps(frame))
        events = []
        async with asyncio.timeout(10):
            while "bot.finished" not in events:
                events.append(json.loads(await ws.recv())["event"])
        assert events[:3] == ["connected", "agent.created", "channel.added"]
        assert events.index("call.started") < events.index("user.message") < events.index("bot.speaking")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
