"""4. Pages at scale: the inbox, a long conversation and the reports over 30 days,
100,000 conversations and 1,000,000 messages in PostgreSQL (and the same pages on a
small dataset).

The datasets are generated with SQL (`INSERT ... SELECT generate_series`), the
denormalised columns (message_count, last_message_at, last_customer_message_at,
last_message_preview, last_message_author, unread_count) filled from the
messages themselves, then VACUUM ANALYZE. They are kept between runs (a marker
table records the spec and a fingerprint of the migrations); `--fresh`
rebuilds them.

Server time is measured in-process with django.test.Client (the whole Django
request: middleware, session, view, queries, templates; no network, no
Daphne), p50/p99 over 50 requests after 5 warm-up ones; the queries of one
request are counted with CaptureQueriesContext.
"""

from __future__ import annotations

import asyncio
import time

from bench import config, db, stats
from bench.stack import close_orm_connections, orm

BIG = {"conversations": 100_000, "messages": 1_000_000, "long": 5_000}
SMALL = {"conversations": 1_000, "messages": 10_000, "long": 1_000}
DATASET_VERSION = 2
# The reports page over the dataset's 30 days, as a supervisor sees it (everyone's figures).
REPORT_DAYS = 30
OPERATORS = 5
SAMPLES = 50
WARMUP = 5
# Extra pages, measured with fewer samples and no target.
EXTRA = {
    "inbox_needs_human": ("/?f=needs", 20),
    "inbox_mine": ("/?f=mine", 20),
    "inbox_page_20": ("/?page=20", 20),
    "inbox_search": ("/?q=arrive+tomorrow+xyz", 5),
    "conversation_earlier": (None, 20),  # /c/<long>/messages/?before=<id>
    "conversation_state": (None, 20),  # /c/<long>/state/ (every live update triggers one)
}


def spec_for(size: dict) -> dict:
    return {**size, "version": DATASET_VERSION, "schema": db.schema_fingerprint(), "operators": OPERATORS}


# ---------------------------------------------------------------- the dataset


def _build(name: str, size: dict, log) -> None:
    """A dataset in its own database, copied from the migrated template."""
    from bench.clients import create_operators

    db.create(name, template=config.DB_TEMPLATE)
    config.use_database(name)
    operators = create_operators(OPERATORS, prefix="pages")
    op_ids = [o.pk for o in operators]
    _create_supervisor()
    config.use_database(config.DB_LIVE)

    C, M, L = size["conversations"], size["messages"], size["long"]
    G = M - L  # messages of the other conversations, spread evenly
    others = C - 1
    sql_params = {"C": C, "G": G, "L": L, "others": others}
    held_case = "CASE " + " ".join(
        f"WHEN (g / 100) % {len(op_ids)} = {i} THEN {pk}" for i, pk in enumerate(op_ids)
    ) + " END"
    statements = [
        "SET synchronous_commit = off",
        "SET maintenance_work_mem = '512MB'",
        "SET work_mem = '128MB'",
        # Conversation 1 is the long one, active, with the newest activity; 1 in 5
        # others is active, 1 in 100 held by an operator, 1 in 50 needs a human.
        f"""
        INSERT INTO conversations_conversation (
            id, session_id, agent_id, contact_phone, contact_name, state, end_reason,
            holder, held_by_id, held_since, ai_paused, needs_human, started_at, ended_at,
            last_message_at, last_customer_message_at, last_message_preview,
            last_message_author, message_count, unread_count, created_at, updated_at,
            unreceived, auto_paused, needs_human_reason, needs_human_words)
        OVERRIDING SYSTEM VALUE
        SELECT g,
            'wa-' || lpad(to_hex(g), 12, '0'),
            'support',
            '3460' || lpad(g::text, 8, '0'),
            'Customer ' || g,
            CASE WHEN g = 1 OR g % 5 = 0 THEN 'active' ELSE 'ended' END,
            CASE WHEN g = 1 OR g % 5 = 0 THEN '' ELSE 'idle_timeout' END,
            CASE WHEN g % 100 = 0 THEN 'human' ELSE 'ai' END,
            CASE WHEN g % 100 = 0 THEN {held_case} END,
            CASE WHEN g % 100 = 0 THEN now() - interval '10 minutes' END,
            g % 100 = 0,
            g % 50 = 25,
            CASE WHEN g = 1 THEN now() - interval '30 seconds' * %(L)s
                 ELSE now() - interval '30 days' + interval '30 days' * g / %(C)s END,
            NULL, NULL, NULL, '', '', 0, 0, now(), now(), '[]'::jsonb, false, '', ''
        FROM generate_series(1, %(C)s) AS g
        """,
        # The others' messages: message k of conversation c (k-th round), customer
        # and AI in turn, 30 s apart from the conversation's start.
        """
        INSERT INTO conversations_message (
            conversation_id, message_id, direction, author, type, text, paused, status,
            error, echo_received, altered, created_at, status_changed_at)
        SELECT c, 'wamid.BENCH' || g,
            CASE WHEN k % 2 = 0 THEN 'in' ELSE 'out' END,
            CASE WHEN k % 2 = 0 THEN 'customer' ELSE 'ai' END,
            'text',
            CASE WHEN k % 2 = 0
                 THEN 'Hi, this is message ' || k || ' about order #' || (g % 99991) || ': when will it arrive?'
                 ELSE 'Thanks for writing! Order #' || (g % 99991) || ' left our warehouse and should arrive tomorrow.' END,
            CASE WHEN k % 2 = 0 THEN false END,
            CASE WHEN k % 2 = 0 THEN '' ELSE 'read' END,
            '', false, false,
            ts, CASE WHEN k % 2 = 1 THEN ts END
        FROM (
            SELECT g, 2 + g % %(others)s AS c, g / %(others)s AS k,
                   now() - interval '30 days' + interval '30 days' * (2 + g % %(others)s) / %(C)s
                       + interval '30 seconds' * (g / %(others)s) AS ts
            FROM generate_series(0, %(G)s - 1) AS g
        ) AS s
        """,
        # The long conversation, newest ids.
        """
        INSERT INTO conversations_message (
            conversation_id, message_id, direction, author, type, text, paused, status,
            error, echo_received, altered, created_at, status_changed_at)
        SELECT 1, 'wamid.BENCHLONG' || k,
            CASE WHEN k % 2 = 0 THEN 'in' ELSE 'out' END,
            CASE WHEN k % 2 = 0 THEN 'customer' ELSE 'ai' END,
            'text',
            CASE WHEN k % 2 = 0
                 THEN 'Message ' || k || ' of a long conversation: I still have a question about my order.'
                 ELSE 'Happy to help with that. Here is what I found about your order (' || k || ').' END,
            CASE WHEN k % 2 = 0 THEN false END,
            CASE WHEN k % 2 = 0 THEN '' ELSE 'read' END,
            '', false, false,
            now() - interval '30 seconds' * (%(L)s - k),
            CASE WHEN k % 2 = 1 THEN now() - interval '30 seconds' * (%(L)s - k) END
        FROM generate_series(0, %(L)s - 1) AS k
        """,
        """
        UPDATE conversations_conversation AS c
        SET message_count = s.n, last_message_at = s.last_at, last_customer_message_at = s.last_cust
        FROM (
            SELECT conversation_id, count(*) AS n, max(created_at) AS last_at,
                   max(created_at) FILTER (WHERE author = 'customer') AS last_cust
            FROM conversations_message GROUP BY conversation_id
        ) AS s
        WHERE c.id = s.conversation_id
        """,
        """
        UPDATE conversations_conversation AS c
        SET last_message_preview = left(s.text, 200), last_message_author = s.author
        FROM (
            SELECT DISTINCT ON (conversation_id) conversation_id, text, author
            FROM conversations_message ORDER BY conversation_id, id DESC
        ) AS s
        WHERE c.id = s.conversation_id
        """,
        """
        UPDATE conversations_conversation
        SET ended_at = last_message_at + interval '2 hours'
        WHERE state = 'ended'
        """,
        "UPDATE conversations_conversation SET unread_count = 2 WHERE held_by_id IS NOT NULL",
        *_takeover_statements(op_ids),
        """SELECT setval(pg_get_serial_sequence('conversations_conversation', 'id'),
                         (SELECT max(id) FROM conversations_conversation))""",
        """SELECT setval(pg_get_serial_sequence('conversations_message', 'id'),
                         (SELECT max(id) FROM conversations_message))""",
        "INSERT INTO conversations_agentstate (agent_id, ai_paused, worker_connected) VALUES ('support', false, true)",
    ]
    with db.connect(name) as conn:
        for sql in statements:
            t0 = time.monotonic()
            for key, value in sql_params.items():
                sql = sql.replace(f"%({key})s", str(int(value)))
            conn.execute(sql)
            log(f"  {' '.join(sql.split())[:70]}... {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        conn.execute("VACUUM ANALYZE")
        log(f"  VACUUM ANALYZE {time.monotonic() - t0:.1f} s")
    db.set_marker(name, spec_for(size))


def _create_supervisor() -> None:
    """The reports' reader: a supervisor sees every operator's figures."""
    from django.contrib.auth.models import Group, User

    user = User.objects.create(username="pagessup", first_name="Bench", last_name="Supervisor",
                               password="!bench-unusable")
    user.groups.add(*Group.objects.filter(name="Supervisors"))


def _takeover_statements(op_ids: list[int]) -> list[str]:
    """The takeover episodes, as the services write them, for the reports.

    1 in 8 conversations has a customer who asks for a person a few minutes in: 15 %
    fall back to the AI after 10 min, the others are taken over after 20 s to 15 min
    (skewed: most within a few minutes), answered 10 s to 2 min later and handed back
    by hand (75 %) or automatically (15 %), or end while held (10 %). 1 in 40 is taken
    over with nobody waiting. The queue's waiting customers (1 in 50) and the held
    conversations (1 in 100) have open episodes. 1 in 500 has a failed pause.
    """
    op = "CASE " + " ".join(f"WHEN id % {len(op_ids)} = {i} THEN {pk}" for i, pk in enumerate(op_ids)) + " END"
    columns = """conversation_id, agent_id, conversation_started_at, started_at, needs_human_at,
            needs_human_reason, taken_by_id, claimed_at, taken_at, first_reply_at, ended_at, "end", wait_seconds, reply_seconds, handling_seconds"""
    sample = f"""id, agent_id, started_at, held_by_id, held_since,
                20 + 880 * power(((id * 7919) % 1000) / 1000.0, 2) AS wait,
                10 + (id * 31) % 110 AS reply, 120 + (id * 13) % 1500 AS handling,
                (id * 17) % 100 AS kind, (id * 29) % 100 < 15 AS fell_back, {op} AS op
            FROM conversations_conversation"""
    return [
        f"""
        INSERT INTO conversations_takeover ({columns})
        SELECT id, agent_id, started_at, nh, nh, 'asked',
            CASE WHEN fell_back THEN NULL ELSE op END,
            CASE WHEN fell_back THEN NULL ELSE nh + interval '1 second' * (wait - 1) END,
            CASE WHEN fell_back THEN NULL ELSE nh + interval '1 second' * wait END,
            CASE WHEN fell_back THEN NULL ELSE nh + interval '1 second' * (wait + reply) END,
            CASE WHEN fell_back THEN nh + interval '600 seconds' ELSE nh + interval '1 second' * (wait + handling) END,
            CASE WHEN fell_back THEN 'fallback' WHEN kind < 75 THEN 'manual' WHEN kind < 90 THEN 'auto' ELSE 'ended' END,
            CASE WHEN fell_back THEN NULL ELSE wait END,
            CASE WHEN fell_back THEN NULL ELSE reply END,
            CASE WHEN fell_back OR kind >= 90 THEN NULL ELSE handling END
        FROM (SELECT started_at + interval '1 minute' * (1 + id % 7) AS nh, * FROM (SELECT {sample}) AS r) AS s
        WHERE id % 8 = 3 AND id % 50 <> 25 AND id % 100 <> 0 AND id > 1
        """,
        f"""
        INSERT INTO conversations_takeover ({columns})
        SELECT id, agent_id, started_at, t, NULL, '', op, t, t + interval '1 second', t + interval '1 second' * (1 + reply),
            t + interval '1 second' * (1 + handling),
            CASE WHEN kind < 80 THEN 'manual' ELSE 'auto' END, NULL, reply, handling
        FROM (SELECT started_at + interval '3 minutes' AS t, * FROM (SELECT {sample}) AS r) AS s
        WHERE id % 40 = 7 AND id > 1
        """,
        # The queue: waiting now, nobody has taken them yet.
        f"""
        INSERT INTO conversations_takeover ({columns})
        SELECT id, agent_id, started_at, now() - interval '1 minute' * (1 + id % 10), now() - interval '1 minute' * (1 + id % 10),
            'asked', NULL, NULL, NULL, NULL, NULL, '', NULL, NULL, NULL
        FROM conversations_conversation WHERE id % 50 = 25
        """,
        "UPDATE conversations_conversation SET needs_human_since = now() - interval '1 minute' * (1 + id % 10),"
        " needs_human_reason = 'asked' WHERE id % 50 = 25",
        # Held now: taken after a wait, not handed back yet.
        f"""
        INSERT INTO conversations_takeover ({columns})
        SELECT id, agent_id, started_at, held_since - interval '1 second' * wait, held_since - interval '1 second' * wait,
            'asked', held_by_id, held_since - interval '1 second', held_since, NULL, NULL, '', wait, NULL, NULL
        FROM (SELECT {sample}) AS s WHERE id % 100 = 0
        """,
        f"""
        INSERT INTO conversations_command (kind, scope, agent_id, session_id, contact_phone, text, line_id,
            conversation_id, operator_id, status, error_code, error_message, attempts, created_at, completed_at)
        SELECT 'pause', 'session', agent_id, session_id, '', '', '', id, {op}, 'failed', 'AGENT_OFFLINE',
            'The agent is offline', 1, started_at + interval '2 minutes', started_at + interval '2 minutes'
        FROM conversations_conversation WHERE id % 500 = 11
        """,
    ]


def _check(name: str, size: dict) -> dict:
    with db.connect(name) as conn:
        convs, msgs, episodes = conn.execute(
            "SELECT (SELECT count(*) FROM conversations_conversation),"
            " (SELECT count(*) FROM conversations_message),"
            " (SELECT count(*) FROM conversations_takeover)"
        ).fetchone()
        bad = conn.execute(
            "SELECT count(*) FROM conversations_conversation c WHERE message_count <>"
            " (SELECT count(*) FROM conversations_message m WHERE m.conversation_id = c.id)"
            " AND c.id <= 50"
        ).fetchone()[0]
        long_count = conn.execute(
            "SELECT message_count FROM conversations_conversation WHERE id = 1"
        ).fetchone()[0]
    return {"conversations": convs, "messages": msgs, "takeover_episodes": episodes,
            "long_conversation_messages": long_count,
            "inconsistent_counts_sampled": bad}


def ensure(name: str, size: dict, *, fresh: bool, log) -> dict:
    spec = spec_for(size)
    if not fresh and db.marker(name) == spec:
        log(f"pages: reusing {name} ({size['conversations']} conversations, {size['messages']} messages)")
        return {"built": False}
    log(f"pages: building {name} ({size['conversations']} conversations, {size['messages']} messages)")
    t0 = time.monotonic()
    _build(name, size, log)
    return {"built": True, "build_seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------- the measurement


def _measure(name: str, *, samples: int, extras: bool, profile_dir=None, profile: bool = False) -> dict:
    from datetime import timedelta

    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from conversations.models import Message

    config.use_database(name)
    try:
        user = User.objects.get(username="pages0")
        operator_client = Client(HTTP_HOST="127.0.0.1")
        operator_client.force_login(user)
        supervisor = Client(HTTP_HOST="127.0.0.1")
        supervisor.force_login(User.objects.get(username="pagessup"))
        today = timezone.localdate()
        reports_url = f"/reports/?start={today - timedelta(days=REPORT_DAYS - 1)}&end={today}"
        oldest_shown = (
            Message.objects.filter(conversation_id=1).order_by("-id").values_list("id", flat=True)[199]
        )
        urls = {"inbox": ("/", samples), "conversation": ("/c/1/", samples), "reports": (reports_url, samples)}
        if extras:
            for key, (url, n) in EXTRA.items():
                if key == "conversation_earlier":
                    url = f"/c/1/messages/?before={oldest_shown}"
                elif key == "conversation_state":
                    url = "/c/1/state/"
                urls[key] = (url, n)
        out = {}
        for key, (url, n) in urls.items():
            # The reports are read as a supervisor: every operator's figures.
            client = supervisor if key == "reports" else operator_client
            for _ in range(WARMUP):
                response = client.get(url)
            if response.status_code != 200:
                out[key] = {"url": url, "error": f"HTTP {response.status_code}"}
                continue
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                response = client.get(url)
                times.append(time.perf_counter() - t0)
            with CaptureQueriesContext(connection) as captured:
                response = client.get(url)
            summary = stats.summary_ms(times, ps=(50, 95, 99))
            slowest = sorted(captured.captured_queries, key=lambda q: -float(q["time"]))[:3]
            out[key] = {
                "url": url,
                "p50_ms": summary["p50_ms"],
                "p99_ms": summary["p99_ms"],
                "max_ms": summary["max_ms"],
                "samples": summary["samples"],
                "queries": len(captured.captured_queries),
                "bytes": len(response.content),
                "slowest_queries": [
                    {"ms": round(float(q["time"]) * 1000, 2), "sql": q["sql"][:300]} for q in slowest
                ],
            }
            if profile and key in ("inbox", "conversation", "reports") and summary["p50_ms"] > 50:
                out[key]["profile"] = _pyinstrument(client, url, profile_dir / f"pages-{key}.txt")
        return out
    finally:
        config.use_database(config.DB_LIVE)


def _pyinstrument(client, url: str, path) -> str:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    for _ in range(10):
        client.get(url)
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return "\n".join(text.splitlines()[:60])


def _render_breakdown(name: str) -> dict:
    """Median ms of the conversation page's parts, rendered alone (templates only)."""
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.template.loader import render_to_string

    from conversations import selectors

    config.use_database(name)
    try:
        user = User.objects.get(username="pages0")
        conversation = selectors.conversation_get(1)
        messages, has_earlier = selectors.conversation_messages(conversation_id=1)
        rows, _ = selectors.inbox_page(user=user)

        def median(fn, n=15):
            fn()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return round(stats.percentile(times, 50) * 1000, 2)

        size = settings.CONVERSATION_PAGE_SIZE
        return {
            "queries_messages": median(lambda: selectors.conversation_messages(conversation_id=1)),
            "queries_inbox": median(lambda: selectors.inbox_page(user=user)),
            "queries_state": median(
                lambda: selectors.conversation_state(conversation=conversation, user=user)
            ),
            f"render_{len(messages)}_messages": median(
                lambda: render_to_string(
                    "conversations/_messages.html",
                    {"conversation": conversation, "messages": messages, "has_earlier": has_earlier},
                )
            ),
            "render_50_messages": median(
                lambda: render_to_string(
                    "conversations/_messages.html",
                    {"conversation": conversation, "messages": messages[-50:], "has_earlier": True},
                )
            ),
            f"render_{len(rows)}_inbox_rows": median(
                lambda: render_to_string("conversations/_inbox_rows.html", {"rows": rows, "page": 1})
            ),
            "page_size_setting": size,
        }
    finally:
        config.use_database(config.DB_LIVE)


def _explain(name: str) -> dict:
    """The plans of the two pages' main queries, for the README."""
    plans = {}
    with db.connect(name) as conn:
        for key, sql in {
            "inbox": "SELECT * FROM conversations_conversation c LEFT JOIN auth_user u ON u.id = c.held_by_id"
            " WHERE c.state = 'active' ORDER BY c.last_message_at DESC, c.id DESC LIMIT 51",
            "conversation": "SELECT * FROM conversations_message m LEFT JOIN auth_user u ON u.id = m.operator_id"
            " WHERE m.conversation_id = 1 ORDER BY m.id DESC LIMIT 201",
        }.items():
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall()
            plans[key] = [r[0] for r in rows]
    return plans


async def run(h) -> dict:
    await close_orm_connections()
    result: dict = {}
    datasets = {"big": (config.DB_PAGES, BIG), "small": (config.DB_PAGES_SMALL, SMALL)}
    for label, (name, size) in datasets.items():
        built = await orm(ensure, name, size, fresh=h.fresh, log=h.log)
        checked = await orm(_check, name, size)
        samples = max(10, int(SAMPLES * h.scale))
        measured = await orm(
            _measure, name, samples=samples, extras=label == "big",
            profile_dir=h.profile_dir, profile=h.profile and label == "big",
        )
        result[label] = {"dataset": {**size, **checked, **built}, "pages": measured}
        for key in ("inbox", "conversation", "reports"):
            m = measured.get(key, {})
            h.log(f"pages {label} {key}: p50 {m.get('p50_ms')} p99 {m.get('p99_ms')} ms, "
                  f"{m.get('queries')} queries {m.get('error', '')}")
        await asyncio.sleep(0)
    result["plans"] = await orm(_explain, config.DB_PAGES)
    result["render_breakdown"] = await orm(_render_breakdown, config.DB_PAGES)
    await close_orm_connections()
    big, small = result["big"]["pages"], result["small"]["pages"]
    for key in ("inbox", "conversation", "reports"):
        result[key] = {
            "p50_ms": big.get(key, {}).get("p50_ms"),
            "p99_ms": big.get(key, {}).get("p99_ms"),
            "queries": big.get(key, {}).get("queries"),
            "queries_small": small.get(key, {}).get("queries"),
            "p50_ms_small": small.get(key, {}).get("p50_ms"),
            "p99_ms_small": small.get(key, {}).get("p99_ms"),
        }
    return result
