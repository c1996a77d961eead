"""Recognising that a customer asks for a person, in five languages, and what they mention."""

import pytest

from conversations import handoff

ASK = handoff.phrases_from_text(handoff.DEFAULT_ASK_PHRASES)
AI = handoff.phrases_from_text(handoff.AI_PASSES_PHRASES)


@pytest.mark.parametrize(
    "text",
    [
        "Can I talk to a real person?",
        "I want to speak to an agent please",
        "Quiero hablar con una PERSONA",
        "¿Puedo hablar con alguien?",
        "Quero falar com um atendente",
        "Je veux parler à une personne",
        "Ich möchte mit jemandem sprechen",
    ],
)
def test_asking_for_a_person_is_recognised(text):
    assert handoff.first_match(text, ASK)


@pytest.mark.parametrize(
    "text", ["A personalised gift, please", "Where is my order?", "Humanity is great", ""]
)
def test_ordinary_messages_are_not(text):
    assert handoff.first_match(text, ASK) is None


def test_the_ai_passing_the_conversation_on_is_recognised():
    assert handoff.first_match("Let me pass you to a colleague who can help.", AI)
    assert handoff.first_match("Your order ships tomorrow.", AI) is None


def test_supervisors_phrases_replace_the_defaults():
    mine = handoff.phrases_from_text("  Manager \n\nboss please\n")
    assert mine == ("manager", "boss please")
    assert handoff.first_match("Get me your MANAGER", mine) == "manager"
    assert handoff.first_match("real person", mine) is None


def test_the_brief_lists_what_the_customer_mentioned():
    found = handoff.mentions(
        ["My order #48213 arrived broken", "mail me at ana@example.com or +34 612 345 678",
         "I paid 25.50€", "order #48213 again"]
    )
    assert found.orders == ["48213"]
    assert found.emails == ["ana@example.com"]
    assert found.phones == ["+34 612 345 678"]
    assert found.amounts == ["25.50€"]
    assert not handoff.mentions(["hello"])
