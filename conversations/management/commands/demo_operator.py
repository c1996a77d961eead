"""Create a first operator when the database has no user, and say how to log in."""

import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

CREDENTIALS_FILE = Path(settings.BASE_DIR) / ".demo-credentials"


class Command(BaseCommand):
    help = "Create the demo operator (a superuser) when there is no user yet, and print the login."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args, host: str, port: int, **options):
        User = get_user_model()
        url = f"http://{host}:{port}/"
        if not User.objects.exists():
            password = secrets.token_urlsafe(9)
            user = User.objects.create_superuser(
                username="demo", password=password, first_name="Demo", last_name="Operator"
            )
            user.groups.add(*Group.objects.filter(name__in=["Operators", "Supervisors"]))
            CREDENTIALS_FILE.write_text(f"demo {password}\n")
            CREDENTIALS_FILE.chmod(0o600)
            self.stdout.write(self.style.SUCCESS("Created the demo operator."))
        if CREDENTIALS_FILE.exists():
            username, password = CREDENTIALS_FILE.read_text().split()
            if User.objects.filter(username=username).exists():
                self.stdout.write(
                    f"Log in at {url} as user '{username}' with password '{password}' "
                    f"(kept in {CREDENTIALS_FILE.name})."
                )
