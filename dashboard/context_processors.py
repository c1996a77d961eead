from django.conf import settings

from conversations.selectors import agent_state_for_display


def agent_state(request):
    """The kill switch and the worker's link, shown on every page."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    return {"agent_state": agent_state_for_display(settings.PINECALL_AGENT_ID)}
