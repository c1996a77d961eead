"""The calls pages and their live captions."""

from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from django.db import connections

from conversations import ingest, notify
from conversations.models import Call
from tests.dashboard.test_consumers import receive_until_cursor, session_cookie, socket
from tests.factories import OperatorFactory


def a_call(call_id="CA1", **extra) -> Call:
    call = ingest.ingest_call_started(
        agent_id="support", call_id=call_id, from_number="+14155550123", to_number="+14155550100",
        direction="inbound",
    )
    ingest.ingest_call_caller_line(agent_id="support", call_id=call_id, message_id="um_1", text="Where is my order?")
    ingest.ingest_call_line_confirmed(agent_id="support", call_id=call_id, message_id="msg_1", text="Let me look.")
    return call


@pytest.mark.django_db
class TestPages:
    def test_login_required(self, client):
        assert client.get("/calls/").status_code == 302
        call = a_call()
        assert client.get(f"/calls/{call.pk}/").status_code == 302

    def test_the_list_shows_live_and_ended_calls(self, operator_client):
        live = a_call("CA1")
        ended = a_call("CA2")
        ingest.ingest_call_ended(agent_id="support", call_id="CA2", reason="hangup", duration_seconds=42)
        html = operator_client.get("/calls/").content.decode()
        live_part, ended_part = html.split('id="calls-ended"')
        assert f'id="call-row-{live.pk}"' in live_part and 'data-format="duration"' in live_part
        assert f'href="/calls/{ended.pk}/"' in ended_part and "hangup" in ended_part and "42 s" in ended_part
        assert "<bdi>+14155550123</bdi>" in html
        assert 'href="/calls/"' in html  # the top bar's link

    def test_a_call_page_shows_its_lines_isolated_and_no_inline_script(self, operator_client):
        call = a_call()
        html = operator_client.get(f"/calls/{call.pk}/").content.decode()
        assert "<bdi>Where is my order?</bdi>" in html and "<bdi>Let me look.</bdi>" in html
        assert html.index("Where is my order?") < html.index("Let me look.")
        assert f"call={call.pk}" in html  # its socket joins the call's group
        assert not re.search(r"<script(?![^>]*\bsrc=)", html)

    def test_a_forwarded_call_says_where_it_went(self, operator_client):
        call = a_call()
        ingest.ingest_call_forwarded(agent_id="support", call_id="CA1", to="+34600000000")
        ingest.ingest_call_ended(agent_id="support", call_id="CA1", reason="forwarded")
        html = operator_client.get(f"/calls/{call.pk}/").content.decode()
        assert "left Pinecall" in html and "<bdi>+34600000000</bdi>" in html

    def test_an_unknown_call_is_404(self, operator_client):
        assert operator_client.get("/calls/999/").status_code == 404


@pytest.fixture
def fresh_layer():
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.mark.django_db(transaction=True)
async def test_a_call_page_gets_its_lines_and_live_captions(fresh_layer):
    operator = await sync_to_async(OperatorFactory)()
    cookie = await sync_to_async(session_cookie)(operator)
    call = await sync_to_async(a_call)()
    comm = socket(f"/ws/live/?call={call.pk}", cookie)
    connected, _ = await comm.connect()
    assert connected
    await receive_until_cursor(comm)
    catch_up = [await comm.receive_from(timeout=3) for _ in range(3)]  # header and two lines
    assert 'id="call-header"' in catch_up[0] and "Where is my order?" in catch_up[1]

    await sync_to_async(notify.call_caption)("CA1", "user.speaking", text="I want")
    draft = await comm.receive_from(timeout=3)
    assert 'id="call-draft"' in draft and "<bdi>I want</bdi>" in draft
    assert "Caller speaking" in await comm.receive_from(timeout=3)

    await sync_to_async(notify.call_caption)("CA1", "bot.speaking", message_id="msg_2", text="")
    line = await comm.receive_from(timeout=3)
    assert 'hx-swap-oob="beforeend:#call-lines"' in line and "is-live" in line
    await comm.receive_from(timeout=3)  # AI speaking
    await sync_to_async(notify.call_caption)("CA1", "bot.word", message_id="msg_2", word="Sure")
    word = await comm.receive_from(timeout=3)
    key = re.search(r'id="words-(\w+)"', line).group(1)
    assert f'beforeend:#words-{key}' in word and "Sure" in word

    # The final line takes the live line's place (same id), and the caller's clears the draft.
    await sync_to_async(ingest.ingest_call_line_confirmed)(
        agent_id="support", call_id="CA1", message_id="msg_2", text="Sure thing"
    )
    final = await comm.receive_from(timeout=3)
    assert f'id="line-{key}"' in final and "Sure thing" in final
    await sync_to_async(ingest.ingest_call_caller_line)(
        agent_id="support", call_id="CA1", message_id="um_2", text="I want a refund"
    )
    caller = await comm.receive_from(timeout=3)
    assert "I want a refund" in caller and 'id="call-draft"' in caller
    await comm.disconnect()
    await sync_to_async(connections.close_all)()


@pytest.mark.django_db
class TestSteppingIn:
    def test_an_operator_may_say_a_line_through_the_outbox_with_audit(self, operator_client, operator):
        from conversations.models import AuditEntry, Command

        call = a_call()
        response = operator_client.post(f"/calls/{call.pk}/say/", {"text": "  A person   here. "})
        assert response.status_code == 200
        command = Command.objects.get()
        assert (command.kind, command.scope, command.session_id, command.text, command.status) == (
            "say", "call", "CA1", "A person here.", "pending"
        )
        assert command.line_id.startswith("sup_") and command.call_id == call.pk
        audit = AuditEntry.objects.get(command=command)
        assert (audit.operator, audit.action, audit.outcome) == (operator, "call_say", "pending")

    def test_an_empty_line_is_refused(self, operator_client):
        call = a_call()
        assert operator_client.post(f"/calls/{call.pk}/say/", {"text": " "}).status_code == 422

    def test_only_supervisors_hang_up_and_forward(self, operator_client, viewer_client, supervisor_client):
        from conversations.models import Command

        call = a_call()
        assert viewer_client.post(f"/calls/{call.pk}/say/", {"text": "Hi"}).status_code == 403
        assert operator_client.post(f"/calls/{call.pk}/hang-up/").status_code == 403
        assert operator_client.post(f"/calls/{call.pk}/forward/", {"to": "+34600000000"}).status_code == 403
        assert not Command.objects.exists()
        assert supervisor_client.post(f"/calls/{call.pk}/forward/", {"to": "12"}).status_code == 422
        assert supervisor_client.post(f"/calls/{call.pk}/forward/", {"to": "+34600000000"}).status_code == 200
        assert supervisor_client.post(f"/calls/{call.pk}/hang-up/").status_code == 200
        assert list(Command.objects.values_list("kind", "text")) == [("forward", "+34600000000"), ("hangup", "")]

    def test_an_ended_call_refuses_actions(self, supervisor_client):
        call = a_call()
        ingest.ingest_call_ended(agent_id="support", call_id="CA1", reason="hangup")
        response = supervisor_client.post(f"/calls/{call.pk}/hang-up/")
        assert response.status_code == 409 and "ended" in response.content.decode()

    def test_the_page_offers_each_role_its_actions(self, operator_client, supervisor_client, viewer_client):
        call = a_call()
        operator_page = operator_client.get(f"/calls/{call.pk}/").content.decode()
        assert f"/calls/{call.pk}/say/" in operator_page and "hang-up/" not in operator_page
        supervisor_page = supervisor_client.get(f"/calls/{call.pk}/").content.decode()
        assert "hang-up/" in supervisor_page and 'hx-confirm="Hang up on this caller?"' in supervisor_page
        assert f"/calls/{call.pk}/forward/" in supervisor_page
        assert "/say/" not in viewer_client.get(f"/calls/{call.pk}/").content.decode()


    def test_supervisors_hold_mute_and_stop_through_the_outbox_with_audit(
        self, operator_client, supervisor_client, supervisor
    ):
        from conversations.models import AuditEntry, Command

        call = a_call()
        for action in ("hold", "unhold", "mute", "unmute", "stop"):
            assert operator_client.post(f"/calls/{call.pk}/{action}/").status_code == 403
        assert not Command.objects.exists()
        assert list(AuditEntry.objects.filter(outcome="refused").order_by("id").values_list("action", flat=True)) == [
            "call_hold", "call_unhold", "call_mute", "call_unmute", "call_stop"
        ]
        for action in ("hold", "unhold", "mute", "unmute", "stop"):
            assert supervisor_client.post(f"/calls/{call.pk}/{action}/").status_code == 200
        assert list(Command.objects.values_list("kind", "scope", "session_id", "status")) == [
            (kind, "call", "CA1", "pending") for kind in ("hold", "unhold", "mute", "unmute", "stop")
        ]
        assert list(
            AuditEntry.objects.filter(operator=supervisor, outcome="pending").order_by("id").values_list("action", flat=True)
        ) == ["call_hold", "call_unhold", "call_mute", "call_unmute", "call_stop"]
        assert supervisor_client.get(f"/calls/{call.pk}/hold/").status_code == 405

    def test_forward_to_my_phone_needs_my_number_first(self, operator_client, operator):
        from conversations.models import Command

        call = a_call()
        page = operator_client.get(f"/calls/{call.pk}/").content.decode()
        assert "Set my phone to take calls" in page and "forward-to-me/" not in page
        refused = operator_client.post(f"/calls/{call.pk}/forward-to-me/")
        assert refused.status_code == 422 and "Set your phone number first" in refused.content.decode()
        assert operator_client.post("/me/phone/", {"phone": "call me"}).status_code == 422
        saved = operator_client.post("/me/phone/", {"phone": "+34 600 000 111", "call": str(call.pk)})
        assert saved.status_code == 200 and f"/calls/{call.pk}/forward-to-me/" in saved.content.decode()
        assert "Forward to my phone" in operator_client.get(f"/calls/{call.pk}/").content.decode()
        assert operator_client.post(f"/calls/{call.pk}/forward-to-me/").status_code == 200
        assert list(Command.objects.values_list("kind", "text", "operator")) == [
            ("forward", "+34600000111", operator.pk)
        ]

    def test_the_header_follows_hold_and_mute(self, supervisor_client):
        call = a_call()
        page = supervisor_client.get(f"/calls/{call.pk}/").content.decode()
        assert 'data-on-hold="0" data-muted="0"' in page and "On hold" not in page
        ingest.ingest_call_switched(agent_id="support", call_id="CA1", on_hold=True)
        ingest.ingest_call_switched(
            agent_id="support", call_id="CA1", caller_muted=False, muted_transcript="<b>just us</b>"
        )
        page = supervisor_client.get(f"/calls/{call.pk}/").content.decode()
        assert 'data-on-hold="1" data-muted="0"' in page and "On hold: the caller hears music" in page
        assert "&lt;b&gt;just us&lt;/b&gt;" in page and "while muted" in page


@pytest.mark.django_db
def test_a_caller_asking_for_a_person_sorts_first_and_badges_the_calls_tab(operator_client):
    quiet = a_call("CA1")
    asking = a_call("CA2")
    newest = a_call("CA3")
    assert 'id="calls-waiting" data-count="0" hidden' in operator_client.get("/").content.decode()
    ingest.ingest_call_caller_line(agent_id="support", call_id="CA2", message_id="um_9", text="I want a human")
    page = operator_client.get("/calls/").content.decode()
    rows = re.findall(r'id="call-row-(\d+)"', page)
    assert rows[:3] == [str(asking.pk), str(newest.pk), str(quiet.pk)]
    assert 'id="calls-waiting" data-count="1"' in operator_client.get("/").content.decode()


@pytest.mark.django_db
def test_admin_lists_calls_with_their_lines(admin_client):
    call = a_call()
    assert "+14155550123" in admin_client.get("/admin/conversations/call/").content.decode()
    page = admin_client.get(f"/admin/conversations/call/{call.pk}/change/").content.decode()
    assert "Where is my order?" in page


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_forwards_then_ends_renders_the_end(monkeypatch):
    """Coalesced notifications keep the first write's object: the renderer reads fresh."""
    sent = []
    monkeypatch.setattr(notify, "send_html", lambda group, html: sent.append((group, html)))
    a_call()
    with notify.coalesced():
        ingest.ingest_call_forwarded(agent_id="support", call_id="CA1", to="+34600000000")
        ingest.ingest_call_ended(agent_id="support", call_id="CA1", reason="forwarded")
    headers = [html for group, html in sent if group == notify.call_group("CA1") and 'id="call-header"' in html]
    assert headers and 'data-state="ended"' in headers[-1] and "+34600000000" in headers[-1]


@pytest.mark.django_db
def test_admin_keeps_an_operators_phone_with_the_apps_check(admin_client, operator):
    from conversations.models import OperatorProfile

    url = "/admin/conversations/operatorprofile/add/"
    refused = admin_client.post(url, {"user": operator.pk, "phone": "call me"})
    assert refused.status_code == 200 and "E.164" in refused.content.decode()
    assert admin_client.post(url, {"user": operator.pk, "phone": "+34 600 000 111"}).status_code == 302
    assert OperatorProfile.objects.get(user=operator).phone == "+34600000111"
