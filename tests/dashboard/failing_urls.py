"""A URLconf whose one view fails: for testing the 500 page's headers."""

from django.urls import path


def boom(request):
    raise RuntimeError("boom")


urlpatterns = [path("boom/", boom)]
