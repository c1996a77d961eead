"""Fault tests, black box: real `manage.py runworker pinecall` and Daphne processes,
the Pinecall simulator, and a TCP proxy (tests/support/tcp_proxy.py) between the
processes and PostgreSQL that the test cuts and restores.

What they prove (the worker loses nothing and doubles nothing):

- PostgreSQL cut for 10 s (and for 60 s) in the middle of a burst: every customer
  message stored exactly once, the worker still running, its log saying it noticed.
- An operator's action during the cut is answered 503 "database unavailable"; after
  the restore the same action works.
- `kill -9` in the middle of 1,000 messages, with the simulator's default replay
  window (3 events): at least KILL9_MIN_STORED stored, no duplicates.
- Hostile frames (huge, deep, wrong types, NUL and lone surrogates, over-long
  fields): the worker survives, stores the valid messages after them and the
  sanitisable ones (with `Message.altered`), and still carries out commands.
- A replay of 30 events after a reconnect doubles no row.

The test process reads the database directly (not through the proxy). The PG-cut
tests need PostgreSQL (DATABASE_URL=postgres://...): on SQLite they skip, except in
CI (CI=true) with a PostgreSQL DATABASE_URL, where skipping would hide a failure.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from conversations import services
from conversations.models import Command, Message
from pinecall_sdk.simulator import Simulator
from tests.support.processes import (
    astop,
    database_url,
    free_port,
    open_pg_proxy,
    start_daphne,
    start_worker,
    stop_process,
    tail,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

# kill -9 with Pinecall's default replay window (3 events): the worker may lose only
# what sat unread in the kernel's socket buffers when it died (the lead's design).
# Measured and agreed as the floor for 1,000 messages at ~100/s; the lead decides
# whether a lower figure is acceptable.
KILL9_MIN_STORED = 990
# What the worker logs when the database goes away, and what the 503 page says.
DB_UNAVAILABLE = re.compile(
    r"database\s+(?:is\s+)?(?:temporarily\s+)?(?:unavailable|not\s+available)", re.IGNORECASE
)
AGENT_ID = settings.PINECALL_AGENT_ID


# ---------------------------------------------------------------- databases and processes


@pytest.fixture
def pg_proxy():
    """A TcpProxy in front of the test database's PostgreSQL (PostgreSQL only)."""
    proxy = open_pg_proxy()
    try:
        yield proxy
    finally:
        proxy.stop()


# ---------------------------------------------------------------- bursts and counts


async def send_burst(sim: Simulator, *, count: int, rate: float, contacts: int, tag: str,
                     phone_prefix: str = "3460", on_sent=None) -> list[str]:
    """`count` customer messages at `rate` per second, round-robin over `contacts`.

    Every text is unique (so a doubled row shows even without its message id).
    Returns the message ids, in the order sent.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ids: list[str] = []
    for i in range(count):
        c = i % contacts
        sent = await sim.customer_says(
            phone=f"{phone_prefix}{c:05d}", name=f"Customer {c}", text=f"{tag} {i} from {c}"
        )
        ids.append(sent["message_id"])
        if on_sent is not None:
            on_sent(i + 1)
        delay = t0 + (i + 1) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return ids


def stored_stats(ids: list[str], tag: str | None = None) -> dict:
    """How many of `ids` are stored, and how many rows repeat one of them.

    Duplicates are counted by message id and by text (a copy stored without its
    id, or under another, still shows).
    """
    wanted = set(ids)
    rows = list(
        Message.objects.filter(author=Message.Author.CUSTOMER).values_list("message_id", "text")
    )
    mine = [
        (mid, text) for mid, text in rows
        if mid in wanted or (tag and text.startswith(tag + " "))
    ]
    by_id = Counter(mid for mid, _ in mine if mid)
    by_text = Counter(text for _, text in mine)
    return {
        "stored": sum(1 for mid in by_id if mid in wanted),
        "rows": len(mine),
        "duplicates": max(
            sum(n - 1 for n in by_id.values()),
            sum(n - 1 for n in by_text.values()),
            len(mine) - len(by_id),
        ),
    }


async def wait_for_all_stored(ids: list[str], *, timeout: float, stall: float,
                              tag: str | None = None) -> dict:
    """Until every id is stored, `timeout` passes, or the count stops moving for `stall` s.

    Returns the last stats; the caller asserts (with the numbers in the message).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, last_change = -1, loop.time()
    while True:
        stats = await sync_to_async(stored_stats)(ids, tag)
        now = loop.time()
        if stats["stored"] >= len(ids):
            return stats
        if stats["stored"] != last:
            last, last_change = stats["stored"], now
        if now > deadline or now - last_change > stall:
            stats["gave_up_after_s"] = round(now - (deadline - timeout), 1)
            return stats
        await asyncio.sleep(0.2)


def _ai_replies() -> list[tuple]:
    """AI replies stored (session, text, status): none expected while the AI is delayed."""
    return list(
        Message.objects.filter(author=Message.Author.AI)
        .values_list("conversation__session_id", "text", "status")[:20]
    )


# ---------------------------------------------------------------- the proxy itself


def test_the_proxy_cuts_and_restores_postgres_connections(pg_proxy):
    """The harness first: through the proxy PostgreSQL answers, a cut breaks the open
    connection and refuses new ones at once, a restore lets new ones through."""
    import psycopg

    db = connection.settings_dict
    params = dict(host="127.0.0.1", port=pg_proxy.port, user=db["USER"], dbname=db["NAME"],
                  password=db["PASSWORD"] or None, autocommit=True, connect_timeout=5)
    with psycopg.connect(**params) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pg_proxy.cut() == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**params)  # refused (reset at once), not left hanging: connect_timeout would fail it too
    pg_proxy.restore()
    with psycopg.connect(**params) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- PostgreSQL cut mid-burst


async def _pg_cut_mid_burst(tmp_path: Path, proxy, *, cut_s: float, count: int,
                            rate: float, contacts: int, cut_after_s: float) -> None:
    tag = f"pgcut{int(cut_s)}"
    log = tmp_path / "worker.log"
    async with Simulator(port=0, ai_delay=3600) as sim:  # the AI never answers
        worker = start_worker(sim, log, database_url(via_port=proxy.port))
        try:
            await sim.wait_for("channel.add", timeout=30)
            cut_info: dict = {}

            async def cut_then_restore() -> None:
                await asyncio.sleep(cut_after_s)
                cut_info["reset"] = await asyncio.to_thread(proxy.cut)
                cut_info["at"] = time.monotonic()
                await asyncio.sleep(cut_s)  # the outage's length, not a wait for a result
                cut_info["refused"] = proxy.refused
                await asyncio.to_thread(proxy.restore)

            cutter = asyncio.create_task(cut_then_restore())
            try:
                ids = await send_burst(sim, count=count, rate=rate, contacts=contacts, tag=tag)
                await cutter
            finally:
                if not cutter.done():
                    cutter.cancel()
                    await asyncio.to_thread(proxy.restore)
            # The cut reached the worker (else this test proves nothing).
            assert cut_info["reset"] + cut_info["refused"] > 0, cut_info
            during_cut = await sync_to_async(stored_stats)(ids, tag)
            # One more after the restore; events are stored in order.
            sentinel = await sim.customer_says(
                phone="34699999999", name="Last", text=f"sentinel after the {tag} cut"
            )
            ids.append(sentinel["message_id"])
            stats = await wait_for_all_stored(ids, timeout=90, stall=45, tag=tag)
            alive = worker.poll() is None
        finally:
            code = await astop(worker)
    output = log.read_text(errors="replace")
    summary = (
        f"pg_cut {cut_s:g}s: sent={len(ids)} stored={stats['stored']} rows={stats['rows']} "
        f"duplicates={stats['duplicates']} (stored by the end of the cut window: "
        f"{during_cut['stored']}; proxy reset {cut_info['reset']}, refused {cut_info['refused']}; "
        f"worker exit {code})"
    )
    print(summary)
    assert stats["stored"] == len(ids) and stats["duplicates"] == 0, (
        f"{summary}\n--- worker log tail:\n{tail(log)}"
    )
    assert alive, f"the worker died during the outage: {summary}\n{tail(log)}"
    assert DB_UNAVAILABLE.search(output), (
        f"the worker's log does not say the database was unavailable "
        f"(/{DB_UNAVAILABLE.pattern}/)\n{tail(log)}"
    )


async def test_postgres_cut_10_s_mid_burst_loses_and_doubles_nothing(tmp_path, pg_proxy):
    """400 messages at ~40/s over 20 contacts; PostgreSQL unreachable from t=2 s to t=12 s."""
    await _pg_cut_mid_burst(
        tmp_path, pg_proxy, cut_s=10, count=400, rate=40, contacts=20, cut_after_s=2.0
    )


@pytest.mark.timeout(200)
async def test_postgres_cut_60_s_loses_and_doubles_nothing(tmp_path, pg_proxy):
    """300 messages at ~5/s (the whole minute) over 30 contacts; PostgreSQL gone for 60 s."""
    await _pg_cut_mid_burst(
        tmp_path, pg_proxy, cut_s=60, count=300, rate=5, contacts=30, cut_after_s=3.0
    )


# ---------------------------------------------------------------- an operator during the cut


class _Browser:
    """Just enough of a browser: cookies, the login form, htmx POSTs with the CSRF token."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def request(self, method: str, path: str, data: dict | None = None,
                headers: dict | None = None, timeout: float = 30) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers=headers or {})
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def login(self, username: str, password: str) -> None:
        status, html = self.request("GET", "/login/")
        assert status == 200, (status, html[:500])
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
        assert token, html[:1000]
        status, html = self.request("POST", "/login/", {
            "csrfmiddlewaretoken": token.group(1), "username": username, "password": password,
        })
        assert status == 200 and self.cookie("sessionid"), (status, html[:1000])

    def htmx_post(self, path: str, data: dict, timeout: float = 30) -> tuple[int, str]:
        return self.request("POST", path, data, timeout=timeout, headers={
            "HX-Request": "true", "X-CSRFToken": self.cookie("csrftoken") or "",
        })


def _wait_http(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"daphne exited:\n{tail(log)}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        assert time.monotonic() < deadline, f"daphne did not answer within {timeout} s\n{tail(log)}"
        time.sleep(0.2)


def test_an_operator_action_during_the_cut_is_answered_503(tmp_path, pg_proxy):
    """Logged in before the cut; a Send during it gets 503 "database unavailable" (nothing
    stored); after the restore the same Send works."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    from tests.factories import ConversationFactory, OperatorFactory

    password = "cut-proof-pass-1"
    operator = OperatorFactory()
    # Daphne checks passwords with the default hashers, not the tests' fast MD5.
    hasher = PBKDF2PasswordHasher()
    operator.password = hasher.encode(password, hasher.salt())
    operator.save(update_fields=["password"])
    conversation = ConversationFactory(held=True, held_by=operator)

    port = free_port()
    log = tmp_path / "daphne.log"
    daphne = start_daphne(port, log, database_url(via_port=pg_proxy.port))
    try:
        _wait_http(port, daphne, log)
        browser = _Browser(port)
        browser.login(operator.username, password)
        status, _ = browser.request("GET", f"/c/{conversation.pk}/")
        assert status == 200
        path = f"/c/{conversation.pk}/send/"

        reset = pg_proxy.cut()
        try:
            t0 = time.monotonic()
            try:
                status, body = browser.htmx_post(path, {"text": "sent during the cut"}, timeout=40)
            except (TimeoutError, OSError) as error:
                pytest.fail(
                    f"no answer during the cut ({error!r}); proxy reset {reset}\n{tail(log)}"
                )
            elapsed = time.monotonic() - t0
            assert status == 503, f"{status} after {elapsed:.1f} s: {body[:800]}\n{tail(log)}"
            assert DB_UNAVAILABLE.search(body), f"503 without saying why: {body[:800]}"
            assert daphne.poll() is None, tail(log)
        finally:
            pg_proxy.restore()

        # The pool reconnects in its own time: retry while (and only while) it says 503.
        deadline = time.monotonic() + 30
        while True:
            status, body = browser.htmx_post(path, {"text": "sent after the restore"})
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200, f"{status}: {body[:800]}\n{tail(log)}"
        assert daphne.poll() is None
    finally:
        stop_process(daphne)
    human = Message.objects.filter(conversation=conversation, author=Message.Author.HUMAN)
    assert list(human.values_list("text", flat=True)) == ["sent after the restore"]


# ---------------------------------------------------------------- kill -9 mid-burst


async def test_kill_9_mid_burst_with_the_default_replay_window(tmp_path):
    """1,000 messages at ~100/s from 100 contacts; SIGKILL when ~300 are stored, restart
    3 s later. Pinecall replays only its last 3 events to the restarted worker."""
    total, contacts, kill_at = 1000, 100, 300
    tag = "kill9"
    log = tmp_path / "worker.log"
    async with Simulator(port=0, ai_delay=3600) as sim:  # default replay_last
        replay_window = sim.replay_last
        procs = {"worker": start_worker(sim, log)}
        try:
            await sim.wait_for("channel.add", timeout=30)
            killed: dict = {}

            async def kill_then_restart() -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while True:
                    n = await sync_to_async(
                        Message.objects.filter(author=Message.Author.CUSTOMER).count
                    )()
                    if n >= kill_at:
                        break
                    assert loop.time() < deadline, f"only {n} stored in 60 s\n{tail(log)}"
                    await asyncio.sleep(0.02)
                procs["worker"].kill()  # SIGKILL: whatever was in flight is lost
                await asyncio.to_thread(procs["worker"].wait, 10)
                killed["stored"] = await sync_to_async(
                    Message.objects.filter(author=Message.Author.CUSTOMER).count
                )()
                await asyncio.sleep(3.0)  # down for ~3 s, as a process manager would
                procs["worker"] = start_worker(sim, log)

            killer = asyncio.create_task(kill_then_restart())
            try:
                ids = await send_burst(sim, count=total, rate=100, contacts=contacts, tag=tag)
                await asyncio.wait_for(killer, 90)
            finally:
                killer.cancel()
            assert killed["stored"] < total, "the kill came after the burst: nothing was tested"
            # Events are stored in order: once this one is in, every earlier one had its turn.
            sentinel = await sim.customer_says(
                phone="34699999999", name="Last", text="sentinel after the kill"
            )
            await wait_until(
                lambda: Message.objects.filter(message_id=sentinel["message_id"]).exists(),
                timeout=90, what=f"the sentinel stored\n{tail(log)}",
            )
            stats = await sync_to_async(stored_stats)(ids, tag)
            ai = await sync_to_async(_ai_replies)()
            alive = procs["worker"].poll() is None
        finally:
            await astop(procs["worker"])
    line = (
        f"kill9: sent={total} stored={stats['stored']} duplicates={stats['duplicates']} "
        f"replay_window={replay_window}"
    )
    print(line)
    detail = f"{line} (stored when killed: {killed['stored']}; AI replies: {len(ai)} {ai[:5]})"
    assert replay_window == 3, detail
    assert stats["duplicates"] == 0 and stats["rows"] == stats["stored"], detail
    assert ai == [], detail
    assert stats["stored"] >= KILL9_MIN_STORED, f"{detail}\n{tail(log)}"
    assert alive, f"{detail}\n{tail(log)}"


# ---------------------------------------------------------------- hostile frames


def _hostile_frames(session_id: str, phone: str) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """(label, raw frame) for each hostile kind, and the storable ones' expectations by label.

    Frames are JSON text with ASCII escapes (so `\\u0000` and a lone `\\ud800` reach the
    worker as JSON escapes, as a server could send them).
    """

    def message(**fields) -> dict:
        return {"event": "whatsapp.message", "agent_id": AGENT_ID, "session_id": session_id,
                "from": phone, "name": "Hostile Target", "type": "text", "paused": False, **fields}

    def raw(obj) -> str:
        return json.dumps(obj, ensure_ascii=True)

    depth = 100_000
    frames = [
        ("nested 100,000 deep", "[" * depth + "]" * depth),
        ("5 MB frame", raw(message(message_id="wamid.HOSTILE.BIG", text="x" * (5 * 1024 * 1024)))),
        ("wrong types, every field", raw({
            "event": "whatsapp.message", "agent_id": 7, "session_id": 12345, "from": ["34"],
            "name": {"n": 1}, "type": 42, "text": ["a"], "message_id": {"id": 1}, "paused": "no",
        })),
        ("wrong types, all but the agent", raw(message(
            session_id=12345, **{"from": ["34"]}, name={"n": 1}, type=42, text=["a"],
            message_id={"id": 1}, paused="no",
        ))),
        ("top level array", "[1, 2, 3]"),
        ("top level string", '"just a string"'),
        ("top level null", "null"),
        ("top level number", "42"),
        ("not JSON", "{this is not json"),
        ("unknown event", raw({"event": "whatsapp.teleport", "agent_id": AGENT_ID,
                               "session_id": session_id})),
        ("event not a string", raw({"event": 5, "agent_id": AGENT_ID})),
    ]
    storable = {
        "NUL and lone surrogate": dict(
            frame=message(message_id="wamid.HOSTILE.NUL",
                          text="before NUL\x00after NUL, lone surrogate \ud800 end"),
            starts="before NULafter NUL, lone surrogate ", ends=" end"),
        "name over 200": dict(
            frame=message(session_id="wa-hostile-name", **{"from": "34622220001"},
                          name="N" * 300, message_id="wamid.HOSTILE.NAME",
                          text="hostile: a name over 200 characters")),
        "from over 32": dict(
            frame=message(session_id="wa-hostile-from", **{"from": "3" * 40},
                          message_id="wamid.HOSTILE.FROM",
                          text="hostile: from over 32 characters")),
        "session_id over 64": dict(
            frame=message(session_id="wa-" + "s" * 100, **{"from": "34622220003"},
                          message_id="wamid.HOSTILE.SESSION",
                          text="hostile: a session id over 64 characters")),
        "message_id over 128": dict(
            frame=message(message_id="wamid." + "M" * 200,
                          text="hostile: a message id over 128 characters")),
    }
    frames += [(label, raw(spec["frame"])) for label, spec in storable.items()]
    return frames, storable


async def _inject(sim: Simulator, frame: str, label: str, log: Path) -> None:
    """To the worker's connection; if a frame made it reconnect, wait until it is back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while AGENT_ID not in sim.connected_agents:
        assert loop.time() < deadline, f"worker not connected before {label!r}\n{tail(log)}"
        await asyncio.sleep(0.05)
    try:
        assert await sim.inject(frame, agent_id=AGENT_ID) == 1, label
    except RecursionError:
        # The simulator parses what it sends (for `sim.sent`), and its own json.loads
        # gives up on the 100,000-deep array: write that one frame to the socket
        # directly, after everything already queued.
        (conn,) = sim._connections_of(AGENT_ID)
        await conn.flush()
        await conn.ws.send(frame)


@pytest.mark.timeout(150)
async def test_hostile_frames_do_not_stop_the_worker(tmp_path, operator):
    log = tmp_path / "worker.log"
    async with Simulator(port=0, ai_delay=3600) as sim:
        worker = start_worker(sim, log)
        try:
            await sim.wait_for("channel.add", timeout=30)
            first = await sim.customer_says(phone="34611110000", name="Hostile Target", text="hi")
            frames, storable = _hostile_frames(first["session_id"], "34611110000")
            for label, frame in frames:
                await _inject(sim, frame, label, log)
            ids = await send_burst(sim, count=50, rate=200, contacts=5, tag="after hostile",
                                   phone_prefix="3463")
            stats = await wait_for_all_stored(ids, timeout=60, stall=30, tag="after hostile")
            assert stats["stored"] == 50 and stats["duplicates"] == 0, f"{stats}\n{tail(log)}"
            assert worker.poll() is None, tail(log)

            # Not a zombie: it still carries out an operator's command.
            conversation = await sync_to_async(
                lambda: Message.objects.select_related("conversation").get(message_id=ids[0])
                .conversation
            )()
            command = await sync_to_async(services.conversation_take_over)(
                conversation=conversation, operator=operator
            )
            await wait_until(
                lambda: Command.objects.get(pk=command.pk).status == Command.Status.CONFIRMED,
                timeout=30, what=f"take over confirmed\n{tail(log)}",
            )
            assert worker.poll() is None, tail(log)
        finally:
            await astop(worker)

    problems = await sync_to_async(_check_sanitised)(storable)
    assert not problems, "\n".join(problems) + f"\n--- worker log tail:\n{tail(log)}"


def _check_sanitised(storable: dict[str, dict]) -> list[str]:
    """Each storable hostile message stored once, its text kept, `altered` set."""
    problems = []
    for label, spec in storable.items():
        sent = spec["frame"]["text"]
        if "starts" in spec:
            rows = list(Message.objects.filter(text__startswith=spec["starts"]))
        else:
            rows = list(Message.objects.filter(text=sent))
        if len(rows) != 1:
            problems.append(f"{label}: {len(rows)} rows stored (expected 1)")
            continue
        m = rows[0]
        if "starts" in spec:
            ok = (m.text.endswith(spec["ends"]) and "\x00" not in m.text
                  and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in m.text))
            if not ok:
                problems.append(f"{label}: text not sanitised as expected: {m.text!r}")
        if not hasattr(m, "altered"):
            problems.append(f"{label}: Message has no `altered` field")
        elif m.altered is not True:
            problems.append(f"{label}: stored with altered={m.altered!r}")
    return problems


# ---------------------------------------------------------------- a replay after a reconnect


def _timeline() -> dict[str, list[tuple]]:
    """Each conversation's messages: author, text, status, whether it has a WhatsApp id."""
    out: dict[str, list[tuple]] = {}
    for m in Message.objects.exclude(direction=Message.Direction.NOTE).select_related(
        "conversation"
    ).order_by("id"):
        out.setdefault(m.conversation.session_id, []).append(
            (m.author, m.text, m.status, m.message_id)
        )
    return out


def _last_status_id(sim: Simulator) -> str:
    """The WhatsApp id of the last status the simulator produced (the last event so far)."""
    return next(f["message_id"] for f in reversed(sim.sent) if f.get("event") == "whatsapp.status")


def _read(message_id: str) -> bool:
    return Message.objects.filter(message_id=message_id, status=Message.Status.READ).exists()


async def test_a_replay_of_30_events_after_a_reconnect_doubles_nothing(tmp_path):
    log = tmp_path / "worker.log"
    script = {
        "34655510001": ["hello", "where is my order 12345?", "it has not arrived", "thanks"],
        "34655510002": ["hi there", "I want a refund", "my parcel was damaged", "ok bye"],
    }
    async with Simulator(port=0, ai_delay=0, status_delay=0, replay_last=30) as sim:
        worker = start_worker(sim, log)
        try:
            await sim.wait_for("channel.add", timeout=30)
            for round_ in range(4):
                for phone, texts in script.items():
                    await sim.customer_says(
                        phone=phone, name=f"Replay {phone[-1]}", text=texts[round_]
                    )
            # The last event produced is the "read" of the last reply: once stored, all are.
            last = _last_status_id(sim)
            await wait_until(lambda: _read(last), timeout=30,
                             what=f"the conversations stored\n{tail(log)}")
            before = await sync_to_async(_timeline)()
            authors = Counter(a for rows in before.values() for a, *_ in rows)
            customers = sum(len(t) for t in script.values())
            assert authors == {"customer": customers, "ai": customers}, before
            assert all(st == "read" for rows in before.values() for a, _, st, _ in rows
                       if a == "ai"), before

            mark_received, mark_sent = len(sim.received), len(sim.sent)
            assert await sim.drop_connections() == 1
            await sim.wait_for("agent.create", timeout=30, after=mark_received)
            await sim.wait_for("channel.add", timeout=10, after=mark_received)
            resumed = [
                i for i, f in enumerate(sim.sent[mark_sent:]) if f.get("event") == "agent.resumed"
            ]
            assert resumed, "the simulator did not resume the agent: no replay to test"
            replayed = len(sim.sent) - mark_sent - resumed[0] - 1
            assert replayed >= 30, f"only {replayed} events replayed"

            # After the replay, in order: one more exchange; once it is stored, so is the replay.
            sentinel_phone = "34655510001"
            await sim.customer_says(phone=sentinel_phone, name="Replay 1", text="one more thing")
            last = _last_status_id(sim)
            await wait_until(lambda: _read(last), timeout=30,
                             what=f"the exchange after the replay stored\n{tail(log)}")
            after = await sync_to_async(_timeline)()
            sentinel_session = sim.session_for(sentinel_phone)
            assert worker.poll() is None, tail(log)
        finally:
            await astop(worker)

    for session_id, rows in before.items():
        extra = after[session_id][len(rows):]
        assert after[session_id][: len(rows)] == rows, f"{session_id} changed:\n{after[session_id]}"
        if session_id == sentinel_session:
            assert [(a, t) for a, t, *_ in extra][:1] == [("customer", "one more thing")], (
                f"{session_id} gained rows from the replay: {extra}"
            )
            assert [a for a, *_ in extra] == ["customer", "ai"], f"{session_id} gained {extra}"
        else:
            assert extra == [], f"{session_id} gained rows after the replay: {extra}"
    ids = [mid for rows in after.values() for *_, mid in rows]
    assert None not in ids, f"a message without its WhatsApp id (a doubled reply?): {after}"
    assert len(ids) == len(set(ids)), after
