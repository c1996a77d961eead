"""factory_boy factories shared by every test suite.

Users: UserFactory (no permission), OperatorFactory (take over / reply / hand back),
ViewerFactory (reads only), SupervisorFactory (operator + pause a contact or the agent).
Domain: ConversationFactory (an active conversation, its 24-hour window open, the AI
answering; traits `ended` and `held`), MessageFactory (a customer's text;
traits `ai`, `human`, `note`, `voice`, `image`, `failed`). A MessageFactory keeps its
conversation's inbox columns in step, as the services do; pass `touch=False` not to.
CannedReplyFactory (a shared reply; pass `owner` for a personal one), CallFactory
(an ended call from a phone number).
"""

from __future__ import annotations

import factory
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from conversations.models import Call, CannedReply, Conversation, Message
from conversations.services import conversation_record_message

TAKE_OVER = "take_over_conversation"
PAUSE_WIDE = "pause_contact_or_agent"

FIRST_NAMES = ["Ana", "Bruno", "Chen", "Dalia", "Emeka", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
CUSTOMER_NAMES = [
    "Lucía Fernández", "Marco Rossi", "Aisha Bello", "Tom Becker", "Sofia Nunes",
    "Kenji Mori", "Olga Petrova", "Ravi Kumar", "Emma Dubois", "Diego Ramos",
]


def grant(user, *codenames: str) -> None:
    """Give `user` the conversations app's permissions by codename."""
    perms = Permission.objects.filter(
        content_type__app_label="conversations", codename__in=codenames
    )
    user.user_permissions.add(*perms)
    # has_perm caches per instance: forget what it knew.
    for attr in ("_perm_cache", "_user_perm_cache", "_group_perm_cache"):
        user.__dict__.pop(attr, None)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    first_name = factory.Iterator(FIRST_NAMES)
    last_name = ""
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pass-word-123")


class ViewerFactory(UserFactory):
    """Logged in, no permission: watches conversations, cannot act."""

    username = factory.Sequence(lambda n: f"viewer{n}")


class OperatorFactory(UserFactory):
    """Takes over, replies to and hands back conversations."""

    username = factory.Sequence(lambda n: f"operator{n}")

    @factory.post_generation
    def permissions(obj, create, extracted, **kwargs):
        if create:
            grant(obj, TAKE_OVER, *(extracted or ()))


class SupervisorFactory(UserFactory):
    """An operator who may also pause a contact or the whole agent (the kill switch)."""

    username = factory.Sequence(lambda n: f"supervisor{n}")

    @factory.post_generation
    def permissions(obj, create, extracted, **kwargs):
        if create:
            grant(obj, TAKE_OVER, PAUSE_WIDE, *(extracted or ()))


class ConversationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Conversation

    session_id = factory.Sequence(lambda n: f"sess-{n:06d}")
    agent_id = factory.LazyFunction(lambda: settings.PINECALL_AGENT_ID)
    contact_phone = factory.Sequence(lambda n: f"346{n:08d}")  # digits, as Pinecall sends
    contact_name = factory.Iterator(CUSTOMER_NAMES)
    started_at = factory.LazyFunction(timezone.now)
    last_message_at = factory.LazyFunction(timezone.now)
    last_customer_message_at = factory.LazyFunction(timezone.now)
    last_message_preview = "Hello, I have a question about my order"
    last_message_author = Message.Author.CUSTOMER
    # `needs_human=True` means waiting for a person since now, as the ingest marks it.
    needs_human = False
    needs_human_since = factory.LazyAttribute(lambda o: timezone.now() if o.needs_human else None)
    needs_human_reason = factory.LazyAttribute(lambda o: "asked" if o.needs_human else "")

    class Params:
        ended = factory.Trait(
            state=Conversation.State.ENDED,
            end_reason="idle_timeout",
            ended_at=factory.LazyFunction(timezone.now),
        )
        # Held by a human, the pause confirmed by Pinecall.
        held = factory.Trait(
            holder=Conversation.Holder.HUMAN,
            held_by=factory.SubFactory(OperatorFactory),
            held_since=factory.LazyFunction(timezone.now),
            ai_paused=True,
        )


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message
        skip_postgeneration_save = True

    conversation = factory.SubFactory(ConversationFactory)
    direction = Message.Direction.INBOUND
    author = Message.Author.CUSTOMER
    type = Message.Type.TEXT
    text = factory.Sequence(lambda n: f"Customer message {n}")
    message_id = factory.Sequence(lambda n: f"wamid.test{n:08d}")
    status = ""
    error = ""
    created_at = factory.LazyFunction(timezone.now)
    status_changed_at = factory.LazyAttribute(lambda m: m.created_at if m.status else None)

    class Params:
        ai = factory.Trait(
            direction=Message.Direction.OUTBOUND,
            author=Message.Author.AI,
            status=Message.Status.SENT,
            message_id=None,
            text=factory.Sequence(lambda n: f"AI reply {n}"),
        )
        human = factory.Trait(
            direction=Message.Direction.OUTBOUND,
            author=Message.Author.HUMAN,
            operator=factory.SubFactory(OperatorFactory),
            status=Message.Status.PENDING,
            message_id=None,
            text=factory.Sequence(lambda n: f"Operator reply {n}"),
        )
        note = factory.Trait(
            direction=Message.Direction.NOTE,
            author=Message.Author.SYSTEM,
            message_id=None,
            text="Handed back to the AI",
        )
        voice = factory.Trait(type=Message.Type.AUDIO, text="Voice transcript: where is my parcel?")
        image = factory.Trait(type=Message.Type.IMAGE, text="Photo of the damaged box")
        failed = factory.Trait(status=Message.Status.FAILED, error="Pinecall refused the message")

    @factory.post_generation
    def touch(obj, create, extracted, **kwargs):
        """Keep the conversation's inbox columns in step (unless touch=False), as services do."""
        if not create or extracted is False or obj.direction == Message.Direction.NOTE:
            return
        c = obj.conversation
        fields = conversation_record_message(c, obj)
        Conversation.objects.filter(pk=c.pk).update(**{f: getattr(c, f) for f in fields})


class CannedReplyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = CannedReply

    title = factory.Sequence(lambda n: f"Reply {n}")
    shortcut = factory.Sequence(lambda n: f"reply{n}")
    text = "Hi {{customer_first_name}}, {{operator_first_name}} here."
    owner = None


class CallFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Call

    call_id = factory.Sequence(lambda n: f"call-{n:06d}")
    agent_id = factory.LazyFunction(lambda: settings.PINECALL_AGENT_ID)
    from_number = factory.Sequence(lambda n: f"+3461{n:07d}")
    to_number = "+34910000000"
    direction = "inbound"
    state = Call.State.ENDED
    started_at = factory.LazyFunction(timezone.now)
    ended_at = factory.LazyFunction(timezone.now)
    end_reason = "hangup"
    duration_seconds = 42.0
