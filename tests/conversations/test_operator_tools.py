"""Canned replies (variables, sharing, usage), internal notes (never sent, mentions,
search, audit) and the contact panel (sessions, calls, notes; constant queries)."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from conversations import canned, operator_tools
from conversations import operator_tools_selectors as tools
from conversations import selectors, services
from conversations.models import AuditEntry, Call, CannedReply, Command, ContactPause, Message, Note
from tests.factories import (
    CallFactory,
    CannedReplyFactory,
    ConversationFactory,
    MessageFactory,
    OperatorFactory,
    ViewerFactory,
)

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------- variables


def test_variables_are_filled_for_the_conversation_and_the_operator(operator):
    conversation = ConversationFactory(contact_name="Lucía Fernández", contact_phone="34600111222")
    values = tools.fill_values(conversation, operator)
    text = "Hi {{customer_first_name}} ({{ customer_name }}, {{customer_phone}}): {{operator_first_name}} / {{operator_name}}"
    assert canned.fill(text, values) == "Hi Lucía (Lucía Fernández, 34600111222): Ana / Ana Silva"


def test_missing_names_fall_back_to_there_and_the_display_name(db):
    conversation = ConversationFactory(contact_name="")
    nameless = OperatorFactory(username="zed", first_name="", last_name="")
    values = tools.fill_values(conversation, nameless)
    assert canned.fill("Hi {{customer_first_name}}, {{operator_first_name}} here", values) == "Hi there, zed here"


@pytest.mark.parametrize(
    "text, named",
    [
        ("Hi {{customer_nickname}}", "{{customer_nickname}}"),
        ("Hi {{ first_name }}", "{{ first_name }}"),
        ("Hi {{customer_name", "braces"),
        ("Hi customer_name}}", "braces"),
    ],
)
def test_an_unknown_or_malformed_variable_is_refused_naming_it(text, named):
    errors = canned.template_errors(text)
    assert errors and named in " ".join(errors)
    reply = CannedReply(title="Hello", shortcut="hello", text=text)
    with pytest.raises(ValidationError) as refused:
        reply.full_clean()
    assert "text" in refused.value.message_dict


def test_saving_an_unknown_variable_is_refused_and_audited(operator):
    with pytest.raises(ValidationError) as refused:
        operator_tools.canned_reply_save(
            operator=operator, title="Hi", shortcut="hi", text="Hi {{nme}}", shared=False
        )
    assert "{{nme}}" in " ".join(refused.value.messages)
    assert not CannedReply.objects.exists()
    entry = AuditEntry.objects.get(action=AuditEntry.Action.CANNED_REPLY)
    assert entry.outcome == "refused" and "{{nme}}" in entry.detail


def test_shared_replies_are_the_supervisors_personal_ones_their_owners(operator, other_operator, supervisor):
    with pytest.raises(PermissionDenied):
        operator_tools.canned_reply_save(operator=operator, title="A", shortcut="a", text="x", shared=True)
    shared = operator_tools.canned_reply_save(operator=supervisor, title="A", shortcut="/A", text="x", shared=True)
    assert shared.owner is None and shared.shortcut == "a" and shared.created_by == supervisor
    mine = operator_tools.canned_reply_save(operator=operator, title="Mine", shortcut="a", text="y", shared=False)
    assert mine.owner == operator  # the same shortcut as a shared one: mine is personal
    with pytest.raises(services.ActionRefused):
        operator_tools.canned_reply_delete(operator=other_operator, reply=mine)
    with pytest.raises(PermissionDenied):
        operator_tools.canned_reply_delete(operator=operator, reply=shared)
    with pytest.raises(ValidationError):
        operator_tools.canned_reply_save(operator=operator, title="Again", shortcut="a", text="z", shared=False)
    operator_tools.canned_reply_delete(operator=operator, reply=mine)
    assert list(CannedReply.objects.all()) == [shared]


def test_the_picker_offers_shared_and_own_replies_matching_the_letters(operator, other_operator):
    CannedReplyFactory(shortcut="refund", title="Refund policy", usage_count=1)
    CannedReplyFactory(shortcut="return", title="Returns", owner=operator)
    CannedReplyFactory(shortcut="rest", title="Someone else's", owner=other_operator)
    CannedReplyFactory(shortcut="hello", title="About a refund")
    conversation = ConversationFactory()
    offered = tools.canned_reply_picker(operator=operator, conversation=conversation, query="re")
    assert [item.reply.shortcut for item in offered] == ["refund", "return", "hello"]


def test_usage_is_counted_when_inserted(operator, other_operator):
    reply = CannedReplyFactory(owner=operator)
    assert operator_tools.canned_reply_used(operator=operator, reply_id=reply.pk)
    assert not operator_tools.canned_reply_used(operator=other_operator, reply_id=reply.pk)
    reply.refresh_from_db()
    assert reply.usage_count == 1 and reply.last_used_at is not None


# ---------------------------------------------------------------- notes


def test_a_note_is_never_a_command_nor_a_whatsapp_message(operator, django_capture_on_commit_callbacks):
    conversation = ConversationFactory()
    before = (conversation.last_message_preview, conversation.message_count, conversation.last_message_at)
    with django_capture_on_commit_callbacks(execute=True):
        note, _ = operator_tools.note_create(conversation=conversation, operator=operator, text="VIP: refund twice")
    assert not Command.objects.exists()
    entry = note.timeline_entry
    assert (entry.direction, entry.author, entry.operator, entry.text) == ("note", "human", operator, "VIP: refund twice")
    assert not Message.objects.exclude(direction=Message.Direction.NOTE).exists()
    conversation.refresh_from_db()
    assert (conversation.last_message_preview, conversation.message_count, conversation.last_message_at) == before
    audit = AuditEntry.objects.get(action=AuditEntry.Action.NOTE)
    assert audit.outcome == "confirmed" and audit.conversation == conversation and audit.operator == operator


def test_a_viewer_cannot_write_a_note_and_is_audited(viewer):
    conversation = ConversationFactory()
    with pytest.raises(PermissionDenied):
        operator_tools.note_create(conversation=conversation, operator=viewer, text="hello")
    assert not Note.objects.exists()
    assert AuditEntry.objects.get(action=AuditEntry.Action.NOTE).outcome == "refused"


def test_an_empty_note_is_refused():
    with pytest.raises(ValidationError):
        operator_tools.note_create(conversation=ConversationFactory(), operator=OperatorFactory(), text="  ")


def test_mentions_resolve_usernames_and_unique_first_names(operator, other_operator, supervisor):
    OperatorFactory(username="dalia1", first_name="Dalia")
    OperatorFactory(username="dalia2", first_name="Dalia")
    ViewerFactory(username="vera", first_name="Vera")  # watches only: not an operator
    OperatorFactory(username="gone", first_name="Gone", is_active=False)
    found = operator_tools.mentions_resolve(
        f"@{other_operator.username} and @sam, also @Dalia @vera @gone mail@example.com"
    )
    assert found.people == [other_operator, supervisor]
    assert found.unresolved == ["@Dalia", "@vera", "@gone"]


def test_the_inbox_search_finds_a_note(operator):
    conversation = ConversationFactory()
    ConversationFactory()
    operator_tools.note_create(conversation=conversation, operator=operator, text="Promised a voucher")
    rows, _ = selectors.inbox_page(user=operator, q="voucher")
    assert rows == [conversation]
    MessageFactory(note=True, conversation=ConversationFactory(), text="Ana took over")
    assert selectors.inbox_page(user=operator, q="took over")[0] == []  # system dividers are not searched


def test_notes_page_with_the_messages_in_time_order(operator, settings):
    settings.CONVERSATION_PAGE_SIZE = 3
    conversation = ConversationFactory()
    MessageFactory(conversation=conversation, text="one")
    note, _ = operator_tools.note_create(conversation=conversation, operator=operator, text="a note")
    for text in ("two", "three", "four"):
        MessageFactory(conversation=conversation, text=text)
    newest, has_earlier = selectors.conversation_messages(conversation_id=conversation.pk)
    assert [m.text for m in newest] == ["two", "three", "four"] and has_earlier
    earlier, more = selectors.conversation_messages(conversation_id=conversation.pk, before=newest[0].pk)
    assert [m.text for m in earlier] == ["one", "a note"] and not more
    assert earlier[1].pk == note.timeline_entry_id


# ---------------------------------------------------------------- the contact panel


def test_the_contact_panel_lists_sessions_calls_and_notes(operator, other_operator, supervisor):
    phone = "34600999888"
    current = ConversationFactory(contact_phone=phone)
    handled = ConversationFactory(contact_phone=phone)
    alone = ConversationFactory(contact_phone=phone, ended=True)
    ConversationFactory()  # another contact
    ConversationFactory(contact_phone=phone, agent_id="another-agent")
    for person in (operator, other_operator, operator):
        command = services.conversation_take_over(conversation=handled, operator=person, force=True)
        services.command_confirm(command=command)
    operator_tools.note_create(conversation=handled, operator=operator, text="Wants invoices by email")
    operator_tools.note_create(conversation=current, operator=other_operator, text="Second time this week")
    CallFactory(from_number="+" + phone, duration_seconds=65, end_reason="hangup")
    CallFactory(from_number="+34999")
    ContactPause.objects.create(agent_id=current.agent_id, contact_phone=phone, paused_by=supervisor)

    panel = tools.contact_panel(current)

    assert [s.conversation for s in panel.sessions] == [alone, handled]
    assert [s.outcome for s in panel.sessions] == ["Handled by the AI alone", "Taken over by Ana Silva, Bruno Costa"]
    assert [n.text for n in panel.notes] == ["Second time this week", "Wants invoices by email"]
    assert [c.from_number for c in panel.calls] == ["+" + phone]
    assert panel.pause.paused_by == supervisor


def test_the_contact_panel_reads_in_constant_queries(operator, django_assert_max_num_queries):
    phone = "34600777666"
    current = ConversationFactory(contact_phone=phone)
    for _ in range(30):
        earlier = ConversationFactory(contact_phone=phone)
        command = services.conversation_take_over(conversation=earlier, operator=OperatorFactory())
        services.command_confirm(command=command)
        operator_tools.note_create(conversation=earlier, operator=operator, text="note")
        CallFactory(from_number="+" + phone)
    with django_assert_max_num_queries(5):
        panel = tools.contact_panel(current)
        rendered = [s.outcome for s in panel.sessions] + [n.author.username for n in panel.notes]
    assert len(panel.sessions) == tools.PANEL_SHOWN and panel.more_sessions
    assert len(rendered) == 2 * tools.PANEL_SHOWN and panel.more_calls
    assert Call.objects.count() == 30
