"""Static files: plain names before collectstatic, hashed names after it."""

from django.contrib.staticfiles.storage import staticfiles_storage
from django.core.management import call_command
from django.test import override_settings


def test_plain_names_before_collectstatic(tmp_path):
    with override_settings(STATIC_ROOT=tmp_path / "empty"):
        staticfiles_storage._setup()
        assert staticfiles_storage.url("css/app.css") == "/static/css/app.css"


def test_hashed_names_after_collectstatic(tmp_path):
    with override_settings(STATIC_ROOT=tmp_path / "collected"):
        call_command("collectstatic", "--noinput", verbosity=0)
        staticfiles_storage._setup()
        url = staticfiles_storage.url("css/app.css")
        assert url.startswith("/static/css/app.") and url != "/static/css/app.css"
        assert (tmp_path / "collected" / "css" / url.rsplit("/", 1)[1]).exists()
    staticfiles_storage._setup()


def test_a_file_added_since_collectstatic_gets_its_plain_name(tmp_path):
    """A checkout with an older collectstatic still renders pages (no 500 on a new file)."""
    with override_settings(STATIC_ROOT=tmp_path / "collected"):
        call_command("collectstatic", "--noinput", verbosity=0)
        staticfiles_storage._setup()
        staticfiles_storage.hashed_files.pop("css/admin.css")
        assert staticfiles_storage.url("css/admin.css") == "/static/css/admin.css"
        assert staticfiles_storage.url("css/app.css") != "/static/css/app.css"
    staticfiles_storage._setup()


def test_no_template_has_a_multi_line_short_comment():
    """Django's {# #} comments end at the line: a multi-line one is shown to operators."""
    import re
    from pathlib import Path

    templates = Path(__file__).resolve().parents[2] / "templates"
    broken = [
        f"{path.relative_to(templates)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in templates.rglob("*.html")
        for text in [path.read_text()]
        for m in re.finditer(r"\{#(.*?)#\}", text, re.S)
        if "\n" in m.group(1)
    ]
    assert broken == []
