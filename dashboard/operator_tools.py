"""The operators' own tools in the browser: canned replies (picker and page) and notes.

Thin like `dashboard.views`: reads through the selectors, writes through
`conversations.operator_tools`, answers htmx with fragments and toasts.
"""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_POST

from conversations import canned, operator_tools
from conversations import operator_tools_selectors as tools
from conversations.permissions import PAUSE_WIDE_PERMISSION, TAKE_OVER_PERMISSION
from dashboard.views import REFUSALS, _conversation_or_404, _live_url, _refusal, _toast, login_required


# ---------------------------------------------------------------- the composer's picker


@login_required
@require_GET
def canned_picker(request: HttpRequest, pk: int) -> HttpResponse:
    """The replies matching what follows "/" in the composer, filled for this conversation."""
    conversation = _conversation_or_404(pk)
    items = []
    if request.user.has_perm(TAKE_OVER_PERMISSION):
        items = tools.canned_reply_picker(
            operator=request.user, conversation=conversation, query=request.GET.get("q", "")
        )
    return render(
        request,
        "conversations/_canned_picker.html",
        {"items": items, "conversation": conversation, "query": request.GET.get("q", "")[:40]},
    )


@login_required
@require_POST
def canned_used(request: HttpRequest, pk: int) -> HttpResponse:
    """The picker inserted this reply in a composer: counted (see `canned_reply_used`)."""
    operator_tools.canned_reply_used(operator=request.user, reply_id=pk)
    return HttpResponse(status=204)


# ---------------------------------------------------------------- notes


@login_required
@require_POST
def add_note(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = _conversation_or_404(pk)
    try:
        note, mentions = operator_tools.note_create(
            conversation=conversation, operator=request.user, text=request.POST.get("note", "")
        )
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return HttpResponse(_toast(message, "error"), status=status)
    html = render_to_string(
        "conversations/_message_live.html", {"message": note.timeline_entry, "new": True}, request=request
    )
    if mentions.unresolved:
        html += _toast(
            format_html(
                "Note added. Nobody was told for {}: no one, or more than one person, has that name "
                "(use their username).",
                ", ".join(mentions.unresolved),
            ),
            "warn",
        )
    return HttpResponse(html)


# ---------------------------------------------------------------- the canned replies page


def _manage_context(request: HttpRequest, **extra) -> dict:
    shared, own = tools.canned_replies_for(request.user)
    return {
        "shared": shared,
        "own": own,
        "can_share": request.user.has_perm(PAUSE_WIDE_PERMISSION),
        "variables": canned.VARIABLES,
        **extra,
    }


def _manage_response(request: HttpRequest, *, status: int = 200, toast: str = "", level: str = "ok", **extra):
    html = render_to_string("conversations/_canned_manage.html", _manage_context(request, **extra), request=request)
    return HttpResponse(html + (_toast(toast, level) if toast else ""), status=status)


@login_required
def canned_replies(request: HttpRequest) -> HttpResponse:
    """GET: the page (shared replies and your own); POST: a new reply."""
    if not request.user.has_perm(TAKE_OVER_PERMISSION):
        return render(request, "refused.html", {"message": "Canned replies are for operators.", "back": "/"}, status=403)
    if request.method != "POST":
        since = timezone.now().timestamp()
        ctx = _manage_context(request, live_since=since, live_url=_live_url(since=since))
        return render(request, "conversations/canned_replies.html", ctx)
    return _save(request, reply=None)


def _save(request: HttpRequest, *, reply) -> HttpResponse:
    form = {
        "title": request.POST.get("title", ""),
        "shortcut": request.POST.get("shortcut", ""),
        "text": request.POST.get("text", ""),
        "shared": request.POST.get("shared") == "on",
    }
    try:
        saved = operator_tools.canned_reply_save(operator=request.user, reply=reply, **form)
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return _manage_response(
            request, status=status, toast=message, level="error",
            form=form, form_error=message, editing=reply.pk if reply else None,
        )
    return _manage_response(request, toast=f"Saved /{saved.shortcut}.")


def _reply_or_404(pk: int):
    reply = tools.canned_reply_find(pk)
    if reply is None:
        raise Http404("No such canned reply.")
    return reply


@login_required
@require_POST
def canned_reply_edit(request: HttpRequest, pk: int) -> HttpResponse:
    return _save(request, reply=_reply_or_404(pk))


@login_required
@require_POST
def canned_reply_delete(request: HttpRequest, pk: int) -> HttpResponse:
    reply = _reply_or_404(pk)
    try:
        operator_tools.canned_reply_delete(operator=request.user, reply=reply)
    except REFUSALS as exc:
        status, message = _refusal(exc)
        return _manage_response(request, status=status, toast=message, level="error")
    return _manage_response(request, toast=f"Deleted /{reply.shortcut}.")
