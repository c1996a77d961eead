"""Django admin: everything visible, conversations steerable through the same services."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied

from conversations import services, worker
from conversations.models import (
    AgentState,
    Call,
    CallUtterance,
    AuditEntry,
    Command,
    ContactPause,
    Conversation,
    DeadLetter,
    AlertPreferences,
    HandoffPolicy,
    IngestCursor,
    CannedReply,
    Message,
    Note,
    OperatorProfile,
    Takeover,
    WorkerProcess,
)


class UnreceivedFilter(admin.SimpleListFilter):
    """Conversations whose Pinecall history holds customer messages the stream never brought."""

    title = "messages not received"
    parameter_name = "unreceived"

    def lookups(self, request, model_admin):
        return [("yes", "Pinecall has messages we did not receive")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(unreceived=[])
        return queryset


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ["created_at", "author", "operator", "type", "text", "status", "message_id", "altered"]
    readonly_fields = fields
    ordering = ["id"]


class NoteInline(ReadOnlyInline):
    model = Note
    fields = ["created_at", "author", "text"]
    readonly_fields = fields
    ordering = ["id"]


class CommandInline(ReadOnlyInline):
    model = Command
    fields = ["created_at", "kind", "operator", "status", "error_code", "error_message"]
    readonly_fields = fields


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = [
        "contact_name",
        "contact_phone",
        "state",
        "holder",
        "held_by",
        "ai_paused",
        "needs_human",
        "message_count",
        "unreceived_count",
        "last_message_at",
        "agent_id",
    ]
    list_filter = [
        "state", "holder", "ai_paused", "needs_human", UnreceivedFilter, "agent_id", "held_by"
    ]
    search_fields = ["contact_phone", "contact_name", "session_id", "messages__text"]
    list_select_related = ["held_by"]
    date_hierarchy = "started_at"
    readonly_fields = [
        field.name for field in Conversation._meta.fields if field.name not in ("id",)
    ]
    inlines = [MessageInline, NoteInline, CommandInline]
    actions = ["take_over", "hand_back"]
    show_full_result_count = False  # COUNT(*) over a big join is the slow part of search

    def get_search_results(self, request, queryset, search_term):
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        return queryset.distinct() if may_have_duplicates else queryset, False

    def has_add_permission(self, request):
        return False  # conversations come from Pinecall

    @admin.display(description="not received")
    def unreceived_count(self, conversation: Conversation) -> int:
        return len(conversation.unreceived or [])

    @admin.action(description="Take over (pause the AI) for the selected conversations")
    def take_over(self, request, queryset):
        self._each(request, queryset, services.conversation_take_over, "taken over")

    @admin.action(description="Hand back to the AI")
    def hand_back(self, request, queryset):
        self._each(
            request,
            queryset,
            lambda **kw: services.conversation_hand_back(force=True, **kw),
            "handed back",
        )

    def _each(self, request, queryset, service, done: str) -> None:
        succeeded = 0
        for conversation in queryset:
            try:
                service(conversation=conversation, operator=request.user)
            except (services.ActionRefused, PermissionDenied) as refusal:
                self.message_user(request, f"{conversation}: {refusal}", messages.WARNING)
            else:
                succeeded += 1
        if succeeded:
            self.message_user(
                request,
                f"{succeeded} conversation(s) {done}; Pinecall's confirmation follows.",
                messages.SUCCESS,
            )


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["created_at", "conversation", "author", "type", "short_text", "status"]
    list_filter = ["author", "direction", "type", "status", "altered"]
    search_fields = ["text", "message_id", "conversation__contact_phone"]
    list_select_related = ["conversation"]
    raw_id_fields = ["conversation", "operator"]
    show_full_result_count = False

    @admin.display(description="text")
    def short_text(self, message: Message) -> str:
        return message.text[:80]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Command)
class CommandAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "created_at",
        "kind",
        "scope",
        "session_id",
        "contact_phone",
        "operator",
        "status",
        "error_code",
        "attempts",
    ]
    list_filter = ["status", "kind", "scope", "agent_id"]
    search_fields = ["session_id", "contact_phone", "text"]
    list_select_related = ["operator"]
    raw_id_fields = ["conversation", "message", "operator"]

    def has_add_permission(self, request):
        return False  # intents are created through services, with their audit

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["created_at", "operator", "action", "conversation", "contact_phone", "outcome"]
    list_filter = ["action", "outcome", "operator", "agent_id"]
    search_fields = ["contact_phone", "conversation__contact_name", "detail"]
    list_select_related = ["operator", "conversation"]
    raw_id_fields = ["conversation", "command", "operator"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # the trail is kept


@admin.register(Takeover)
class TakeoverAdmin(admin.ModelAdmin):
    """The takeover episodes the reports count, as the services wrote them (read only)."""

    list_display = ["started_at", "conversation", "taken_by", "wait_seconds", "reply_seconds",
                    "handling_seconds", "end"]
    list_filter = ["end", "needs_human_reason", "taken_by", "agent_id"]
    search_fields = ["conversation__contact_phone", "conversation__contact_name"]
    list_select_related = ["conversation", "taken_by"]
    date_hierarchy = "started_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ContactPause)
class ContactPauseAdmin(admin.ModelAdmin):
    list_display = ["contact_phone", "agent_id", "paused_by", "paused_at"]
    list_filter = ["agent_id"]
    search_fields = ["contact_phone"]
    actions = ["resume_contacts"]

    def has_add_permission(self, request):
        return False  # pause from the dashboard, so Pinecall is told

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # resume with the action, so Pinecall is told

    @admin.action(description="Resume the AI for the selected contacts")
    def resume_contacts(self, request, queryset):
        for pause in queryset:
            try:
                services.contact_resume(
                    contact_phone=pause.contact_phone, agent_id=pause.agent_id, operator=request.user
                )
            except PermissionDenied as refusal:
                self.message_user(request, str(refusal), messages.WARNING)
                return
        self.message_user(request, "Resume requested; Pinecall's confirmation follows.")


@admin.register(AgentState)
class AgentStateAdmin(admin.ModelAdmin):
    list_display = ["agent_id", "ai_paused", "paused_by", "worker_connected", "worker_seen_at"]
    readonly_fields = ["agent_id", "ai_paused", "paused_by", "paused_at", "worker_connected", "worker_seen_at"]
    actions = ["kill_switch_on", "kill_switch_off"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Kill switch: pause the AI for the whole agent")
    def kill_switch_on(self, request, queryset):
        self._each(request, queryset, services.agent_pause)

    @admin.action(description="Switch the AI back on")
    def kill_switch_off(self, request, queryset):
        self._each(request, queryset, services.agent_resume)

    def _each(self, request, queryset, service) -> None:
        for state in queryset:
            try:
                service(operator=request.user, agent_id=state.agent_id)
            except PermissionDenied as refusal:
                self.message_user(request, str(refusal), messages.WARNING)
                return
        self.message_user(request, "Requested; Pinecall's confirmation follows.")


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    """Events the database refused even after sanitising, with their frames."""

    list_display = ["created_at", "event", "short_reason", "resolved_at"]
    list_filter = ["event", ("resolved_at", admin.EmptyFieldListFilter)]
    search_fields = ["reason", "event"]
    readonly_fields = ["event", "frame", "reason", "created_at", "resolved_at"]
    actions = ["store_again"]

    @admin.display(description="reason")
    def short_reason(self, dead_letter: DeadLetter) -> str:
        return dead_letter.reason[:120]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Store again (after the cause is fixed)")
    def store_again(self, request, queryset):
        stored = failed = 0
        for dead_letter in queryset.filter(resolved_at__isnull=True):
            if worker.dead_letter_retry(dead_letter=dead_letter):
                stored += 1
            else:
                failed += 1
        if stored:
            self.message_user(request, f"{stored} event(s) stored.", messages.SUCCESS)
        if failed:
            self.message_user(
                request, f"{failed} event(s) still refused; the reason is updated.", messages.WARNING
            )


@admin.register(IngestCursor)
class IngestCursorAdmin(admin.ModelAdmin):
    """How far each worker spool is stored (a spool is removed once all of it is)."""

    list_display = ["spool_id", "seq", "updated_at"]
    readonly_fields = ["spool_id", "seq", "updated_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(WorkerProcess)
class WorkerProcessAdmin(admin.ModelAdmin):
    """Every worker process as it last reported itself: the active one and the standbys."""

    list_display = ["host", "pid", "role", "active_since", "seen_at", "started_at", "agent_id"]
    list_filter = ["role", "agent_id"]
    readonly_fields = ["agent_id", "host", "pid", "role", "started_at", "active_since", "seen_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(HandoffPolicy)
class HandoffPolicyAdmin(admin.ModelAdmin):
    """What the dashboard does when a customer needs a person; changes apply at once."""

    list_display = ["agent_id", "pause_on_ask", "fallback_seconds", "idle_seconds", "updated_by", "updated_at"]
    readonly_fields = ["updated_by", "updated_at"]

    def save_model(self, request, obj, form, change):
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(AlertPreferences)
class AlertPreferencesAdmin(admin.ModelAdmin):
    list_display = ["user", "sound", "title", "desktop"]
    list_select_related = ["user"]


class OperatorProfileForm(forms.ModelForm):
    class Meta:
        model = OperatorProfile
        fields = ["user", "phone"]

    def clean_phone(self):
        return services.phone_ref_clean(self.cleaned_data.get("phone", ""))  # the app's own check


@admin.register(OperatorProfile)
class OperatorProfileAdmin(admin.ModelAdmin):
    """Each person's own settings: the phone 'Forward to my phone' sends a call to."""

    list_display = ["user", "phone"]
    list_select_related = ["user"]
    search_fields = ["user__username", "user__first_name", "user__last_name", "phone"]
    form = OperatorProfileForm


class CallUtteranceInline(ReadOnlyInline):
    model = CallUtterance
    fields = ["at", "speaker", "text", "interrupted", "while_muted", "words_spoken", "message_id"]
    readonly_fields = fields


@admin.register(Call)
class CallAdmin(admin.ModelAdmin):
    """Voice calls: read-only (Pinecall's record); stepping in is on the call's page."""

    list_display = ["call_id", "from_number", "to_number", "state", "started_at", "duration_seconds", "end_reason", "forwarded_to", "on_hold", "caller_muted"]
    list_filter = ["state", "agent_id", "direction", "on_hold", "caller_muted"]
    search_fields = ["call_id", "from_number", "to_number", "utterances__text"]
    inlines = [CallUtteranceInline]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(CannedReply)
class CannedReplyAdmin(admin.ModelAdmin):
    """Shared (no owner) and personal canned replies; an unknown variable is refused
    on save (the model's clean, which the admin form runs)."""

    list_display = ["shortcut", "title", "owner", "usage_count", "last_used_at", "updated_at"]
    list_filter = [("owner", admin.EmptyFieldListFilter)]
    search_fields = ["shortcut", "title", "text"]
    list_select_related = ["owner"]
    readonly_fields = ["created_by", "usage_count", "last_used_at", "created_at", "updated_at"]

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(Note)
class NoteAdmin(admin.ModelAdmin):
    """Internal notes: kept and searchable; written in the conversation page only."""

    list_display = ["created_at", "author", "conversation", "short_text"]
    list_select_related = ["author", "conversation"]
    search_fields = ["text", "author__username", "conversation__contact_phone", "conversation__contact_name"]
    date_hierarchy = "created_at"
    readonly_fields = ["conversation", "author", "text", "mentions", "timeline_entry", "created_at"]

    @admin.display(description="text")
    def short_text(self, obj):
        return obj.text[:80]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
