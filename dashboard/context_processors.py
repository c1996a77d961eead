from django.conf import settings
from django.utils.functional import SimpleLazyObject

from conversations import services
from conversations.selectors import (
    agent_open_command,
    agent_state_for_display,
    calls_asking_for_a_person,
    worker_processes,
)


def agent_state(request):
    """The kill switch and the worker's link, shown on every page.

    Lazy: a fragment that does not show the banner costs no query.
    """
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    agent_id = settings.PINECALL_AGENT_ID
    return {
        "agent_state": SimpleLazyObject(lambda: agent_state_for_display(agent_id)),
        "agent_pending": SimpleLazyObject(lambda: agent_open_command(agent_id) or False),
        "workers": SimpleLazyObject(lambda: worker_processes(agent_id)),
        "alerts": SimpleLazyObject(lambda: services.alert_preferences_get(request.user)),
        "calls_waiting": SimpleLazyObject(calls_asking_for_a_person),
    }
