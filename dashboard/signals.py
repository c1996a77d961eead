"""Signal receivers of the web layer (connected in DashboardConfig.ready()).

- A person's open sockets close within a moment when they log out, are
  deactivated or deleted, or lose a group or permission (a role): the page's
  access was decided when it connected, so it must connect again to be decided
  anew. Sent after the commit, so a rolled-back change closes nothing.
- A login refused by throttling (django-axes) is audited.
"""

from __future__ import annotations

from collections.abc import Iterable

from axes.signals import user_locked_out
from django.contrib.auth import get_user_model, user_logged_out
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save

from conversations import notify, services

User = get_user_model()


def _revoke_on_commit(user_pks: Iterable[int], *, session_key: str | None = None) -> None:
    pks = sorted({pk for pk in user_pks if pk is not None})
    if not pks:
        return

    def revoke() -> None:
        for pk in pks:
            notify.user_sessions_revoked(pk, session_key=session_key)

    transaction.on_commit(revoke, robust=True)


def on_logged_out(sender, request, user, **kwargs) -> None:
    if user is None:
        return
    session = getattr(request, "session", None)
    # Before Django flushes the session: its key still names this login.
    _revoke_on_commit([user.pk], session_key=getattr(session, "session_key", None))


def on_user_pre_save(sender, instance, raw=False, **kwargs) -> None:
    # Deactivated by this save (an inactive user saved again changes nothing).
    instance._revoke_sockets = bool(
        not raw
        and instance.pk
        and not instance.is_active
        and sender.objects.filter(pk=instance.pk, is_active=True).exists()
    )


def on_user_post_save(sender, instance, **kwargs) -> None:
    if getattr(instance, "_revoke_sockets", False):
        instance._revoke_sockets = False
        _revoke_on_commit([instance.pk])


def on_user_deleted(sender, instance, **kwargs) -> None:
    _revoke_on_commit([instance.pk])


def _users_in_groups(group_pks: Iterable[int]) -> list[int]:
    return list(User.objects.filter(groups__in=list(group_pks)).values_list("pk", flat=True))


def on_user_groups_or_permissions_changed(sender, instance, action, reverse, pk_set, **kwargs):
    """user.groups / user.user_permissions lost something, from either side."""
    if not reverse:  # instance is the user
        if action in ("post_remove", "post_clear"):
            _revoke_on_commit([instance.pk])
        return
    # instance is the group or the permission; pk_set the users.
    if action == "post_remove":
        _revoke_on_commit(pk_set or ())
    elif action == "pre_clear":  # who they are is known only before the clear
        _revoke_on_commit(instance.user_set.values_list("pk", flat=True))


def on_group_permissions_changed(sender, instance, action, reverse, pk_set, **kwargs):
    """A group lost a permission: every member's role changed."""
    if action not in ("post_remove", "pre_clear"):
        return
    if not reverse:  # instance is the group
        _revoke_on_commit(_users_in_groups([instance.pk]))
    elif action == "post_remove":  # instance is the permission; pk_set the groups
        _revoke_on_commit(_users_in_groups(pk_set or ()))
    else:
        _revoke_on_commit(_users_in_groups(instance.group_set.values_list("pk", flat=True)))


def on_locked_out(sender, request, username, ip_address, **kwargs) -> None:
    services.login_refused(
        username=username or "", ip_address=ip_address or "", path=getattr(request, "path", "")
    )


def connect() -> None:
    uid = "dashboard.signals"
    user_logged_out.connect(on_logged_out, dispatch_uid=f"{uid}.logged_out")
    pre_save.connect(on_user_pre_save, sender=User, dispatch_uid=f"{uid}.user_pre_save")
    post_save.connect(on_user_post_save, sender=User, dispatch_uid=f"{uid}.user_post_save")
    post_delete.connect(on_user_deleted, sender=User, dispatch_uid=f"{uid}.user_deleted")
    for through in (User.groups.through, User.user_permissions.through):
        m2m_changed.connect(
            on_user_groups_or_permissions_changed,
            sender=through,
            dispatch_uid=f"{uid}.m2m.{through._meta.label}",
        )
    m2m_changed.connect(
        on_group_permissions_changed,
        sender=Group.permissions.through,
        dispatch_uid=f"{uid}.group_permissions",
    )
    user_locked_out.connect(on_locked_out, dispatch_uid=f"{uid}.locked_out")

