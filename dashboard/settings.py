"""Settings for the takeover dashboard.

Everything comes from the environment (django-environ). With nothing set the
project runs embedded on one machine: SQLite, the in-process channel layer and
the Pinecall simulator. Set DATABASE_URL, REDIS_URL, PINECALL_URL and
PINECALL_API_KEY for production.
"""

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)


def _local_secret_key() -> str:
    """A random key kept in .secret_key, so one machine works with nothing set.

    Several Daphne processes on several hosts must share DJANGO_SECRET_KEY instead.
    """
    from django.core.management.utils import get_random_secret_key

    path = BASE_DIR / ".secret_key"
    if not path.exists():
        path.write_text(get_random_secret_key())
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if env.bool("DJANGO_HTTPS", default=False):
        from django.core.exceptions import ImproperlyConfigured

        # Production: every process must sign with the same key, from the environment.
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_HTTPS=1.")
    SECRET_KEY = _local_secret_key()

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    # Before "channels": our runworker (which starts the Pinecall connection at
    # once) takes precedence over Channels' own.
    "conversations",
    "dashboard",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "axes",
    "csp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Early, so that every answer carries the policy: pages, errors, the 503.
    "dashboard.middleware.SiteCSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "dashboard.middleware.DatabaseUnavailableMiddleware",
    # Last, as axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "dashboard.urls"
FORMAT_MODULE_PATH = ["dashboard.formats"]
ASGI_APPLICATION = "dashboard.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.context_processors.agent_state",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and a busy timeout let Daphne and the worker share one SQLite file.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file, not memory: tests run the worker and Daphne as separate processes.
    # One per test run, so that runs side by side do not share it.
    DATABASES["default"]["TEST"] = {
        "NAME": str(Path(tempfile.gettempdir()) / f"takeover-test-{os.getpid()}.sqlite3")
    }
else:
    # Daphne runs each request's ORM work on a fresh thread, so persistent
    # connections are never reused: a pool is (psycopg's, through Django).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # Django's pool checks each connection before handing it out.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DB_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DB_POOL_MAX_SIZE", default=20),
        "timeout": 10,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                # Operators' sockets can lag behind a burst; the database stays the
                # record, so a larger buffer only trades memory for fewer catch-ups.
                "capacity": env.int("CHANNEL_LAYER_CAPACITY", default=1000),
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# How rendered fragments reach the sockets with Redis: "pubsub", one PUBLISH that each
# web process fans out to its own sockets (`dashboard.fanout`); "layer", the channel
# layer's copy per socket (kept to compare, bench/variants/layer_fanout.py).
LIVE_FANOUT = env.str("LIVE_FANOUT", default="pubsub")
# A take over or hand back is shown to the other operators when Pinecall confirms it;
# if it is still unconfirmed after this long, they are shown that it is waiting.
LIVE_PENDING_GRACE_SECONDS = env.float("LIVE_PENDING_GRACE_SECONDS", default=0.25)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Axes first: it refuses a locked-out login before the password is even checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "inbox"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "dashboard.storage.StaticStorage"},
}
# Hashed, compressed files after collectstatic; before it (tests, a fresh clone)
# plain names, which whitenoise serves straight from the apps' static folders.
WHITENOISE_USE_FINDERS = True
WHITENOISE_MANIFEST_STRICT = False

# Security. DJANGO_HTTPS=1 says the site is served over TLS (by the proxy in front
# of Daphne): redirect to HTTPS, secure cookies, HSTS. Off for the embedded demo.
HTTPS = env.bool("DJANGO_HTTPS", default=False)
SECURE_SSL_REDIRECT = HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = 31536000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# Login throttling (django-axes): this many failures for one username from one IP
# lock that pair out for the cool-off; the dashboard's and admin's logins alike.
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# Refused attempts during a lockout do not extend it: it ends when the page says.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "dashboard.auth.lockout_response"
# The client's address as Daphne saw it (with --proxy-headers, from the proxy's
# X-Forwarded-For): never a header the client could set itself.
AXES_IPWARE_META_PRECEDENCE_ORDER = ["REMOTE_ADDR"]
AXES_VERBOSE = False

# Content-Security-Policy (django-csp): our own scripts only, no inline script, no
# eval (htmx's allowEval is off). Inline styles stay allowed: templates set CSS
# variables in style attributes. SiteCSPMiddleware adds the site's ws(s) origin.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "connect-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
        "base-uri": ["'self'"],
        "object-src": ["'none'"],
    },
}

# Pinecall: the agent this dashboard watches and the connection the worker holds.
PINECALL_API_KEY = env.str("PINECALL_API_KEY", default="")
# With a key, Pinecall's cloud; without one, a simulator on this machine.
PINECALL_URL = env.str(
    "PINECALL_URL",
    default="wss://voice.pinecall.io" if PINECALL_API_KEY else "ws://127.0.0.1:8765",
)
PINECALL_AGENT_ID = env.str("PINECALL_AGENT_ID", default="support")
PINECALL_AGENT_LANGUAGE = env.str("PINECALL_AGENT_LANGUAGE", default="en")
PINECALL_AGENT_LLM = env.str("PINECALL_AGENT_LLM", default="openai/gpt-4.1-mini")
PINECALL_AGENT_PROMPT = env.str(
    "PINECALL_AGENT_PROMPT", default="You are a helpful support agent for our shop."
)
# The agent's phone numbers (comma-separated E.164): the worker takes their voice calls.
PINECALL_PHONE_NUMBERS = [
    ref.strip() for ref in env.str("PINECALL_PHONE_NUMBERS", default="").split(",") if ref.strip()
]
PINECALL_COMMAND_TIMEOUT = env.float("PINECALL_COMMAND_TIMEOUT", default=10.0)
# Where the worker spools every event before storing it (local disk, per machine).
WORKER_SPOOL_DIR = Path(env.str("WORKER_SPOOL_DIR", default=str(BASE_DIR / "var" / "spool")))
# The banner says "Pinecall connected" only while the worker's heartbeat is this fresh.
WORKER_HEARTBEAT_STALE_SECONDS = env.float("WORKER_HEARTBEAT_STALE_SECONDS", default=20.0)
# The handoff policy's defaults (supervisors change them at runtime, in the app or admin).
HANDOFF_PAUSE_ON_ASK = env.bool("HANDOFF_PAUSE_ON_ASK", default=True)
HANDOFF_HOLDING_MESSAGE = env.str(
    "HANDOFF_HOLDING_MESSAGE", default="Thanks! A person from our team will be with you shortly."
)
HANDOFF_FALLBACK_SECONDS = env.int("HANDOFF_FALLBACK_SECONDS", default=600)
HANDOFF_IDLE_SECONDS = env.int("HANDOFF_IDLE_SECONDS", default=900)
# The worker's own /healthz, /readyz and /metrics (0: not served).
WORKER_HTTP_PORT = env.int("WORKER_HTTP_PORT", default=0)
# Bearer token for /metrics; unset: /metrics answers 404.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
WHATSAPP_PHONE_NUMBER_ID = env.str("WHATSAPP_PHONE_NUMBER_ID", default="demo-phone-number-id")
WHATSAPP_ACCESS_TOKEN = env.str("WHATSAPP_ACCESS_TOKEN", default="demo-access-token")
WHATSAPP_VERIFY_TOKEN = env.str("WHATSAPP_VERIFY_TOKEN", default="") or None
WHATSAPP_APP_SECRET = env.str("WHATSAPP_APP_SECRET", default="") or None

# Product limits.
# WhatsApp's limit for a text body, in characters (code points, as len() counts).
MESSAGE_MAX_LENGTH = env.int("MESSAGE_MAX_LENGTH", default=4096)
INBOX_PAGE_SIZE = 50
INBOX_PAGES_KEPT = 10  # how many loaded pages a live refresh of the inbox keeps, at most
CONVERSATION_PAGE_SIZE = 50  # the latest; "Load earlier" pages back

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # One line per login otherwise; lockouts are warnings (and audited).
        "axes": {"level": "WARNING"},
    },
}
