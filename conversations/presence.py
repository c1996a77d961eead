"""Who has which conversation open, right now: live, never stored in the database.

Each open conversation page (one live socket) is a member of that conversation
until its socket closes or it stops renewing itself (`TTL`): a Daphne process
killed mid-shift leaves nobody "viewing" for longer than that. With Redis (more
than one Daphne, and the worker rendering inbox rows) the members live in one
sorted set per conversation, scored by when they expire; without it, in this
process's memory (the embedded `serve`, where every socket and the worker share
one process).

Presence is a courtesy: when Redis cannot answer, nobody is shown as viewing
and nothing else fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from django.conf import settings

logger = logging.getLogger(__name__)

TTL = 45.0  # seconds a member lasts without renewing
RENEW_EVERY = 15.0  # how often an open page renews itself
KEY_PREFIX = "presence:conversation:"
TOLD_PREFIX = "presence:told:"


def _member(user_pk: int, socket: str) -> str:
    return f"{user_pk}:{socket}"


def _user_of(member: str | bytes) -> int | None:
    if isinstance(member, bytes):
        member = member.decode("utf-8", "replace")
    head, _, _ = member.partition(":")
    return int(head) if head.isdigit() else None


class _MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[int, dict[str, float]] = {}
        self._told: dict[int, float] = {}  # conversation id -> when it may be told again

    def put_many(self, members: list[tuple[int, str]], expires: float) -> None:
        with self._lock:
            for conversation_id, member in members:
                self._members.setdefault(conversation_id, {})[member] = expires

    def drop(self, conversation_id: int, member: str) -> None:
        with self._lock:
            members = self._members.get(conversation_id, {})
            members.pop(member, None)
            if not members:
                self._members.pop(conversation_id, None)

    def live(self, conversation_ids: list[int], now: float) -> dict[int, list[str]]:
        out = {}
        with self._lock:
            for conversation_id in conversation_ids:
                members = self._members.get(conversation_id, {})
                for member in [m for m, expires in members.items() if expires <= now]:
                    del members[member]
                out[conversation_id] = list(members)
        return out

    def clear(self) -> None:
        with self._lock:
            self._members.clear()
            self._told.clear()

    def claim(self, conversation_id: int, every: float) -> float:
        with self._lock:
            wait = self._told.get(conversation_id, 0.0) - time.monotonic()
            if wait > 0:
                return wait
            self._told[conversation_id] = time.monotonic() + every
            return 0.0


class _RedisStore:
    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def put_many(self, members: list[tuple[int, str]], expires: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for conversation_id, member in members:
            pipe.zadd(KEY_PREFIX + str(conversation_id), {member: expires})
        for conversation_id in {conversation_id for conversation_id, _ in members}:
            pipe.expire(KEY_PREFIX + str(conversation_id), int(TTL * 2))
        pipe.execute()

    def drop(self, conversation_id: int, member: str) -> None:
        self._redis.zrem(KEY_PREFIX + str(conversation_id), member)

    def live(self, conversation_ids: list[int], now: float) -> dict[int, list[str]]:
        pipe = self._redis.pipeline(transaction=False)
        for conversation_id in conversation_ids:
            key = KEY_PREFIX + str(conversation_id)
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zrange(key, 0, -1)
        replies = pipe.execute()
        return {
            conversation_id: [m.decode() for m in replies[2 * i + 1]]
            for i, conversation_id in enumerate(conversation_ids)
        }

    def clear(self) -> None:
        keys = list(self._redis.scan_iter(match=KEY_PREFIX + "*", count=500))
        keys += list(self._redis.scan_iter(match=TOLD_PREFIX + "*", count=500))
        if keys:
            self._redis.delete(*keys)

    def claim(self, conversation_id: int, every: float) -> float:
        key = TOLD_PREFIX + str(conversation_id)
        if self._redis.set(key, b"1", nx=True, px=max(1, int(every * 1000))):
            return 0.0
        return max(0.0, self._redis.pttl(key) / 1000.0)


_store = None
_store_lock = threading.Lock()


def _backend():
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                url = getattr(settings, "REDIS_URL", "")
                _store = _RedisStore(url) if url else _MemoryStore()
    return _store


def _safely(what: str, call, default):
    try:
        return call()
    except Exception:  # Redis down or slow: presence is a courtesy
        logger.warning("presence: could not %s", what, exc_info=True)
        return default


# ---------------------------------------------------------------- writes (one open page)


def here(conversation_id: int, user_pk: int, socket: str) -> None:
    """This page has the conversation open (on connect; renewed with `here_many`)."""
    here_many([(conversation_id, user_pk, socket)])


def here_many(pages: Iterable[tuple[int, int, str]]) -> None:
    """Open pages (conversation, user, socket), for `TTL` from now: one round trip for
    all of a process's pages when it renews them every `RENEW_EVERY`."""
    expires = time.time() + TTL
    members = [(conversation_id, _member(user_pk, socket)) for conversation_id, user_pk, socket in pages]
    _safely("record viewers", lambda: _backend().put_many(members, expires), None)


def gone(conversation_id: int, user_pk: int, socket: str) -> None:
    """This page closed."""
    _safely("drop a viewer", lambda: _backend().drop(conversation_id, _member(user_pk, socket)), None)


# ---------------------------------------------------------------- reads


def viewers(conversation_id: int) -> list[int]:
    """The people who have this conversation open (each once, however many tabs)."""
    return viewers_of([conversation_id]).get(conversation_id, [])


def viewers_of(conversation_ids: Iterable[int]) -> dict[int, list[int]]:
    """Viewers of many conversations in one round trip (the inbox's rows)."""
    ids = sorted({int(pk) for pk in conversation_ids})
    if not ids:
        return {}
    live = _safely("read viewers", lambda: _backend().live(ids, time.time()), {})
    out: dict[int, list[int]] = {}
    for conversation_id, members in live.items():
        users = sorted({u for u in map(_user_of, members) if u is not None})
        if users:
            out[conversation_id] = users
    return out


def claim_telling(conversation_id: int, every: float) -> float:
    """May this process tell who has it open now? 0: yes (nobody else will for `every`
    seconds); else the seconds until it may. One process tells, for all: with two web
    processes each telling its own view, 1,000 viewers got twice the frames."""
    return _safely("claim a presence tell", lambda: _backend().claim(conversation_id, every), 0.0)


def clear() -> None:
    """Forget everyone (tests)."""
    _safely("clear", lambda: _backend().clear(), None)


def reset_backend() -> None:
    """Pick the store again from settings (tests that change REDIS_URL)."""
    global _store
    _store = None
