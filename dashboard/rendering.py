"""The live fragments: rendered once per change, sent through `conversations.notify`.

`register()` (called when the app is ready) gives the domain's notifications
their renderers. Fragments are htmx out-of-band HTML that the browser's
WebSocket extension swaps in, rendered by the same partials as the pages, so a
page and its live updates cannot disagree. Shared fragments carry nothing
per-user (each page's own CSS picks its view from `data-held-by` and its role);
what is for one person goes to that person's group only.

`catch_up()` renders what a (re)connecting page missed, as the live stream
would have sent it (see `dashboard.consumers`).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth.context_processors import PermWrapper
from django.template.loader import render_to_string
from django.utils import timezone

from conversations import notify, selectors
from conversations.models import dom_key
from conversations.permissions import display_name
from conversations.notify import OPERATORS_GROUP, conversation_group, user_group

# A row saved just before a page's render may commit just after it: catch-up looks
# back this much further than the page says it knows.
CATCH_UP_MARGIN = timedelta(seconds=2)
# Under this gap since the page's state, a (re)connect re-renders the conversation's
# header only if its row changed meanwhile (a page that just loaded is up to date).
QUIET_RECONNECT = timedelta(seconds=10)


# ---------------------------------------------------------------- the handlers


def message_added(message) -> None:
    notify.send_html_if_listened(
        conversation_group(message.conversation_id), lambda: render_message(message, new=True)
    )
    if message.direction != "note":
        notify.inbox_row(message.conversation)


def message_changed(message) -> None:
    notify.send_html_if_listened(
        conversation_group(message.conversation_id), lambda: render_message(message, new=False)
    )


def conversation_changed(conversation) -> None:
    # Each viewer's header and composer differ (their buttons, "You hold"): every
    # socket renders its own in its Daphne process (`conversation_state_for_viewer`),
    # from facts read once per process for this change. Told first: it is what the
    # operator who acted waits for. Nothing is read again here: the row is read fresh
    # with the others (`inbox_rows`), and the holder is the one the change wrote.
    notify.send(
        conversation_group(conversation.pk),
        {"type": "conversation.state", "conversation_id": conversation.pk, "version": uuid.uuid4().hex},
    )
    notify.inbox_row(conversation)
    if conversation.held_by_id:
        # "Mine" is per person: its count goes to the holder only.
        counts = {"mine": selectors.mine_count(conversation.held_by_id)}
        notify.send_html(user_group(conversation.held_by_id), render_tab_counts(counts))


def inbox_rows(conversation_ids: set[int]) -> None:
    """The inbox rows a batch moved, read fresh in one query, and the counts: one fragment.

    A page shows the newest rows, so a burst that moved more than a page's worth
    sends only the newest page of them (rendering a row costs about a
    millisecond: 500 of them were most of a batch's time) and asks the pages to
    reload their list once the burst is over, which brings the rest.
    """
    page = settings.INBOX_PAGE_SIZE
    rows = selectors.inbox_rows_by_id(conversation_ids, newest=page)
    parts = [render_inbox_row(conversation) for conversation in with_viewers(rows)]
    if len(conversation_ids) > page:
        parts.append(render_inbox_refresh(when_quiet=True))
    counts = selectors.inbox_counts(user=None)
    del counts["mine"]
    parts.append(render_tab_counts(counts))
    # One frame for all of it: with 1,000 operators, each frame is 1,000 socket
    # writes in the web processes and 1,000 messages for the browsers to parse.
    notify.send_html(OPERATORS_GROUP, "".join(parts))


def render_tab_counts(counts: dict[str, int]) -> str:
    return render_to_string(
        "conversations/_tab_counts_live.html", {"counts": counts, "keys": list(counts)}
    )


def command_changed(command) -> None:
    """Its toast: a failure to whoever asked; the kill switch or a contact's pause, to all.

    (The state it changed travels with conversation_changed or agent_state_changed.)
    """
    html = render_to_string("conversations/_command_live.html", {"command": command})
    if command.status == "confirmed" and command.scope not in ("session", "call"):
        notify.send_html(OPERATORS_GROUP, html)
    elif command.operator_id:
        notify.send_html(user_group(command.operator_id), html)


def agent_state_changed(state) -> None:
    notify.send_html(OPERATORS_GROUP, render_agent_state(state))


def worker_heartbeat(state) -> None:
    notify.send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_worker_heartbeat.html", {"agent_state": state, "oob": True}),
    )


def database_state_changed(*, available: bool) -> None:
    # No query: the database is what is missing.
    notify.send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_db_status.html", {"available": available, "oob": True}),
    )


def user_notice(user_pk: int, kind: str, **context) -> None:
    notify.send_html(
        user_group(user_pk),
        render_to_string("conversations/_user_notice.html", {"kind": kind, **context}),
    )


# ---------------------------------------------------------------- voice calls


def call_changed(call) -> None:
    # Read fresh: in a coalesced batch the object is the first write's (a forward, then the end).
    call = selectors.call_find(call.pk) or call
    notify.send_html(notify.call_group(call.call_id), render_call_header(call))
    notify.send_html(notify.CALLS_GROUP, render_call_row(call))
    # Every page's Calls tab (its badge raises the handoff alerts when a caller asks for a person).
    notify.send_html(
        OPERATORS_GROUP,
        render_to_string("calls/_calls_waiting.html", {"waiting": selectors.calls_asking_for_a_person(), "oob": True}),
    )


def call_line_added(line) -> None:
    line = selectors.call_line_find(line.pk) or line
    notify.send_html(notify.call_group(line.call.call_id), render_call_line(line, new=True))


def call_line_changed(line) -> None:
    line = selectors.call_line_find(line.pk) or line
    notify.send_html(notify.call_group(line.call.call_id), render_call_line(line, new=False))


# Who speaks, after each caption kind ("" : nobody).
SPEAKING_AFTER = {
    "user.speaking": "caller",
    "bot.speaking": "ai",
    "bot.finished": "",
    "bot.interrupted": "",
}


def call_caption(call_id: str, kind: str, **fields) -> None:
    """A live caption, rendered in the worker's loop: no database, never stored."""
    group = notify.call_group(call_id)
    if kind != "bot.finished":
        ctx = {
            "kind": kind,
            "key": dom_key(fields.get("message_id") or ""),
            "text": fields.get("text") or "",
            "word": fields.get("word") or "",
        }
        notify.send_html(group, render_to_string("calls/_caption_live.html", ctx))
    who = SPEAKING_AFTER.get(kind)
    if who is not None:
        html = render_to_string("calls/_speaking_live.html", {"call_key": dom_key(call_id), "who": who})
        notify.send_html(group, html)
        notify.send_html(notify.CALLS_GROUP, html)


def render_call_header(call) -> str:
    return render_to_string("calls/_call_live.html", {"call": call, "row": False})


def render_call_row(call) -> str:
    return render_to_string("calls/_call_live.html", {"call": call, "row": True})


def render_call_line(line, *, new: bool) -> str:
    return render_to_string("calls/_line_live.html", {"line": line, "new": new})


def call_catch_up(call_pk: int) -> list[str]:
    """What a (re)connecting call page may have missed: its header and every stored line
    (the page replaces the lines it already shows)."""
    call = selectors.call_find(call_pk)
    if call is None:
        return []
    return [render_call_header(call)] + [render_call_line(line, new=True) for line in selectors.call_lines(call)]


def register() -> None:
    notify.register(
        call_changed=call_changed,
        call_line_added=call_line_added,
        call_line_changed=call_line_changed,
        call_caption=call_caption,
        message_added=message_added,
        message_changed=message_changed,
        conversation_changed=conversation_changed,
        inbox_rows=inbox_rows,
        command_changed=command_changed,
        agent_state_changed=agent_state_changed,
        worker_heartbeat=worker_heartbeat,
        database_state_changed=database_state_changed,
        user_notice=user_notice,
    )


# ---------------------------------------------------------------- rendering, shared with catch-up


def render_message(message, *, new: bool) -> str:
    return render_to_string("conversations/_message_live.html", {"message": message, "new": new})


def render_inbox_row(conversation) -> str:
    return render_to_string("conversations/_inbox_row_live.html", {"conversation": conversation})


def render_inbox_refresh(*, when_quiet: bool) -> str:
    """Tell a page to reload its inbox list: at once (a catch-up found too much), or
    once the live rows stop coming (a burst sent only its newest)."""
    return render_to_string("conversations/_inbox_refresh.html", {"when_quiet": when_quiet})


def render_agent_state(state) -> str:
    return render_to_string(
        "conversations/_agent_state.html", {"agent_state": state, "oob": True}
    )


def render_cursor(now: datetime) -> str:
    """The page's catch-up position, read by app.js when the socket reconnects."""
    return render_to_string("conversations/_live_cursor.html", {"since": now.timestamp()})


def render_conversation_state_for(conversation, user, facts=None) -> str:
    """One user's header and composer (out of band), as the page's state view renders them."""
    return render_to_string(
        "conversations/_conversation_state.html",
        {
            "conversation": conversation,
            "st": selectors.conversation_state(conversation=conversation, user=user, facts=facts),
            "max_length": settings.MESSAGE_MAX_LENGTH,
            "oob": True,
            "user": user,
        },
    )


# (conversation pk, change version) -> the facts every viewer's render shares. A
# change reaches all of a process's viewers together, each rendering on its own
# thread of the pool: the first reads, the rest wait for its read (not a read each).
_facts_seen: OrderedDict[tuple[int, str], Future] = OrderedDict()
_FACTS_KEPT = 64
_FACTS_WAIT_SECONDS = 10.0
_facts_lock = threading.Lock()


def conversation_state_for_viewer(conversation_id: int, user, version: str = "") -> str:
    """A `conversation.state` change, rendered for one viewer's socket."""
    facts = _facts_of_change(conversation_id, version) if version else selectors.conversation_facts_find(conversation_id)
    if facts is None:
        return ""
    return render_conversation_state_for(facts.conversation, user, facts)


def _facts_of_change(conversation_id: int, version: str) -> selectors.ConversationFacts | None:
    key = (conversation_id, version)
    with _facts_lock:
        shared = _facts_seen.get(key)
        reading = shared is None
        if reading:
            shared = _facts_seen[key] = Future()
            while len(_facts_seen) > _FACTS_KEPT:
                _facts_seen.popitem(last=False)
    if not reading:
        return shared.result(timeout=_FACTS_WAIT_SECONDS)
    try:
        facts = selectors.conversation_facts_find(conversation_id)
    except BaseException as error:
        with _facts_lock:  # a later viewer of this change reads again
            _facts_seen.pop(key, None)
        shared.set_exception(error)
        raise
    shared.set_result(facts)
    return facts


def with_viewers(rows):
    """Inbox rows, each with `.viewers`: who has it open now (one presence read for all)."""
    rows = list(rows)
    viewers = selectors.conversation_viewers([row.pk for row in rows])
    for row in rows:
        row.viewers = viewers.get(row.pk, [])
    return rows


# ---------------------------------------------------------------- presence (live only)

TYPING_SHOWN_FOR = 6  # seconds "X is typing…" stays without a new keystroke


def render_presence(conversation_id: int) -> tuple[list[int], str, str]:
    """Who has it open: (their pks, the conversation's presence bar, the inbox row's mark)."""
    viewers = selectors.conversation_viewers([conversation_id]).get(conversation_id, [])
    context = {"conversation_id": conversation_id, "viewers": viewers, "oob": True}
    return (
        [v.pk for v in viewers],
        render_to_string("conversations/_presence.html", context),
        render_to_string("conversations/_viewing.html", context),
    )


def render_typing(conversation_id: int, user) -> str:
    return render_to_string(
        "conversations/_typing.html",
        {
            "conversation_id": conversation_id,
            "typist": user,
            "name": display_name(user),
            "seconds": TYPING_SHOWN_FOR,
            "oob": True,
        },
    )


def render_agent_state_for(state, user) -> str:
    """One user's agent banner (their kill switch buttons), out of band."""
    return render_to_string(
        "conversations/_agent_state.html",
        {
            "agent_state": state,
            "agent_pending": selectors.agent_open_command(state.agent_id) or False,
            "workers": selectors.worker_processes(state.agent_id),
            "oob": True,
            "user": user,
            "perms": PermWrapper(user),
        },
    )


def catch_up(
    *,
    user,
    conversation_id: int | None = None,
    after: int | None = None,
    since: float | None = None,
) -> list[str]:
    """Everything a page missed, as the fragments the live stream would have sent.

    `after`: the newest message id the page shows (of `conversation_id`);
    `since`: the server time (epoch seconds) the page's state dates from, as
    rendered in the page or in the last catch-up's cursor. The per-user parts
    (header, composer, agent banner) are rendered for `user`. Ends with a new
    cursor.
    """
    now = timezone.now()
    since_at = None
    if since is not None:
        try:
            since_at = datetime.fromtimestamp(since, tz=UTC) - CATCH_UP_MARGIN
        except (OverflowError, OSError, ValueError):
            since_at = None
    out: list[str] = []

    if conversation_id:
        conversation = selectors.conversation_find(conversation_id)
        if conversation is not None:
            limit = settings.CONVERSATION_PAGE_SIZE
            if after is not None:
                newer = selectors.messages_after(
                    conversation_id=conversation_id, after=after, limit=limit + 1
                )
                if len(newer) > limit:
                    # Too much missed: the newest page replaces the list, as on a reload.
                    messages, has_earlier = selectors.conversation_messages(
                        conversation_id=conversation_id
                    )
                    out.append(
                        render_to_string(
                            "conversations/_messages.html",
                            {
                                "conversation": conversation,
                                "messages": messages,
                                "has_earlier": has_earlier,
                                "oob": True,
                            },
                        )
                    )
                else:
                    out.extend(render_message(m, new=True) for m in newer)
                    if since_at is not None:
                        changed = selectors.messages_changed_since(
                            conversation_id=conversation_id, since=since_at, upto=after, limit=limit
                        )
                        out.extend(render_message(m, new=False) for m in changed)
            # Who holds it, pending actions: after a real gap, or when the row changed.
            if (
                since_at is None
                or now - since_at > QUIET_RECONNECT
                or conversation.updated_at >= since_at
            ):
                out.append(render_conversation_state_for(conversation, user))

    if since_at is not None:
        page = settings.INBOX_PAGE_SIZE
        rows = selectors.conversations_changed_since(since_at, limit=page + 1)
        if len(rows) > page:
            out.append(render_inbox_refresh(when_quiet=False))
        else:
            out.extend(render_inbox_row(row) for row in with_viewers(rows))
    state = selectors.agent_state_for_display(settings.PINECALL_AGENT_ID)
    out.append(render_agent_state_for(state, user))
    out.append(render_cursor(now))
    return out
