"""The simulator's stand-in for the LLM: canned, believable support replies.

``compose_reply`` looks at the customer's latest message (keywords such as
order, refund, human) and at what it remembers of the session, so that:

* a follow-up ("yes please", an address, "can you check?") continues the
  topic it answered last instead of starting over;
* an order number the customer gave is remembered and used afterwards;
* after a human operator wrote in the session, the AI's next answer says so,
  the way the real AI has the human's messages in its history.

It only ever reads the last few history entries, so it stays O(1) per reply
even in a session with thousands of messages.
"""

from __future__ import annotations

import re
from typing import Any

from .state import Session

_LOOKBACK = 12  # history entries considered


def _words(*words: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


# Order matters: first match wins.
_INTENTS: list[tuple[str, re.Pattern[str]]] = [
    ("human", _words(r"human", r"person", r"agent", r"operator", r"representative",
                     r"someone real", r"talk to (?:a|someone)", r"speak (?:to|with) (?:a|someone)",
                     r"anyone there")),
    ("damaged", _words(r"broken", r"damaged", r"smashed", r"wrong (?:item|size|colou?r)",
                       r"doesn'?t (?:work|turn on)", r"not working", r"defective")),
    ("billing", _words(r"subscription", r"charged twice", r"double charged?", r"charged",
                       r"invoice", r"billing", r"bill")),
    ("refund", _words(r"refunds?", r"return", r"money back", r"reimburse\w*")),
    ("replacement", _words(r"replacement", r"replace", r"exchange", r"new one")),
    ("cancel", _words(r"cancel\w*")),
    ("address", _words(r"address", r"won'?t be (?:at )?home", r"not (?:be )?at home")),
    ("price", _words(r"price", r"cost", r"how much", r"discount", r"coupon", r"promo",
                     r"sizes?", r"in stock", r"stock")),
    ("order", _words(r"orders?", r"ordered", r"package", r"parcel", r"delivery", r"shipping",
                     r"shipped", r"tracking", r"track", r"arrived?", r"where is",
                     r"hasn'?t arrived")),
    ("bye", _words(r"bye", r"goodbye", r"see you", r"that'?s all")),
    ("thanks", _words(r"thanks?", r"thank you", r"thx", r"great", r"perfect", r"awesome",
                      r"gracias")),
    ("yes", _words(r"yes", r"yeah", r"yep", r"sure", r"ok(?:ay)?", r"please do", r"go ahead")),
    ("no", _words(r"no", r"nope", r"not now")),
    ("greeting", _words(r"hi", r"hello", r"hey", r"hola", r"good (?:morning|afternoon|evening)")),
]

_ORDER_NO = re.compile(r"#?\b(\d{4,8})\b")
_MEDIA_NAMES = {"image": "photo", "video": "video", "document": "document"}


def detect_intent(text: str) -> str:
    for name, pattern in _INTENTS:
        if pattern.search(text):
            return name
    return "other"


def _first_name(name: str) -> str:
    first = (name or "").strip().split(" ")[0]
    return first if first and not first.isdigit() else "there"


def _snippet(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def compose_reply(session: Session, text: str, type: str = "text") -> str:
    """The AI's answer to the customer's latest message ``text`` in ``session``.

    The latest message must already be in ``session.history``.
    """
    memory = session.ai_memory
    name = _first_name(session.contact_name)
    text = text or ""

    # What did a human operator say since the AI last spoke?
    human_said = ""
    for entry in reversed(session.history[-_LOOKBACK:-1]):
        if entry["role"] == "assistant":
            if entry.get("source") != "human":
                break
            human_said = human_said or entry["content"]

    topic = memory.get("topic")
    number = _ORDER_NO.search(text)
    # A number is an order number if the customer says so, was asked for one, or sent it alone
    # (so a postcode in an address is not taken for one).
    if number and ("order" in text.lower() or topic == "ask_order"
                   or text.strip(" #.") == number.group(1)):
        memory["order_no"] = number.group(1)
    else:
        number = None
    order = f"order #{memory['order_no']}" if memory.get("order_no") else "your order"

    intent = detect_intent(text)
    if type in _MEDIA_NAMES and topic == "damaged":
        intent = "damage_photo"
    elif intent == "other" and number and topic in (None, "order", "greeting", "ask_order"):
        intent = "order"

    body = _answer(intent, topic, name, order, text, type, memory)
    prefix = ""
    if human_said:
        prefix = f'I can see my colleague told you: "{_snippet(human_said, 70)}" '
        if intent not in ("thanks", "bye", "greeting", "yes", "no"):
            prefix += "Picking up from there: "
    if type == "audio":
        prefix += "Thanks for the voice note, I've listened to it. "
    return prefix + body


def _answer(intent: str, topic: str | None, name: str, order: str, text: str, type: str,
            memory: dict) -> str:
    """The body of the reply; updates ``memory["topic"]``."""
    known_order = order != "your order"
    memory["topic"] = intent

    if intent == "human":
        return (f"Of course, {name}. I've asked a colleague from the team to join this chat; "
                "they'll be with you shortly. In the meantime, is there anything I can check "
                "for you?")
    if intent == "damaged":
        return (f"I'm really sorry about that, {name}. Could you send me a photo of the item? "
                "As soon as I have it I can send a replacement or give you a full refund, "
                "whichever you prefer.")
    if intent == "damage_photo":
        memory["topic"] = "damaged"
        return ("Thanks for the photo, I can see the damage. I can send you a replacement "
                "today or refund you in full. Which would you prefer?")
    if intent == "billing":
        memory["billing_checked"] = True
        return (f"Let me look at your billing, {name}. I can see two charges of 9.99 EUR this "
                "month; the second one is a duplicate and I've flagged it for a refund. "
                "You'll see it back in 3-5 business days.")
    if intent == "refund":
        if topic == "billing" or memory.get("billing_checked"):
            memory["topic"] = "billing"
            return ("Yes, the refund goes back to the same card you paid with. It usually shows up "
                    "within 3-5 business days.")
        if memory.get("return_open"):
            memory["topic"] = "refund_done"
            return ("Once the item is back in our warehouse the refund takes 5-7 business days to "
                    "reach your account. We'll email you as soon as it's processed.")
        return ("I'm sorry it didn't work out. Refunds go back to your original payment method "
                "within 5-7 business days once the item is back with us. "
                f"Shall I open the return for {order}?")
    if intent == "replacement":
        return (f"Done: a replacement for {order} ships today and you'll get the tracking link "
                "by email. No need to send the damaged one back.")
    if intent == "cancel":
        return (f"I can cancel {order} as long as it hasn't shipped yet. "
                "Do you want me to go ahead?")
    if intent == "address":
        return ("No problem, the parcel hasn't reached the local depot yet, so I can still "
                "change the delivery address. What address should we use?")
    if intent == "price":
        lowered = text.lower()
        if any(w in lowered for w in ("discount", "coupon", "promo")):
            return "Yes! Use WELCOME10 at checkout for 10% off your first order."
        if "ship" in lowered or "deliver" in lowered:
            return ("Shipping within the EU is 4.95 EUR and free over 50 EUR; it usually takes "
                    "2-4 business days.")
        return ("Yes, we have it in stock in sizes 36 to 46, in black and blue. "
                "Would you like a link to order it?")
    if intent == "order":
        if not known_order:
            memory["topic"] = "ask_order"
            return ("Let me check that for you. Could you send me your order number? "
                    "You'll find it in the confirmation email.")
        return (f"I've checked {order}: it left our warehouse yesterday and is with the "
                "courier. It should arrive within 1-2 business days. "
                f"You can follow it here: https://track.example.com/{order.split('#')[-1]}")
    if intent == "bye":
        return f"Thanks for writing to us, {name}. Have a great day!"
    if intent == "thanks":
        memory["topic"] = topic
        return f"You're welcome, {name}! Is there anything else I can help you with?"
    if intent == "yes":
        memory["topic"] = topic
        if topic == "refund":
            memory["return_open"] = True
            memory["topic"] = "refund_done"
            return (f"Done: the return for {order} is open. You'll get a prepaid shipping label "
                    "by email within the hour.")
        if topic == "cancel":
            return f"{order[0].upper() + order[1:]} is cancelled. The refund is on its way."
        if topic == "damaged":
            return "Great, I'll wait for the photo and sort it out right away."
        return "Perfect. Anything else I can do for you?"
    if intent == "no":
        memory["topic"] = topic
        return "No problem at all. Let me know if there's anything else."
    if intent == "greeting":
        return (f"Hi {name}! I'm the virtual assistant. How can I help you today? "
                "If it's about an order, send me the order number.")

    # Nothing recognised: continue the topic we were on, if any.
    memory["topic"] = topic
    if topic == "address":
        return (f"Thanks, I've updated the delivery address to: {_snippet(text, 80)}. "
                "The courier will deliver there.")
    if topic == "billing":
        return ("I've double-checked: the duplicate charge is flagged and the refund is already "
                "on its way. Anything else?")
    if topic == "human":
        return (f"I understand, {name}, and I'm sorry for the trouble. I've marked this "
                "conversation as urgent so a colleague replies here as soon as possible.")
    if type in _MEDIA_NAMES:
        return (f"Thanks for the {_MEDIA_NAMES[type]}, {name}. I've attached it to your case. "
                "Could you tell me briefly what it is about?")
    return (f"Thanks, {name}. Just to be sure I understand: \"{_snippet(text, 60)}\". "
            "Could you give me a bit more detail, or your order number if it's about an order?")


# --------------------------------------------------------------------------- voice


def compose_voice_reply(call: Any, text: str) -> tuple[str, dict[str, Any] | None]:
    """The AI's spoken answer to the caller's latest line, and the tool it calls first
    (``{"name", "arguments"}``) or None. Short sentences, nothing to read out (no links).

    ``call`` needs ``ai_memory`` (a dict); the replies follow the same intents as the
    WhatsApp ones, and an order number the caller gave is looked up with a tool call.
    """
    memory = call.ai_memory
    topic = memory.get("topic")
    number = _ORDER_NO.search(text or "")
    if number and ("order" in text.lower() or topic == "ask_order"
                   or text.strip(" #.") == number.group(1)):
        memory["order_no"] = number.group(1)
    else:
        number = None
    intent = detect_intent(text or "")
    if intent == "other" and number:
        intent = "order"
    memory["topic"] = intent
    tool: dict[str, Any] | None = None

    if intent == "human":
        reply = ("Of course. I'm letting a colleague know that you'd like to speak to a person. "
                 "Please stay on the line.")
    elif intent == "order" or (intent in ("address", "other") and number):
        order_no = memory.get("order_no")
        if order_no is None:
            memory["topic"] = "ask_order"
            reply = "I can check that for you. What is your order number?"
        elif intent == "address":
            reply = (f"I can still change the delivery address of order {order_no}. "
                     "What address should we use?")
        else:
            tool = {"name": "lookup_order", "arguments": {"order_id": order_no}}
            reply = (f"I've found order {order_no}. It left our warehouse yesterday and should "
                     "arrive within one or two business days.")
    elif intent == "address":
        reply = "No problem, I can still change the delivery address. What address should we use?"
    elif intent == "billing":
        tool = {"name": "lookup_billing", "arguments": {}}
        reply = ("I can see two charges this month; the second one is a duplicate and I've "
                 "asked for it to be refunded.")
    elif intent == "refund":
        reply = "Refunds go back to your original payment method within five to seven business days."
    elif intent == "damaged":
        reply = "I'm sorry about that. I can send you a replacement today or refund you in full."
    elif intent == "replacement":
        reply = "Done, a replacement ships today. You'll get the tracking details by email."
    elif intent == "cancel":
        reply = "I can cancel it as long as it hasn't shipped yet. Shall I go ahead?"
    elif intent == "bye":
        reply = "Thanks for calling. Goodbye!"
    elif intent == "thanks":
        memory["topic"] = topic
        reply = "You're welcome! Is there anything else I can help you with?"
    elif intent == "greeting":
        reply = "Hi, thanks for calling. How can I help you today?"
    elif intent in ("yes", "no"):
        memory["topic"] = topic
        reply = "All right. Anything else I can do for you?"
    elif topic == "address":
        memory["topic"] = "address"
        reply = f"Thanks, I've changed the delivery address to {_snippet(text, 60)}."
    else:
        memory["topic"] = topic
        reply = "Sorry, could you tell me a bit more? If it's about an order, the order number helps."
    return reply, tool
