"""The operator tools' pages and fragments: the "/" picker, notes, the canned replies
page, the contact panel on the conversation page, the admin."""

from __future__ import annotations

import pytest

from conversations import operator_tools
from conversations.models import AuditEntry, CannedReply, Command, Note
from tests.factories import CallFactory, CannedReplyFactory, ConversationFactory

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def test_the_picker_fills_the_reply_and_escapes_the_customers_name(operator_client):
    conversation = ConversationFactory(contact_name='<img src=x onerror="alert(1)"> Eve')
    CannedReplyFactory(shortcut="greet", title="Greeting", text="Hi {{customer_first_name}}, {{operator_first_name}} here")
    html = operator_client.get(f"/c/{conversation.pk}/canned/?q=gr", **HTMX).content.decode()
    assert 'role="option"' in html and "/greet" in html
    assert "&lt;img" in html and "<img" not in html
    assert 'data-filled="Hi &lt;img, Ana here"' in html


def test_a_viewer_gets_no_canned_replies(viewer_client):
    conversation = ConversationFactory()
    CannedReplyFactory(shortcut="greet")
    html = viewer_client.get(f"/c/{conversation.pk}/canned/?q=gr", **HTMX).content.decode()
    assert "/greet" not in html


def test_inserting_counts_the_use(operator_client):
    reply = CannedReplyFactory()
    assert operator_client.post(f"/replies/{reply.pk}/used/", **HTMX).status_code == 204
    reply.refresh_from_db()
    assert reply.usage_count == 1


def test_a_note_posted_comes_back_as_a_note_and_is_never_sent(operator_client, operator):
    conversation = ConversationFactory()
    response = operator_client.post(f"/c/{conversation.pk}/notes/", {"note": "Call <b>back</b> @nobody"}, **HTMX)
    html = response.content.decode()
    assert response.status_code == 200
    assert 'class="internal-note"' in html and "Internal note" in html
    assert "Call &lt;b&gt;back&lt;/b&gt;" in html
    assert "@nobody" in html and "Nobody was told" in html  # the toast names who was not found
    assert Note.objects.get().author == operator and not Command.objects.exists()


def test_a_viewer_cannot_post_a_note(viewer_client):
    conversation = ConversationFactory()
    response = viewer_client.post(f"/c/{conversation.pk}/notes/", {"note": "hi"}, **HTMX)
    assert response.status_code == 403 and not Note.objects.exists()


def test_the_conversation_page_shows_notes_in_the_timeline_and_the_contact_panel(operator_client, operator):
    conversation = ConversationFactory(contact_phone="34600123123")
    earlier = ConversationFactory(contact_phone="34600123123", ended=True)
    operator_tools.note_create(conversation=conversation, operator=operator, text="Allergic to peanuts")
    CallFactory(from_number="+34600123123", duration_seconds=71)
    html = operator_client.get(f"/c/{conversation.pk}/").content.decode()
    assert html.count("Allergic to peanuts") == 2  # the timeline and the panel
    assert 'class="contact-panel"' in html and f'href="/c/{earlier.pk}/"' in html
    assert "Handled by the AI alone" in html and "71 s" in html
    assert 'data-compose-tab="note"' in html and 'data-note-composer' in html


def test_the_canned_replies_page_creates_refuses_and_deletes(operator_client, operator):
    assert operator_client.get("/replies/").status_code == 200
    refused = operator_client.post(
        "/replies/", {"title": "Hi", "shortcut": "hi", "text": "Hi {{name}}"}, **HTMX
    )
    assert refused.status_code == 422 and "Unknown variable {{name}}" in refused.content.decode()
    assert "Hi {{name}}" in refused.content.decode()  # what was typed is kept
    created = operator_client.post(
        "/replies/", {"title": "Hi", "shortcut": "hi", "text": "Hi {{customer_name}}", "shared": "on"}, **HTMX
    )
    assert created.status_code == 403  # sharing is for supervisors
    created = operator_client.post("/replies/", {"title": "Hi", "shortcut": "hi", "text": "Hi {{customer_name}}"}, **HTMX)
    assert created.status_code == 200 and "Saved /hi" in created.content.decode()
    reply = CannedReply.objects.get()
    assert reply.owner == operator
    bad_edit = operator_client.post(f"/replies/{reply.pk}/", {"title": "Hi", "shortcut": "hi", "text": "{{oops}}"}, **HTMX)
    assert bad_edit.status_code == 422 and 'open>' in bad_edit.content.decode()  # its form stays open, with why
    edited = operator_client.post(f"/replies/{reply.pk}/", {"title": "Hello", "shortcut": "hello", "text": "Hello"}, **HTMX)
    assert edited.status_code == 200
    reply.refresh_from_db()
    assert (reply.title, reply.shortcut) == ("Hello", "hello")
    assert operator_client.post(f"/replies/{reply.pk}/delete/", **HTMX).status_code == 200
    assert not CannedReply.objects.exists()
    assert AuditEntry.objects.filter(action="canned_reply", outcome="confirmed").count() == 3


def test_a_supervisor_shares_only_when_ticking_the_box(supervisor_client, supervisor):
    CannedReplyFactory(shortcut="greet")
    page = supervisor_client.get("/replies/").content.decode()
    new_form = page[page.index('data-canned-form="new"'):]
    assert 'name="shared">' in new_form  # offered, not ticked
    edit_form = page[: page.index('data-canned-form="new"')]
    assert 'name="shared" checked>' in edit_form  # the shared reply's own form says so
    supervisor_client.post("/replies/", {"title": "Hi", "shortcut": "hi", "text": "Hi", "shared": "on"}, **HTMX)
    supervisor_client.post("/replies/", {"title": "Mine", "shortcut": "mine", "text": "Mine"}, **HTMX)
    assert dict(CannedReply.objects.values_list("shortcut", "owner")) == {"greet": None, "hi": None, "mine": supervisor.pk}


def test_a_viewer_cannot_open_the_canned_replies_page(viewer_client):
    assert viewer_client.get("/replies/").status_code == 403


def test_the_admin_refuses_an_unknown_variable(admin_client):
    response = admin_client.post(
        "/admin/conversations/cannedreply/add/",
        {"title": "Hi", "shortcut": "hi", "text": "Hi {{customer_nickname}}", "usage_count": 0},
    )
    assert response.status_code == 200 and "Unknown variable {{customer_nickname}}" in response.content.decode()
    assert not CannedReply.objects.exists()


def test_the_admin_lists_and_searches_notes(admin_client, operator):
    conversation = ConversationFactory()
    operator_tools.note_create(conversation=conversation, operator=operator, text="Refund promised")
    assert "Refund promised" in admin_client.get("/admin/conversations/note/?q=refund").content.decode()
    assert "Refund promised" in admin_client.get(f"/admin/conversations/conversation/{conversation.pk}/change/").content.decode()
