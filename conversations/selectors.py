"""Every read the dashboard makes. Services write; these only read."""

from __future__ import annotations

from conversations.models import AgentState


def agent_state_for_display(agent_id: str) -> AgentState:
    """The agent's state without writing: an unsaved default before the worker's first run."""
    return AgentState.objects.filter(agent_id=agent_id).first() or AgentState(agent_id=agent_id)
