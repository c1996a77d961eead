"""Proposed change: Django's PostgreSQL connection pool (Django 5.1+, psycopg-pool).

Under Daphne every HTTP request runs its sync view in a new thread (asgiref's
ThreadSensitiveContext per request), so CONN_MAX_AGE never reuses a connection:
each request opens a PostgreSQL connection and drops it (measured: as many
PostgreSQL sessions as requests). Django's pool keeps them across threads; it needs
`psycopg[binary,pool]` (the psycopg-pool package) and CONN_MAX_AGE = 0.
"""

from dashboard.settings import *  # noqa: F401,F403
from dashboard.settings import DATABASES

if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": 20}
