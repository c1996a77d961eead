"""The operators' pages and htmx actions, through Django's test client."""

from __future__ import annotations

from datetime import timedelta

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import services
from conversations.models import AgentState, Command, ContactPause, Conversation, Message
from tests.factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "<script>alert('pwned')</script>"


def post(client: Client, url: str, data: dict | None = None):
    return client.post(url, data or {}, **HX)


def refreshed(obj):
    obj.refresh_from_db()
    return obj


# ---------------------------------------------------------------- login


class TestLogin:
    @pytest.mark.parametrize(
        "url", ["/", "/c/1/", "/c/1/state/", "/c/1/messages/", "/agent/state/"]
    )
    def test_pages_redirect_to_login(self, client, url):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")

    @pytest.mark.parametrize(
        "url",
        [
            "/c/1/take-over/",
            "/c/1/send/",
            "/c/1/hand-back/",
            "/c/1/read/",
            "/c/1/pause-contact/",
            "/c/1/resume-contact/",
            "/agent/pause/",
            "/agent/resume/",
        ],
    )
    def test_actions_redirect_to_login(self, client, url):
        assert client.post(url)["Location"].startswith("/login/")

    def test_htmx_request_is_sent_to_the_login_page(self, client):
        response = client.get("/c/1/state/", HTTP_HX_CURRENT_URL="http://testserver/c/1/", **HX)
        assert response.status_code == 401
        assert response["HX-Redirect"] == "/login/?next=%2Fc%2F1%2F"

    def test_login_page_and_login(self, client, operator):
        page = client.get("/login/")
        assert page.status_code == 200
        assert b"Sign in" in page.content
        response = client.post(
            "/login/", {"username": operator.username, "password": "pass-word-123"}
        )
        assert response.status_code == 302
        assert response["Location"] == "/"

    def test_wrong_password_says_so(self, client, operator):
        response = client.post("/login/", {"username": operator.username, "password": "nope"})
        assert response.status_code == 200
        assert b"don't match" in response.content

    def test_logout_is_a_post(self, operator_client):
        assert operator_client.post("/logout/").status_code == 302
        assert operator_client.get("/").status_code == 302


# ---------------------------------------------------------------- the inbox


class TestInbox:
    def test_rows_show_contact_last_message_and_holder(self, operator_client, other_operator):
        ai = ConversationFactory(contact_name="Lucía Fernández", contact_phone="+34600111222")
        MessageFactory(conversation=ai, ai=True, text="Your parcel ships tomorrow")
        held = ConversationFactory(held=True, held_by=other_operator, unread_count=3)
        pending = ConversationFactory(
            holder="human", held_by=other_operator, held_since=timezone.now(), ai_paused=False
        )
        body = operator_client.get("/").content.decode()
        assert "Lucía Fernández" in body and "+34600111222" in body
        assert "Your parcel ships tomorrow" in body
        assert 'row-author-ai">AI:</span>' in body
        assert f'id="row-{held.pk}"' in body and "Bruno Costa" in body
        assert 'title="3 unread">3</span>' in body
        pending_row = body.split(f'id="row-{pending.pk}"')[1].split("</a>")[0]
        assert "taking over…" in pending_row

    def test_unread_only_for_conversations_a_human_holds(self, operator_client):
        ConversationFactory(unread_count=4)
        assert "unread" not in operator_client.get("/").content.decode().split('id="inbox-list"')[1]

    def test_sorted_by_last_activity(self, operator_client):
        now = timezone.now()
        old = ConversationFactory(last_message_at=now - timedelta(hours=3))
        new = ConversationFactory(last_message_at=now - timedelta(minutes=1))
        mid = ConversationFactory(last_message_at=now - timedelta(hours=1))
        body = operator_client.get("/").content.decode()
        positions = [body.index(f'id="row-{c.pk}"') for c in (new, mid, old)]
        assert positions == sorted(positions)

    def test_window_warning_and_closed_mark(self, operator_client):
        now = timezone.now()
        closing = ConversationFactory(
            last_customer_message_at=now - timedelta(hours=22, minutes=30)
        )
        closed = ConversationFactory(last_customer_message_at=now - timedelta(hours=25))
        fresh = ConversationFactory(last_customer_message_at=now - timedelta(minutes=5))
        body = operator_client.get("/").content.decode()

        def row(c):
            return body.split(f'id="row-{c.pk}"')[1].split("</a>")[0]

        assert "win-closing" in row(closing)
        assert "1h 29m left" in row(closing) or "1h 30m left" in row(closing)
        assert "win-closed" in row(closed) and "Window closed" in row(closed)
        assert "win-open" in row(fresh) and "Customer 5m ago" in row(fresh)
        assert f'data-ts="{int(fresh.last_customer_message_at.timestamp())}"' in row(fresh)

    def test_filters(self, operator_client, operator, other_operator):
        active = ConversationFactory(contact_name="Plain Active")
        now = timezone.now()
        flagged = ConversationFactory(
            contact_name="Asked For Human", needs_human=True, needs_human_reason="asked",
            needs_human_since=now - timedelta(minutes=1),
        )
        # Paused with nobody holding it: waiting since the customer wrote (the ingest marks it).
        orphan = ConversationFactory(
            contact_name="Paused Nobody", ai_paused=True, needs_human=True,
            needs_human_reason="paused_unheld", needs_human_since=now - timedelta(minutes=5),
        )
        mine = ConversationFactory(contact_name="Held By Me", held=True, held_by=operator)
        theirs = ConversationFactory(
            contact_name="Held By Bruno", held=True, held_by=other_operator
        )
        ended = ConversationFactory(contact_name="Long Gone", ended=True)

        def names(f):
            body = operator_client.get(f"/?f={f}").content.decode()
            shown = Conversation.objects.all()
            return {c.contact_name for c in shown if f'id="row-{c.pk}"' in body}

        assert names("active") == {c.contact_name for c in (active, flagged, orphan, mine, theirs)}
        assert names("needs") == {flagged.contact_name, orphan.contact_name}
        queue = operator_client.get("/?f=needs").content.decode()
        assert queue.index(f'id="row-{orphan.pk}"') < queue.index(f'id="row-{flagged.pk}"'), (
            "the longest wait first"
        )
        assert 'id="tab-count-needs" data-count="2"' in queue
        assert names("mine") == {mine.contact_name}
        assert names("ended") == {ended.contact_name}
        assert names("bogus") == names("active")

    def test_search_by_name_phone_and_message_text(self, operator_client):
        ana = ConversationFactory(contact_name="Ana Lima", contact_phone="+351911000111")
        bob = ConversationFactory(contact_name="Bob Marsh", contact_phone="+447700900123")
        MessageFactory(conversation=bob, text="my invoice number is ZX-99")
        MessageFactory(conversation=bob, text="thanks")  # the preview no longer says it

        def found(q):
            body = operator_client.get("/", {"q": q}).content.decode()
            return {c.pk for c in (ana, bob) if f'id="row-{c.pk}"' in body}

        assert found("lima") == {ana.pk}
        assert found("911000") == {ana.pk}
        assert found("+44 7700") == {bob.pk}
        assert found("zx-99") == {bob.pk}
        assert found("nothing-like-this") == set()
        # Digits inside a word are no phone number: "Bob7" or a code do not match phones.
        assert found("Bob7") == set() and found("efc9b5eb") == set()
        assert found("(+44) 7700-900") == {bob.pk}
        assert "No conversation matches" in operator_client.get("/?q=zzz").content.decode()

    def test_tabs_and_search_answer_with_the_inbox_body_only(self, operator_client):
        ConversationFactory(contact_name="Needy", needs_human=True)
        response = operator_client.get("/?f=needs", HTTP_HX_TARGET="inbox-body", **HX)
        body = response.content.decode()
        assert "<html" not in body
        assert 'id="inbox-list"' in body and 'data-filter="needs"' in body and "Needy" in body

    def test_load_more(self, operator_client, settings):
        settings.INBOX_PAGE_SIZE = 5
        now = timezone.now()
        convs = [ConversationFactory(last_message_at=now - timedelta(minutes=i)) for i in range(12)]
        first = operator_client.get("/").content.decode()
        assert first.count('role="listitem"') == 5
        assert 'id="inbox-more"' in first and "page=2" in first
        second = operator_client.get("/?page=2", HTTP_HX_TARGET="inbox-more", **HX).content.decode()
        assert second.count('role="listitem"') == 5 and "<html" not in second
        assert f'id="row-{convs[5].pk}"' in second
        third = operator_client.get("/?page=3", HTTP_HX_TARGET="inbox-more", **HX).content.decode()
        assert third.count('role="listitem"') == 2 and 'id="inbox-more"' not in third

    def test_a_live_refresh_keeps_the_pages_loaded_and_points_load_more_past_them(
        self, operator_client, settings
    ):
        settings.INBOX_PAGE_SIZE = 5
        settings.INBOX_PAGES_KEPT = 3
        now = timezone.now()
        convs = [ConversationFactory(last_message_at=now - timedelta(minutes=i)) for i in range(22)]
        kept = operator_client.get("/?pages=2", HTTP_HX_TARGET="inbox-body", **HX).content.decode()
        assert kept.count('role="listitem"') == 10
        assert f'id="row-{convs[9].pk}"' in kept and f'id="row-{convs[10].pk}"' not in kept
        assert 'data-next-page="3"' in kept and "page=3" in kept
        # The next page after them is the third, not a repeat of the second.
        third = operator_client.get("/?page=3", HTTP_HX_TARGET="inbox-more", **HX).content.decode()
        assert f'id="row-{convs[10].pk}"' in third
        # However many pages are asked for, no more than INBOX_PAGES_KEPT are rendered.
        capped = operator_client.get("/?pages=99", HTTP_HX_TARGET="inbox-body", **HX).content.decode()
        assert capped.count('role="listitem"') == 15 and "page=4" in capped
        junk = operator_client.get("/?pages=-4x", HTTP_HX_TARGET="inbox-body", **HX).content.decode()
        assert junk.count('role="listitem"') == 5 and "page=2" in junk

    def test_page_connects_the_live_socket(self, operator_client):
        body = operator_client.get("/").content.decode()
        assert 'hx-ext="ws"' in body
        assert 'ws-connect="/ws/live/?since=' in body
        assert 'id="live-cursor" data-since="' in body
        # Hashed names once collectstatic has run, plain ones before.
        assert re.search(r"django_htmx/htmx-2\.min(\.[0-9a-f]{12})?\.js", body)
        assert re.search(r"django_htmx/ext/hx-ws-2\.min(\.[0-9a-f]{12})?\.js", body)
        assert "X-CSRFToken" in body


# ---------------------------------------------------------------- one conversation


class TestConversationPage:
    def test_history_as_bubbles(self, operator_client, operator):
        c = ConversationFactory()
        MessageFactory(conversation=c, text="Where is my order?")
        MessageFactory(conversation=c, ai=True, text="Let me check.", status="read")
        MessageFactory(conversation=c, note=True, text="Ana Silva took over")
        MessageFactory(
            conversation=c, human=True, operator=operator, text="I'm on it", status="delivered"
        )
        MessageFactory(conversation=c, voice=True, text="it was supposed to come monday")
        MessageFactory(conversation=c, image=True, text="the broken box")
        MessageFactory(conversation=c, type="document", text="invoice.pdf")
        MessageFactory(conversation=c, human=True, operator=operator, text="x", failed=True)
        body = operator_client.get(f"/c/{c.pk}/").content.decode()
        assert 'class="msg msg-customer msg-in' in body
        assert 'class="msg msg-ai msg-out' in body
        assert 'class="msg msg-human msg-out' in body and "Ana Silva" in body
        assert 'class="note"' in body and "Ana Silva took over" in body
        assert "Voice note transcript" in body and "it was supposed to come monday" in body
        assert "media-image" in body and "the broken box" in body
        assert "media-document" in body and "invoice.pdf" in body
        assert "tick-read" in body and "tick-delivered" in body
        assert "tick-failed" in body and "Not delivered: <bdi>Pinecall refused the message</bdi>" in body
        assert "data-retry" in body
        last = Message.objects.filter(conversation=c).order_by("id").last()
        assert f"after={last.pk}" in body and f"conversation={c.pk}" in body
        # The inbox beside it, with this row.
        assert f'id="row-{c.pk}"' in body and 'data-conversation="' in body

    def test_pending_tick(self, operator_client, operator):
        c = ConversationFactory(held=True, held_by=operator)
        MessageFactory(conversation=c, human=True, operator=operator, status="pending")
        assert "tick-pending" in operator_client.get(f"/c/{c.pk}/").content.decode()

    def test_long_history_shows_the_newest_with_load_earlier(self, operator_client, settings):
        settings.CONVERSATION_PAGE_SIZE = 10
        c = ConversationFactory()
        messages = [MessageFactory(conversation=c, text=f"line {i}") for i in range(25)]
        body = operator_client.get(f"/c/{c.pk}/").content.decode()
        assert body.count('class="msg ') == 10
        assert "line 24" in body and "line 14" not in body
        assert f"/c/{c.pk}/messages/?before={messages[15].pk}" in body
        earlier = operator_client.get(
            f"/c/{c.pk}/messages/?before={messages[15].pk}", **HX
        ).content.decode()
        assert earlier.count('class="msg ') == 10
        assert "line 5" in earlier and "line 15" not in earlier
        assert f"before={messages[5].pk}" in earlier
        oldest = operator_client.get(f"/c/{c.pk}/messages/?before={messages[5].pk}")
        oldest = oldest.content.decode()
        assert oldest.count('class="msg ') == 5 and "data-earlier" not in oldest

    def test_missing_conversation_is_404_even_to_who_may_not_act_on_it(self, viewer_client):
        assert post(viewer_client, "/c/999999/take-over/").status_code == 404
        assert post(viewer_client, "/c/999999/send/", {"text": "hi"}).status_code == 404

    def test_missing_conversation_is_404(self, operator_client):
        assert operator_client.get("/c/999999/").status_code == 404
        assert post(operator_client, "/c/999999/take-over/").status_code == 404
        assert post(operator_client, "/c/999999/hand-back/").status_code == 404
        assert post(operator_client, "/c/999999/pause-contact/").status_code == 404
        assert post(operator_client, "/c/999999/send/", {"text": "hi"}).status_code == 404
        assert post(operator_client, "/c/999999/send/", {"text": ""}).status_code == 404

    def test_a_take_over_reads_its_conversation_once_locked_not_before(self, operator_client):
        if connection.vendor != "postgresql":
            pytest.skip("row locks: PostgreSQL")
        c = ConversationFactory()
        with CaptureQueriesContext(connection) as queries:
            assert post(operator_client, f"/c/{c.pk}/take-over/").status_code == 200
        table = Conversation._meta.db_table
        reads = [q["sql"] for q in queries if q["sql"].lstrip().startswith("SELECT") and f'FROM "{table}"' in q["sql"]]
        assert reads and "FOR UPDATE" in reads[0]

    def test_opening_a_conversation_i_hold_marks_it_read(self, operator_client, operator):
        c = ConversationFactory(held=True, held_by=operator, unread_count=4)
        body = operator_client.get(f"/c/{c.pk}/").content.decode()
        assert refreshed(c).unread_count == 0
        # Its row beside it says so too (not the count read before marking).
        row = body.split(f'id="row-{c.pk}"')[1].split("</a>")[0]
        assert 'class="unread"' not in row

    def test_opening_someone_elses_does_not(self, operator_client, other_operator):
        c = ConversationFactory(held=True, held_by=other_operator, unread_count=4)
        operator_client.get(f"/c/{c.pk}/")
        assert refreshed(c).unread_count == 4

    def test_mark_read_endpoint(self, operator_client, operator):
        c = ConversationFactory(held=True, held_by=operator, unread_count=2)
        assert post(operator_client, f"/c/{c.pk}/read/").status_code == 204
        assert refreshed(c).unread_count == 0

    @pytest.mark.parametrize("text", [XSS_IMG, XSS_SCRIPT])
    def test_customer_html_is_escaped_everywhere(self, operator_client, text):
        c = ConversationFactory(contact_name=text)
        MessageFactory(conversation=c, text=f"hello {text}")
        for body in (
            operator_client.get(f"/c/{c.pk}/").content.decode(),
            operator_client.get("/").content.decode(),
        ):
            assert text not in body
            assert "&lt;" in body
        from dashboard import rendering

        message = Message.objects.get(conversation=c)
        assert text not in rendering.render_message(message, new=True)
        assert text not in rendering.render_inbox_row(refreshed(c))

    def test_ended_conversation_says_so(self, operator_client):
        c = ConversationFactory(ended=True)
        body = operator_client.get(f"/c/{c.pk}/").content.decode()
        assert "Conversation ended" in body and "idle timeout" in body
        assert "Ended · can't take over" in body
        assert "This conversation has ended" in body


# ---------------------------------------------------------------- per-user state


class TestStateView:
    def test_ai_answering(self, operator_client, conversation):
        body = operator_client.get(f"/c/{conversation.pk}/state/", **HX).content.decode()
        assert f'id="conv-header-{conversation.pk}"' in body and 'hx-swap-oob="true"' in body
        assert "AI is answering" in body
        assert f'hx-post="/c/{conversation.pk}/take-over/"' in body
        assert f'id="composer-{conversation.pk}"' in body

    def test_pending_then_confirmed_for_me(self, operator_client, operator, conversation):
        from conversations import services

        command = services.conversation_take_over(conversation=conversation, operator=operator)
        body = operator_client.get(f"/c/{conversation.pk}/state/").content.decode()
        assert "Taking over… waiting for Pinecall" in body
        assert f"composer-text-{conversation.pk}" in body  # may already write
        services.command_confirm(command=command)
        body = operator_client.get(f"/c/{conversation.pk}/state/").content.decode()
        assert "You hold this conversation" in body and "waiting for Pinecall" not in body
        assert "Hand back to AI" in body

    def test_someone_else_holds_it(self, operator_client, other_operator):
        c = ConversationFactory(held=True, held_by=other_operator)
        body = operator_client.get(f"/c/{c.pk}/state/").content.decode()
        assert "<bdi>Bruno Costa</bdi> holds this conversation" in body
        assert "Take over from <bdi>Bruno Costa</bdi>" in body
        assert "hx-confirm=" in body and '"force": "1"' in body
        assert "composer-text" not in body

    def test_viewer_sees_no_buttons(self, viewer_client, other_operator):
        for c in (ConversationFactory(), ConversationFactory(held=True, held_by=other_operator)):
            body = viewer_client.get(f"/c/{c.pk}/").content.decode()
            for action in ("take-over", "hand-back", "send", "pause-contact", "agent/pause"):
                assert f"/{action}/" not in body
            assert "Replying needs the operator permission" in body

    def test_failed_take_over_says_why(self, operator_client, operator, conversation):
        from conversations import services

        command = services.conversation_take_over(conversation=conversation, operator=operator)
        services.command_fail(command=command, code="PINECALL_ERROR", message="Session is closing")
        body = operator_client.get(f"/c/{conversation.pk}/state/").content.decode()
        assert "Take over failed: Session is closing" in body
        assert "AI is answering" in body

    def test_paused_with_nobody_holding(self, operator_client):
        c = ConversationFactory(ai_paused=True)
        body = operator_client.get(f"/c/{c.pk}/state/").content.decode()
        assert "AI paused · nobody holds this" in body


# ---------------------------------------------------------------- permissions and CSRF


ACTIONS = [
    "/c/{pk}/take-over/",
    "/c/{pk}/send/",
    "/c/{pk}/hand-back/",
    "/c/{pk}/pause-contact/",
    "/c/{pk}/resume-contact/",
    "/agent/pause/",
    "/agent/resume/",
]


class TestPermissions:
    @pytest.mark.parametrize("url", ACTIONS)
    def test_viewer_is_refused_everywhere(self, viewer_client, viewer, url):
        c = ConversationFactory(held=True, held_by=viewer)  # even "holding" it changes nothing
        response = post(viewer_client, url.format(pk=c.pk), {"text": "hi"})
        assert response.status_code == 403
        assert "You are not allowed to do this." in response.content.decode()
        assert not Command.objects.exists()

    @pytest.mark.parametrize(
        "url",
        ["/c/{pk}/pause-contact/", "/c/{pk}/resume-contact/", "/agent/pause/", "/agent/resume/"],
    )
    def test_operator_cannot_pause_contacts_or_the_agent(self, operator_client, conversation, url):
        assert post(operator_client, url.format(pk=conversation.pk)).status_code == 403
        assert not Command.objects.exists()

    def test_only_supervisors_see_pause_buttons(
        self, operator_client, supervisor_client, conversation
    ):
        operator_page = operator_client.get(f"/c/{conversation.pk}/").content.decode()
        supervisor_page = supervisor_client.get(f"/c/{conversation.pk}/").content.decode()
        for url in ("/agent/pause/", f"/c/{conversation.pk}/pause-contact/"):
            assert url not in operator_page
            assert url in supervisor_page

    def test_get_is_not_allowed_on_actions(self, operator_client, conversation):
        assert operator_client.get(f"/c/{conversation.pk}/take-over/").status_code == 405


class TestCsrf:
    @pytest.fixture
    def csrf_client(self, operator):
        client = Client(enforce_csrf_checks=True)
        client.force_login(operator)
        return client

    def test_post_without_token_is_refused(self, csrf_client, conversation):
        assert post(csrf_client, f"/c/{conversation.pk}/take-over/").status_code == 403
        assert not Command.objects.exists()

    def test_post_with_the_pages_header_token_passes(self, csrf_client, conversation):
        page = csrf_client.get(f"/c/{conversation.pk}/").content.decode()
        token = page.split('"X-CSRFToken": "')[1].split('"')[0]
        response = csrf_client.post(
            f"/c/{conversation.pk}/take-over/", HTTP_X_CSRFTOKEN=token, **HX
        )
        assert response.status_code == 200
        assert Command.objects.filter(kind="pause").count() == 1


# ---------------------------------------------------------------- actions


class TestTakeOver:
    def test_creates_a_pause_and_shows_it_pending(self, operator_client, operator, conversation):
        response = post(operator_client, f"/c/{conversation.pk}/take-over/")
        assert response.status_code == 200
        command = Command.objects.get()
        assert (command.kind, command.scope, command.session_id) == (
            "pause",
            "session",
            conversation.session_id,
        )
        assert refreshed(conversation).held_by == operator
        body = response.content.decode()
        assert "Taking over… waiting for Pinecall" in body
        assert f'id="conv-header-{conversation.pk}" data-holder="me"' in body
        assert f'id="composer-{conversation.pk}" data-mode="compose"' in body

    def test_held_by_another_needs_confirmation(self, operator_client, operator, other_operator):
        c = ConversationFactory(held=True, held_by=other_operator)
        response = post(operator_client, f"/c/{c.pk}/take-over/")
        assert response.status_code == 409
        body = response.content.decode()
        assert "<bdi>Bruno Costa</bdi> holds this conversation. Take it over to reply." in body
        assert "Take over from <bdi>Bruno Costa</bdi>" in body
        assert refreshed(c).held_by == other_operator

        response = post(operator_client, f"/c/{c.pk}/take-over/", {"force": "1"})
        assert response.status_code == 200
        assert refreshed(c).held_by == operator
        assert Message.objects.filter(conversation=c, text__contains="took over from").exists()

    def test_first_operator_wins(self, operator_client, other_operator_client, conversation):
        assert post(operator_client, f"/c/{conversation.pk}/take-over/").status_code == 200
        late = post(other_operator_client, f"/c/{conversation.pk}/take-over/")
        assert late.status_code == 409
        assert "<bdi>Ana Silva</bdi> holds this conversation" in late.content.decode()

    def test_twice_by_the_holder_is_one_pause(self, operator_client, conversation):
        """A double click: the second answers with the first's pending pause."""
        post(operator_client, f"/c/{conversation.pk}/take-over/")
        response = post(operator_client, f"/c/{conversation.pk}/take-over/")
        assert response.status_code == 200
        assert "Taking over… waiting for Pinecall" in response.content.decode()
        assert Command.objects.filter(conversation=conversation, kind="pause").count() == 1

    def test_again_once_confirmed_says_so(self, operator_client, conversation):
        post(operator_client, f"/c/{conversation.pk}/take-over/")
        services.command_confirm(command=Command.objects.get(conversation=conversation))
        response = post(operator_client, f"/c/{conversation.pk}/take-over/")
        assert response.status_code == 409
        assert "You already hold this conversation." in response.content.decode()

    def test_ended_conversation_is_a_clear_message(self, operator_client):
        c = ConversationFactory(ended=True)
        response = post(operator_client, f"/c/{c.pk}/take-over/")
        assert response.status_code == 409
        body = response.content.decode()
        assert "This conversation has ended; there is nothing to take over." in body
        assert not Command.objects.exists()


class TestSend:
    @pytest.fixture
    def held(self, operator):
        return ConversationFactory(held=True, held_by=operator)

    def test_sends_and_clears_the_composer(self, operator_client, operator, held):
        response = post(operator_client, f"/c/{held.pk}/send/", {"text": "Hello from Ana"})
        assert response.status_code == 200
        message = Message.objects.get(conversation=held, author="human")
        assert (message.text, message.status) == ("Hello from Ana", "pending")
        assert message.operator == operator
        command = Command.objects.get(kind="send")
        assert command.message == message and command.text == "Hello from Ana"
        body = response.content.decode()
        assert f'id="messages-{held.pk}" hx-swap-oob="beforeend"' in body
        assert f'id="msg-{message.pk}"' in body and "tick-pending" in body
        textarea = body.split(f'id="composer-text-{held.pk}"')[1].split("</textarea>")[0]
        assert textarea.endswith(">")  # empty
        assert "composer-error" not in body

    def test_empty_text_is_refused_and_kept(self, operator_client, held):
        response = post(operator_client, f"/c/{held.pk}/send/", {"text": "   "})
        assert response.status_code == 422
        body = response.content.decode()
        assert "Write something before sending." in body
        assert ">   </textarea>" in body
        assert not Message.objects.filter(author="human").exists()

    def test_oversized_text_is_refused_and_kept(self, operator_client, held, settings):
        text = "x" * (settings.MESSAGE_MAX_LENGTH + 1)
        response = post(operator_client, f"/c/{held.pk}/send/", {"text": text})
        assert response.status_code == 422
        body = response.content.decode()
        assert "at most 4096 characters" in body
        assert f">{text}</textarea>" in body
        # Counted in code points by app.js: the browser's maxlength would count UTF-16 units.
        assert "maxlength" not in body
        assert 'data-max="4096"' in body

    def test_not_holding_keeps_the_text(self, operator_client, other_operator):
        c = ConversationFactory(held=True, held_by=other_operator)
        response = post(operator_client, f"/c/{c.pk}/send/", {"text": "my draft <b>reply</b>"})
        assert response.status_code == 409
        body = response.content.decode()
        assert "Bruno Costa holds this conversation" in body
        assert "my draft &lt;b&gt;reply&lt;/b&gt;</textarea>" in body

    def test_closed_window_is_refused(self, operator_client, operator):
        c = ConversationFactory(
            held=True,
            held_by=operator,
            last_customer_message_at=timezone.now() - timedelta(hours=25),
        )
        response = post(operator_client, f"/c/{c.pk}/send/", {"text": "hello?"})
        assert response.status_code == 409
        assert "24-hour WhatsApp window has closed" in response.content.decode()

    def test_composer_shows_closed_window(self, operator_client, operator):
        c = ConversationFactory(
            held=True,
            held_by=operator,
            last_customer_message_at=timezone.now() - timedelta(hours=25),
        )
        body = operator_client.get(f"/c/{c.pk}/").content.decode()
        assert "the customer must write first" in body

    def test_my_text_is_escaped_in_my_bubble(self, operator_client, held):
        body = post(operator_client, f"/c/{held.pk}/send/", {"text": XSS_SCRIPT}).content.decode()
        assert XSS_SCRIPT not in body and "&lt;script&gt;" in body


class TestHandBack:
    def test_creates_a_resume_and_shows_it_pending(self, operator_client, operator):
        c = ConversationFactory(held=True, held_by=operator)
        response = post(operator_client, f"/c/{c.pk}/hand-back/")
        assert response.status_code == 200
        assert Command.objects.get().kind == "resume"
        assert "Handing back… waiting for Pinecall" in response.content.decode()

    def test_not_held(self, operator_client, conversation):
        response = post(operator_client, f"/c/{conversation.pk}/hand-back/")
        assert response.status_code == 409
        assert "The AI already handles this conversation." in response.content.decode()

    def test_ended_conversation_releases_at_once(self, operator_client, operator):
        c = ConversationFactory(held=True, held_by=operator, ended=True)
        response = post(operator_client, f"/c/{c.pk}/hand-back/")
        assert response.status_code == 200
        assert refreshed(c).held_by is None


class TestContactAndAgent:
    def test_pause_and_resume_contact(self, supervisor_client, conversation):
        response = post(supervisor_client, f"/c/{conversation.pk}/pause-contact/")
        assert response.status_code == 200
        command = Command.objects.get()
        assert (command.scope, command.kind, command.contact_phone) == (
            "contact",
            "pause",
            conversation.contact_phone,
        )
        assert "Pausing contact…" in response.content.decode()

        ContactPause.objects.create(
            agent_id=conversation.agent_id, contact_phone=conversation.contact_phone
        )
        Command.objects.update(status="confirmed")
        page = supervisor_client.get(f"/c/{conversation.pk}/").content.decode()
        assert "Contact paused" in page and "Resume contact" in page
        response = post(supervisor_client, f"/c/{conversation.pk}/resume-contact/")
        assert response.status_code == 200
        assert Command.objects.filter(scope="contact", kind="resume").exists()

    def test_kill_switch(self, supervisor_client):
        page = supervisor_client.get("/").content.decode()
        assert "Pause AI everywhere" in page and "hx-confirm=" in page
        response = post(supervisor_client, "/agent/pause/")
        assert response.status_code == 200
        assert Command.objects.get().scope == "agent"
        body = response.content.decode()
        assert 'id="agent-state"' in body and 'hx-swap-oob="true"' in body
        assert "Pausing AI…" in body

    def test_banner_shows_the_agent_state(self, operator_client, supervisor_client, settings):
        AgentState.objects.create(
            agent_id=settings.PINECALL_AGENT_ID, ai_paused=True, worker_connected=False
        )
        for client in (operator_client, supervisor_client):
            page = client.get("/").content.decode()
            assert "AI paused everywhere" in page and "Pinecall offline" in page
        assert "Resume AI" in supervisor_client.get("/").content.decode()
        assert "/agent/resume/" not in operator_client.get("/").content.decode()
        response = post(supervisor_client, "/agent/resume/")
        assert response.status_code == 200 and Command.objects.get().kind == "resume"

    def test_agent_state_view_is_per_user(self, operator_client, supervisor_client):
        assert "/agent/pause/" in supervisor_client.get("/agent/state/").content.decode()
        assert "/agent/pause/" not in operator_client.get("/agent/state/").content.decode()


# ---------------------------------------------------------------- a fixed number of queries


def _count_queries(client, url, **extra) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, **extra)
    assert response.status_code == 200
    return len(ctx.captured_queries)


class TestQueryCounts:
    """The inbox and a conversation cost the same queries for 10 rows or 200."""

    # Constant whatever the data's size: the rows, the tab counts (3), this person's
    # alert settings and the agent banner.
    MAX = 17

    def _inbox_data(self, n, operator, other):
        now = timezone.now()
        for i in range(n):
            kind = i % 4
            c = ConversationFactory(
                last_message_at=now - timedelta(minutes=i),
                held_by=(operator if kind == 1 else other if kind == 2 else None),
                holder="human" if kind in (1, 2) else "ai",
                unread_count=i % 3,
                state="ended" if kind == 3 and i % 8 == 3 else "active",
            )
            MessageFactory(conversation=c)

    def _history(self, conversation, n, operator):
        for i in range(n):
            MessageFactory(
                conversation=conversation,
                human=(i % 3 == 0),
                ai=(i % 3 == 1),
                operator=operator if i % 3 == 0 else None,
            )

    @pytest.mark.parametrize("url", ["/", "/?f=needs", "/?f=mine", "/?f=ended", "/?q=message"])
    def test_inbox(
        self, supervisor_client, supervisor, other_operator, url, django_assert_max_num_queries
    ):
        self._inbox_data(10, supervisor, other_operator)
        with django_assert_max_num_queries(self.MAX):
            small = _count_queries(supervisor_client, url)
        self._inbox_data(190, supervisor, other_operator)
        with django_assert_max_num_queries(self.MAX):
            large = _count_queries(supervisor_client, url)
        assert small == large

    def test_conversation_page(
        self, supervisor_client, supervisor, other_operator, settings, django_assert_max_num_queries
    ):
        settings.CONVERSATION_PAGE_SIZE = 50
        self._inbox_data(10, supervisor, other_operator)
        c = ConversationFactory(held=True, held_by=supervisor)
        self._history(c, 10, other_operator)
        # + 3: the history, and marking the holder's unread messages read; + 4: the
        # contact panel (its other sessions, notes, calls and pause; the sessions'
        # take-overs when it has any); + 1: the Calls tab's badge (callers waiting).
        with django_assert_max_num_queries(self.MAX + 8):
            small = _count_queries(supervisor_client, f"/c/{c.pk}/")
        self._inbox_data(190, supervisor, other_operator)
        self._history(c, 190, other_operator)
        with django_assert_max_num_queries(self.MAX + 8):
            large = _count_queries(supervisor_client, f"/c/{c.pk}/")
        assert small == large

    def test_state_view(self, operator_client, operator, django_assert_max_num_queries):
        c = ConversationFactory(held=True, held_by=operator)
        with django_assert_max_num_queries(9):
            operator_client.get(f"/c/{c.pk}/state/")


def test_a_plain_form_post_of_a_reply_is_sent_and_returns_to_the_page(operator_client, operator):
    """Before htmx has wired a freshly swapped composer, its form posts natively."""
    from conversations import services

    conversation = ConversationFactory()
    services.conversation_take_over(conversation=conversation, operator=operator)
    response = operator_client.post(f"/c/{conversation.pk}/send/", {"text": "plain post"})
    assert response.status_code == 302 and response["Location"] == f"/c/{conversation.pk}/"
    assert conversation.messages.filter(text="plain post", author="human").exists()


@pytest.mark.django_db
class TestDatabaseUnavailable:
    """An outage mid-action: 503 with the reason, the composer's text kept (no success)."""

    def test_an_htmx_send_is_answered_503_with_a_toast(self, operator_client, monkeypatch):
        from django.db import OperationalError

        from conversations import services

        def outage(**kwargs):
            raise OperationalError("could not connect to server: Connection refused")

        conversation = ConversationFactory()
        monkeypatch.setattr(services, "conversation_send", outage)
        response = operator_client.post(
            f"/c/{conversation.pk}/send/", {"text": "kept"}, HTTP_HX_REQUEST="true"
        )
        assert response.status_code == 503
        assert response["Retry-After"] == "5"
        body = response.content.decode()
        assert "database is unavailable" in body and 'id="toasts"' in body

    def test_a_page_is_answered_with_the_503_page(self, operator_client, monkeypatch):
        from django.db import OperationalError

        from conversations import selectors

        def outage(**kwargs):
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(selectors, "inbox_page", outage)
        response = operator_client.get("/")
        assert response.status_code == 503
        assert "The database is unavailable" in response.content.decode()



@pytest.mark.django_db
class TestWhoAnswers:
    """One derived state behind the badge, the composer and the inbox row."""

    def test_with_the_kill_switch_on_nothing_says_the_ai_answers(self, operator_client):
        conversation = ConversationFactory()
        AgentState.objects.update_or_create(agent_id=conversation.agent_id, defaults={"ai_paused": True})
        body = operator_client.get(f"/c/{conversation.pk}/").content.decode()
        assert "AI paused everywhere · nobody holds this" in body
        assert "The AI is answering" not in body and "AI is answering" not in body
        assert "AI paused everywhere and nobody holds this conversation" in body

    def test_a_paused_contact_is_said_in_the_composer_and_the_row(self, operator_client):
        conversation = ConversationFactory()
        ContactPause.objects.create(agent_id=conversation.agent_id, contact_phone=conversation.contact_phone)
        body = operator_client.get(f"/c/{conversation.pk}/").content.decode()
        assert "AI paused for this contact and nobody holds this conversation" in body
        assert "The AI is answering" not in body
        row = body[body.index(f'id="row-{conversation.pk}"'):]
        row = row[: row.index("</a>")]
        assert "Contact paused" in row and 'class="chip chip-ai"' not in row


@pytest.mark.django_db
def test_a_refused_plain_form_post_says_so_and_is_not_a_redirect(other_operator_client, operator):
    conversation = ConversationFactory(held=True, held_by=operator)
    response = other_operator_client.post(f"/c/{conversation.pk}/send/", {"text": "hi"})
    assert response.status_code == 409
    assert "holds this conversation" in response.content.decode()


@pytest.mark.django_db
def test_a_forced_take_over_leaves_one_divider(operator, other_operator):
    from conversations import services

    conversation = ConversationFactory(held=True, held_by=operator)
    command = services.conversation_take_over(conversation=conversation, operator=other_operator, force=True)
    services.command_mark_sent(command=command)
    services.command_confirm(command=command)
    notes = list(conversation.messages.filter(direction="note").values_list("text", flat=True))
    assert len([n for n in notes if "took over" in n]) == 1, notes
