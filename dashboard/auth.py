"""Login throttling's answer: the login page again, saying when to try again.

django-axes locks one username from one IP address after AXES_FAILURE_LIMIT
failures, for AXES_COOLOFF_TIME (see settings); it calls `lockout_response`
for the refused request, on the dashboard's login and admin's alike.
"""

from __future__ import annotations

import math

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone


def lockout_minutes(request: HttpRequest, username: str) -> int:
    """Whole minutes until this username may try again from this address (at least 1)."""
    from axes.models import AccessAttempt

    cool_off = settings.AXES_COOLOFF_TIME
    last = (
        AccessAttempt.objects.filter(
            username=username, ip_address=getattr(request, "axes_ip_address", None)
        )
        .order_by("-attempt_time")
        .values_list("attempt_time", flat=True)
        .first()
    )
    left = cool_off - (timezone.now() - last) if last else cool_off
    return max(1, math.ceil(left.total_seconds() / 60))


def lockout_message(minutes: int) -> str:
    return (
        f"Too many failed attempts for this account from your network: "
        f"try again in {minutes} minute{'s' if minutes != 1 else ''}."
    )


def lockout_response(request: HttpRequest, *args, **kwargs) -> HttpResponse:
    """The lockout page (429). Called by axes with varying arguments: the credentials
    are read from the request, where axes put them."""
    credentials = getattr(request, "axes_credentials", None) or {}
    username = credentials.get("username") or request.POST.get("username", "")
    message = lockout_message(lockout_minutes(request, username))
    context = {
        "form": AuthenticationForm(request, initial={"username": username}),
        "lockout_message": message,
        "next": request.POST.get("next") or request.GET.get("next", ""),
    }
    if request.path == reverse("admin:login"):
        context.update(admin.site.each_context(request), app_path=request.get_full_path())
        return render(request, "admin/login.html", context, status=429)
    return render(request, "registration/login.html", context, status=429)
