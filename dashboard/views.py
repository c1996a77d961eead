"""The operators' pages and their htmx actions.

Reads go through `conversations.selectors`, writes through
`conversations.services`; nothing here touches a model's rows directly. Actions
are htmx POSTs answered with out-of-band fragments (the header, the composer,
a toast, a new bubble) rendered by the same partials as the page, with a 4xx
status when the action was refused (htmx is configured to swap 403/409/422).
"""

from __future__ import annotations

from functools import partial, wraps
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render, resolve_url
from django.templatetags.static import static
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_POST

from conversations import operator_tools_selectors, selectors, services
from conversations.models import Conversation
from conversations.services import HeldByAnother
from dashboard import rendering

NOT_ALLOWED = "You are not allowed to do this."


def login_required(view):
    """Django's login_required, but an htmx request is told to load the login page."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if request.user.is_authenticated:
            return view(request, *args, **kwargs)
        if request.htmx:
            current = request.htmx.current_url_abs_path or request.get_full_path()
            response = HttpResponse(status=401)
            response["HX-Redirect"] = (
                f"{resolve_url(settings.LOGIN_URL)}?{urlencode({'next': current})}"
            )
            return response
        return redirect_to_login(request.get_full_path())

    return wrapper


# ---------------------------------------------------------------- pages


def _int(value, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _inbox_context(request: HttpRequest, *, path: str) -> dict:
    f = selectors.inbox_filter_key(request.GET.get("f"))
    q = (request.GET.get("q") or "").strip()[:100]
    page = max(1, _int(request.GET.get("page"), 1) or 1)
    # A live refresh keeps the pages the operator has loaded with "Load more".
    pages = min(max(1, _int(request.GET.get("pages"), 1) or 1), settings.INBOX_PAGES_KEPT)
    rows, has_more = selectors.inbox_page(
        user=request.user, filter=f, q=q, page=page, pages=pages
    )
    next_page = page + pages
    more_query = urlencode({k: v for k, v in (("f", f), ("q", q), ("page", next_page)) if v})
    return {
        "filters": selectors.INBOX_FILTERS,
        "counts": selectors.inbox_counts(user=request.user),
        "f": f,
        "q": q,
        "page": page,
        "rows": rendering.with_viewers(rows),
        "has_more": has_more,
        "next_page": next_page,
        "page_size": settings.INBOX_PAGE_SIZE,
        "inbox_path": path,
        "more_url": f"{path}?{more_query}",
    }


def _inbox_fragment(request: HttpRequest, ctx: dict) -> HttpResponse | None:
    """The inbox's own htmx requests (tabs, search, load more), on any page that shows it."""
    if not request.htmx:
        return None
    if request.htmx.target == "inbox-body":
        return render(request, "conversations/_inbox_body.html", ctx)
    if request.htmx.target == "inbox-more":
        return render(request, "conversations/_inbox_rows.html", ctx)
    return None


def _live_url(
    *, since: float, conversation_id: int | None = None, after: int = 0, call_id: int | None = None,
    calls: bool = False,
) -> str:
    params = {}
    if conversation_id:
        params = {"conversation": conversation_id, "after": after}
    if call_id:
        params["call"] = call_id
    if calls:
        params["calls"] = 1
    params["since"] = f"{since:.3f}"
    return f"/ws/live/?{urlencode(params)}"


@login_required
@require_GET
def inbox(request: HttpRequest) -> HttpResponse:
    since = timezone.now().timestamp()  # before any read: the socket catches up from here
    ctx = _inbox_context(request, path=request.path)
    fragment = _inbox_fragment(request, ctx)
    if fragment is not None:
        return fragment
    ctx.update(live_since=since, live_url=_live_url(since=since))
    return render(request, "conversations/inbox.html", ctx)


def _conversation_or_404(pk: int) -> Conversation:
    try:
        return selectors.conversation_get(pk)
    except Conversation.DoesNotExist:
        raise Http404("No such conversation.") from None


def _conversation_context(request: HttpRequest, conversation: Conversation, **extra) -> dict:
    """The header's and composer's context, from the conversation as read now with its
    facts (one read: an action's answer shows what the action left)."""
    facts = selectors.conversation_facts(conversation)
    conversation = facts.conversation
    return {
        "conversation": conversation,
        "st": selectors.conversation_state(conversation=conversation, user=request.user, facts=facts),
        "max_length": settings.MESSAGE_MAX_LENGTH,
        **extra,
    }


@login_required
@require_GET
def conversation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    since = timezone.now().timestamp()
    conversation = _conversation_or_404(pk)
    if not request.htmx and conversation.held_by_id == request.user.pk and conversation.unread_count:
        # Before the inbox is read: its row for this conversation shows it read.
        services.conversation_mark_read(conversation=conversation, operator=request.user)
    ctx = _inbox_context(request, path=request.path)
    fragment = _inbox_fragment(request, ctx)
    if fragment is not None:
        return fragment
    messages, has_earlier = selectors.conversation_messages(conversation_id=pk)
    after = messages[-1].pk if messages else 0
    ctx.update(
        _conversation_context(request, conversation),
        messages=messages,
        has_earlier=has_earlier,
        live_since=since,
        live_url=_live_url(since=since, conversation_id=pk, after=after),
        brief=selectors.handoff_brief(conversation),
        viewers=selectors.conversation_viewers([pk]).get(pk, []),
        panel=operator_tools_selectors.contact_panel(conversation),
    )
    return render(request, "conversations/conversation.html", ctx)


@login_required
@require_GET
def conversation_state(request: HttpRequest, pk: int) -> HttpResponse:
    """This user's header and composer, out of band (what a live `conversation.state` renders)."""
    conversation = _conversation_or_404(pk)
    return _state_response(request, conversation)


@login_required
@require_GET
def conversation_earlier(request: HttpRequest, pk: int) -> HttpResponse:
    """Older messages, for the "Load earlier" button at the top of a long history."""
    conversation = _conversation_or_404(pk)
    messages, has_earlier = selectors.conversation_messages(
        conversation_id=pk, before=_int(request.GET.get("before"))
    )
    return render(
        request,
        "conversations/_earlier.html",
        {"conversation": conversation, "messages": messages, "has_earlier": has_earlier},
    )


@login_required
@require_GET
def agent_state(request: HttpRequest) -> HttpResponse:
    """This user's agent banner (the kill switch's buttons depend on their permission)."""
    return render(request, "conversations/_agent_state.html")


def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico whatever the page says."""
    return redirect(static("favicon.svg"))


# ---------------------------------------------------------------- actions


def _toast(message: str, level: str = "error") -> str:
    return render_to_string("conversations/_toast.html", {"message": message, "level": level})


def _state_response(
    request: HttpRequest,
    conversation: Conversation,
    *,
    status: int = 200,
    error: str = "",
    draft: str | None = None,
    toast: str = "",
    toast_level: str = "info",
    extra: str = "",
) -> HttpResponse:
    """The conversation's header and composer for this user, plus any toast or bubble.

    A plain form post (a click before htmx had wired the form) gets the page back.
    """
    if request.method == "POST" and not request.htmx:
        if status >= 400:
            # A plain form post that was refused says so; it is not a success.
            return render(
                request,
                "refused.html",
                {"message": toast or error, "back": resolve_url("conversation", pk=conversation.pk)},
                status=status,
            )
        return redirect("conversation", pk=conversation.pk)
    ctx = _conversation_context(request, conversation, oob=True, error=error, draft=draft)
    html = render_to_string("conversations/_conversation_state.html", ctx, request=request)
    if toast:
        html += _toast(toast, toast_level)
    return HttpResponse(html + extra, status=status)


def _refusal(exc: Exception) -> tuple[int, str]:
    """The HTTP status and the human message for a service's refusal."""
    if isinstance(exc, PermissionDenied):
        return 403, str(exc) or NOT_ALLOWED
    if isinstance(exc, ValidationError):
        return 422, " ".join(exc.messages)
    if isinstance(exc, HeldByAnother):
        # The holder's name isolated: a right-to-left name cannot reorder the sentence.
        return 409, format_html(exc.MESSAGE, holder=format_html("<bdi>{}</bdi>", exc.holder_name))
    return 409, str(exc)  # ActionRefused


REFUSALS = services.REFUSALS


def _conversation_action(request: HttpRequest, pk: int, action, *, done: str = "") -> HttpResponse:
    """`action(pk)`, then this user's header and composer as the action left them.

    The action reads (and locks) the conversation itself: reading it here first
    was one more statement before the commit that the worker, and so every
    viewer's confirmation, waits for.
    """
    try:
        action(pk)
    except Conversation.DoesNotExist:
        raise Http404("No such conversation.") from None
    except REFUSALS as exc:
        # Refused before the action read it, perhaps (no permission): is it there at all?
        conversation = _conversation_or_404(pk)
        status, message = _refusal(exc)
        return _state_response(
            request, conversation, status=status, toast=message, toast_level="error"
        )
    # Only its pk is used: the answer reads the conversation's facts fresh.
    return _state_response(request, Conversation(pk=pk), toast=done)


def _contact_action(pk: int, action):
    """`action(contact_phone=…, agent_id=…)` for the contact of conversation `pk`."""
    conversation = _conversation_or_404(pk)
    return action(contact_phone=conversation.contact_phone, agent_id=conversation.agent_id)


def _force(request: HttpRequest) -> bool:
    return request.POST.get("force") in ("1", "true", "on")


@login_required
@require_POST
def take_over(request: HttpRequest, pk: int) -> HttpResponse:
    return _conversation_action(
        request,
        pk,
        lambda pk: services.conversation_take_over(
            conversation=pk, operator=request.user, force=_force(request)
        ),
    )


@login_required
@require_POST
def hand_back(request: HttpRequest, pk: int) -> HttpResponse:
    return _conversation_action(
        request,
        pk,
        lambda pk: services.conversation_hand_back(
            conversation=pk, operator=request.user, force=_force(request)
        ),
    )


@login_required
@require_POST
def take_next(request: HttpRequest) -> HttpResponse:
    """Take over the customer who has waited longest, and open them."""
    try:
        conversation = services.conversation_take_next(operator=request.user)
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return HttpResponse(_toast(message, "error"), status=status)
    if conversation is None:
        return HttpResponse(_toast("Nobody is waiting for a person right now.", "info"))
    url = resolve_url("conversation", pk=conversation.pk)
    if not request.htmx:
        return redirect(url)
    response = HttpResponse(status=204)
    response["HX-Redirect"] = url
    return response


@login_required
@require_POST
def alert_preferences(request: HttpRequest) -> HttpResponse:
    """This person's alert switches (sound, tab title, desktop), kept on the server."""
    preferences = services.alert_preferences_set(
        user=request.user,
        sound=request.POST.get("sound") == "on",
        title=request.POST.get("title") == "on",
        desktop=request.POST.get("desktop") == "on",
    )
    html = render_to_string(
        "conversations/_alert_preferences.html", {"alerts": preferences, "oob": True}, request=request
    )
    return HttpResponse(html + _toast("Alert settings saved.", "ok"))


@login_required
@require_POST
def keep(request: HttpRequest, pk: int) -> HttpResponse:
    """"Keep it": the holder's idle clock starts again."""
    return _conversation_action(
        request,
        pk,
        lambda pk: services.conversation_keep(conversation=pk, operator=request.user),
        done="Kept: the idle clock starts again.",
    )


@login_required
@require_POST
def send(request: HttpRequest, pk: int) -> HttpResponse:
    text = request.POST.get("text", "")
    try:
        # Given the pk: the service reads and locks the conversation (see _conversation_action).
        message = services.conversation_send(conversation=pk, operator=request.user, text=text)
    except Conversation.DoesNotExist:
        raise Http404("No such conversation.") from None
    except REFUSALS as exc:
        conversation = _conversation_or_404(pk)
        status, error = _refusal(exc)
        # The composer keeps what was typed, with the reason beside it.
        return _state_response(request, conversation, status=status, error=error, draft=text)
    bubble = render_to_string("conversations/_message_live.html", {"message": message, "new": True})
    return _state_response(request, message.conversation, draft="", extra=bubble)


@login_required
@require_POST
def mark_read(request: HttpRequest, pk: int) -> HttpResponse:
    """The holder is looking at the conversation as new messages arrive."""
    conversation = _conversation_or_404(pk)
    services.conversation_mark_read(conversation=conversation, operator=request.user)
    return HttpResponse(status=204)


@login_required
@require_POST
def pause_contact(request: HttpRequest, pk: int) -> HttpResponse:
    return _conversation_action(
        request,
        pk,
        lambda pk: _contact_action(
            pk, partial(services.contact_pause, operator=request.user)
        ),
        done="Pausing the AI for this contact… waiting for Pinecall.",
    )


@login_required
@require_POST
def resume_contact(request: HttpRequest, pk: int) -> HttpResponse:
    return _conversation_action(
        request,
        pk,
        lambda pk: _contact_action(
            pk, partial(services.contact_resume, operator=request.user)
        ),
        done="Resuming the AI for this contact… waiting for Pinecall.",
    )


def _agent_action(request: HttpRequest, action, *, done: str) -> HttpResponse:
    status, toast, level = 200, done, "info"
    try:
        action(operator=request.user)
    except REFUSALS as exc:
        status, toast = _refusal(exc)
        level = "error"
    html = render_to_string(
        "conversations/_agent_state.html", {"oob": True}, request=request
    ) + _toast(toast, level)
    return HttpResponse(html, status=status)


@login_required
@require_POST
def agent_pause(request: HttpRequest) -> HttpResponse:
    return _agent_action(
        request, services.agent_pause, done="Pausing the AI everywhere… waiting for Pinecall."
    )


@login_required
@require_POST
def agent_resume(request: HttpRequest) -> HttpResponse:
    return _agent_action(
        request, services.agent_resume, done="Resuming the AI everywhere… waiting for Pinecall."
    )


# ---------------------------------------------------------------- voice calls


@login_required
@require_GET
def calls(request: HttpRequest) -> HttpResponse:
    """Live calls (caller, a ticking duration, who speaks) and the ended ones."""
    since = timezone.now().timestamp()
    return render(
        request,
        "calls/calls.html",
        {
            "live_calls": selectors.calls_live(),
            "ended_calls": selectors.calls_ended(),
            "live_since": since,
            "live_url": _live_url(since=since, calls=True),
        },
    )


@login_required
@require_GET
def call_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One call: its stored lines, and live captions while it lasts."""
    since = timezone.now().timestamp()
    call = selectors.call_find(pk)
    if call is None:
        raise Http404("No such call.")
    return render(
        request,
        "calls/call.html",
        {
            "call": call,
            "lines": selectors.call_lines(call),
            "my_phone": selectors.operator_phone(request.user),
            "live_since": since,
            "live_url": _live_url(since=since, call_id=call.pk),
        },
    )


def _call_action(request: HttpRequest, pk: int, action, done: str) -> HttpResponse:
    call = selectors.call_find(pk)
    if call is None:
        raise Http404("No such call.")
    try:
        action(call)
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return HttpResponse(_toast(message, "error"), status=status)
    return HttpResponse(_toast(done, "ok"))


@login_required
@require_POST
def call_say(request: HttpRequest, pk: int) -> HttpResponse:
    return _call_action(
        request, pk,
        lambda call: services.call_say(call=call, operator=request.user, text=request.POST.get("text", "")),
        "The AI will say your line.",
    )


# What the toast says once a supervisor's command is queued; the page follows when Pinecall confirms.
CALL_COMMAND_QUEUED = {
    "hangup": "Hanging up…",
    "stop": "Stopping the AI's speech…",
    "hold": "Putting the caller on hold…",
    "unhold": "Taking the caller off hold…",
    "mute": "Muting the caller…",
    "unmute": "Unmuting the caller…",
}


@login_required
@require_POST
def call_supervise(request: HttpRequest, pk: int, kind: str) -> HttpResponse:
    """Hang up, stop the AI's speech, hold / unhold, mute / unmute (`kind` from the URL)."""
    return _call_action(
        request, pk,
        lambda call: services.call_supervise(call=call, operator=request.user, kind=kind),
        CALL_COMMAND_QUEUED[kind],
    )


@login_required
@require_POST
def call_forward_to_me(request: HttpRequest, pk: int) -> HttpResponse:
    return _call_action(
        request, pk, lambda call: services.call_forward_to_me(call=call, operator=request.user),
        "Forwarding the call to your phone…",
    )


@login_required
@require_POST
def my_phone(request: HttpRequest) -> HttpResponse:
    """The phone this person's calls are forwarded to (set on a call's page)."""
    try:
        profile = services.operator_phone_set(user=request.user, phone=request.POST.get("phone", ""))
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return HttpResponse(_toast(message, "error"), status=status)
    call = selectors.call_find(int(request.POST["call"])) if request.POST.get("call", "").isdigit() else None
    html = render_to_string(
        "calls/_my_phone.html", {"my_phone": profile.phone, "call": call, "oob": True}, request=request
    )
    return HttpResponse(html + _toast("Your phone is saved." if profile.phone else "Your phone is cleared.", "ok"))


@login_required
@require_POST
def call_forward(request: HttpRequest, pk: int) -> HttpResponse:
    return _call_action(
        request, pk,
        lambda call: services.call_forward(call=call, operator=request.user, to=request.POST.get("to", "")),
        "Forwarding the call…",
    )
