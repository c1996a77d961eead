from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "dashboard"
    verbose_name = "Operator dashboard"

    def ready(self) -> None:
        # Imported here, as Django requires: these modules use models.
        from dashboard import rendering, signals

        signals.connect()
        rendering.register()
