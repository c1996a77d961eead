from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard import health, operator_tools, views

urlpatterns = [
    path("", views.inbox, name="inbox"),
    path("c/<int:pk>/", views.conversation_detail, name="conversation"),
    path("c/<int:pk>/state/", views.conversation_state, name="conversation_state"),
    path("c/<int:pk>/messages/", views.conversation_earlier, name="conversation_earlier"),
    path("c/<int:pk>/take-over/", views.take_over, name="take_over"),
    path("c/<int:pk>/send/", views.send, name="send"),
    path("c/<int:pk>/hand-back/", views.hand_back, name="hand_back"),
    path("c/<int:pk>/keep/", views.keep, name="keep"),
    path("c/<int:pk>/read/", views.mark_read, name="mark_read"),
    path("c/<int:pk>/pause-contact/", views.pause_contact, name="pause_contact"),
    path("c/<int:pk>/resume-contact/", views.resume_contact, name="resume_contact"),
    path("calls/", views.calls, name="calls"),
    path("calls/<int:pk>/", views.call_detail, name="call"),
    path("calls/<int:pk>/say/", views.call_say, name="call_say"),
    path("calls/<int:pk>/hang-up/", views.call_hang_up, name="call_hang_up"),
    path("calls/<int:pk>/forward/", views.call_forward, name="call_forward"),
    path("c/<int:pk>/canned/", operator_tools.canned_picker, name="canned_picker"),
    path("c/<int:pk>/notes/", operator_tools.add_note, name="add_note"),
    path("replies/", operator_tools.canned_replies, name="canned_replies"),
    path("replies/<int:pk>/", operator_tools.canned_reply_edit, name="canned_reply_edit"),
    path("replies/<int:pk>/delete/", operator_tools.canned_reply_delete, name="canned_reply_delete"),
    path("replies/<int:pk>/used/", operator_tools.canned_used, name="canned_used"),
    path("next/", views.take_next, name="take_next"),
    path("me/alerts/", views.alert_preferences, name="alert_preferences"),
    path("agent/state/", views.agent_state, name="agent_state"),
    path("agent/pause/", views.agent_pause, name="agent_pause"),
    path("agent/resume/", views.agent_resume, name="agent_resume"),
    path("favicon.ico", views.favicon),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
