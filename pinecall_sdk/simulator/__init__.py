"""A local simulator of the Pinecall server (WhatsApp, phone calls, human takeover).

It speaks the wire protocol of ``/work/shared/pinecall-protocol.md`` and
``/work/shared/pinecall-voice-protocol.md`` over a real WebSocket, so the SDK client and the dashboard can be developed and
tested without the real service. It knows nothing of Django.

    from pinecall_sdk.simulator import Simulator

    async with Simulator(ai_delay=0.4) as sim:
        print(sim.url)  # clients connect to f"{sim.url}/client"
        await sim.customer_says(phone="34612345678", name="Ana", text="Where is my order?")
        # once a client added +13186330963 with channel.add type phone:
        call_id = await sim.place_call(to="+13186330963", from_="+14155550123",
                                       script=["Where is my order 48213?", {"hangup": True}])

Or from a shell: ``python -m pinecall_sdk.simulator --port 8765 --demo``.
The choices it makes where the protocol is silent are listed in
``pinecall_sdk/simulator/server.py`` and ``voice.py``.
"""

from .server import CommandError, Simulator
from .state import AgentState, Call, Session, Step, parse_script
from .voice import CallPlayer, Speech

__all__ = ["AgentState", "Call", "CallPlayer", "CommandError", "Session", "Simulator", "Speech",
           "Step", "parse_script"]
