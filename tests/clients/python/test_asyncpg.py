"""asyncpg through pgwarden's wire port, on one server session.

asyncpg prepares every statement it runs under a name of its own
(`__asyncpg_stmt_1__`, ... per connection) and keeps it in a cache for
the connection's life, so two connections on pgwarden's one server
session use the same names for different statements.
"""

import asyncio
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from hashlib import md5

import asyncpg
import pytest

from server import run, running, scalar, wait_until_running

SERVER_SESSIONS = 1

TYPED_QUERY = """SELECT $1::int, $2::bigint, $3::numeric, $4::text, $5::bytea,
    $6::bool, $7::timestamptz, $8::date, $9::uuid, $10::jsonb, $11::int[],
    $12::text[], $13::text"""

TYPED_VALUES = (
    42,
    -(2**62),
    Decimal("-12345678901234567890.000000000123456789"),
    "grüße, 東京 🐘 'quoted' \\ back",
    bytes(range(256)),
    True,
    datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone.utc),
    date(2024, 2, 29),
    uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
    '{"a": [1, "ü", null]}',
    [1, None, -3],
    ["a", "b,c", '"q"', "", None],
    None,
)


def test_statements_of_two_connections_alternate_on_one_server_session(pgwarden_url):
    async def scenario():
        a = await asyncpg.connect(pgwarden_url)
        b = await asyncpg.connect(pgwarden_url)
        try:
            for n in range(20):
                assert await a.fetchval("SELECT $1::int + 1", n) == n + 1
                rows = await b.fetch("SELECT g, $1::text FROM generate_series(1, $2::int) g", f"b{n}", n % 4)
                assert [tuple(r) for r in rows] == [(g, f"b{n}") for g in range(1, n % 4 + 1)]
                assert await b.fetchval("SELECT $1::int + 1", n * 10) == n * 10 + 1
                assert await a.fetchrow("SELECT $1::text AS who, $2::int AS n", "a", n) == ("a", n)
            backends = {await conn.fetchval("SELECT pg_backend_pid()") for conn in (a, b)}
            assert len(backends) == 1, "both connections ran on pgwarden's one server session"
            with pytest.raises(asyncpg.DivisionByZeroError):
                await a.fetchval("SELECT 1 / $1::int", 0)
            assert await b.fetchval("SELECT $1::int + 1", 41) == 42
            assert await a.fetchval("SELECT $1::int + 1", 1) == 2
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_parameters_of_many_types_come_back_as_from_postgres(pgwarden_url, direct_url):
    async def typed(url):
        conn = await asyncpg.connect(url)
        try:
            return tuple(await conn.fetchrow(TYPED_QUERY, *TYPED_VALUES))
        finally:
            await conn.close()

    async def scenario():
        through_pgwarden = await typed(pgwarden_url)
        assert through_pgwarden == await typed(direct_url)
        assert through_pgwarden == TYPED_VALUES

    asyncio.run(scenario())


def test_types_asyncpg_introspects_leave_the_session_to_the_others(pgwarden_url, direct_url):
    # An enum or a domain is unknown to asyncpg until it asks the server
    # about it, once per connection, with jit turned off for the question
    # and back on after it.
    run(
        direct_url,
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); CREATE DOMAIN positive AS int CHECK (VALUE > 0)",
    )

    async def scenario():
        a = await asyncpg.connect(pgwarden_url)
        b = await asyncpg.connect(pgwarden_url)
        try:
            assert await a.fetchval("SELECT $1::mood", "happy") == "happy"
            assert await a.fetchval("SELECT $1::positive", 7) == 7
            assert await a.fetchval("SHOW jit") == await b.fetchval("SHOW jit")
            assert await b.fetchval("SELECT 'ok'::mood") == "ok"
            assert await a.fetchval("SELECT 'sad'::mood") == "sad"
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_transactions_commit_roll_back_and_fail_as_on_postgres(pgwarden_url, direct_url):
    run(direct_url, "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))")

    async def scenario():
        conn = await asyncpg.connect(pgwarden_url)
        try:
            async with conn.transaction():
                await conn.executemany("INSERT INTO accounts VALUES ($1, $2)", [(1, 100), (2, 0)])
            rolled_back = conn.transaction()
            await rolled_back.start()
            await conn.execute("UPDATE accounts SET balance = balance + 50 WHERE id = $1", 2)
            assert await conn.fetchval("SELECT balance FROM accounts WHERE id = 2") == 50
            await rolled_back.rollback()
            with pytest.raises(asyncpg.CheckViolationError):
                async with conn.transaction():
                    await conn.execute("UPDATE accounts SET balance = balance + 500 WHERE id = $1", 2)
                    await conn.execute("UPDATE accounts SET balance = balance - 500 WHERE id = $1", 1)
            async with conn.transaction():
                await conn.execute("UPDATE accounts SET balance = balance - 30 WHERE id = 1")
                with pytest.raises(asyncpg.DivisionByZeroError):
                    async with conn.transaction():
                        await conn.execute("UPDATE accounts SET balance = balance + 30 WHERE id = 2")
                        await conn.execute("SELECT 1 / 0")
                await conn.execute("UPDATE accounts SET balance = balance + 30 WHERE id = 2")
            rows = await conn.fetch("SELECT id, balance FROM accounts ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, 70), (2, 30)]
            assert not conn.is_in_transaction()
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert scalar(direct_url, "SELECT string_agg(id || '=' || balance, ',' ORDER BY id) FROM accounts") == "1=70,2=30"


def test_an_error_inside_a_transaction_aborts_it_until_rollback(pgwarden_url, direct_url):
    run(direct_url, "CREATE TABLE events (id int PRIMARY KEY)")

    async def scenario():
        conn = await asyncpg.connect(pgwarden_url)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("INSERT INTO events VALUES (1)")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO events VALUES (1)")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT $1::int", 1)
            await transaction.rollback()
            assert await conn.fetchval("SELECT count(*) FROM events") == 0
            assert await conn.fetchval("SELECT $1::int", 1) == 1
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert scalar(direct_url, "SELECT count(*) FROM events") == 0


COPY_ROWS = 40_000


def test_copy_records_to_a_table_and_from_a_query(pgwarden_url, direct_url):
    run(direct_url, "CREATE TABLE copied (id int PRIMARY KEY, payload text, at date)")
    records = [(i, f"{i:08d} é " + "x" * 100, date(2024, 1, 1 + i % 28)) for i in range(COPY_ROWS)]

    async def scenario():
        conn = await asyncpg.connect(pgwarden_url)
        try:
            status = await conn.copy_records_to_table("copied", records=records)
            assert status == f"COPY {COPY_ROWS}"
            chunks = []

            async def collect(chunk):
                chunks.append(bytes(chunk))

            status = await conn.copy_from_query(
                "SELECT id, payload FROM copied WHERE id >= $1 ORDER BY id", 0, output=collect
            )
            assert status == f"COPY {COPY_ROWS}"
            assert await conn.fetchval("SELECT count(*) FROM copied") == COPY_ROWS
            return b"".join(chunks)
        finally:
            await conn.close()

    copied_out = asyncio.run(scenario())
    expected = "".join(f"{i}\t{payload}\n" for i, payload, _ in records).encode()
    assert copied_out == expected
    assert len(copied_out) > 4_000_000
    on_server = scalar(direct_url, "SELECT md5(string_agg(id || ':' || at, ';' ORDER BY id)) FROM copied")
    assert on_server == md5(";".join(f"{i}:{at.isoformat()}" for i, _, at in records).encode()).hexdigest()


def test_a_query_cancelled_by_a_timeout_stops_and_the_connection_stays(pgwarden_url, direct_url):
    sleep = "select pg_sleep(10)"

    async def scenario():
        conn = await asyncpg.connect(pgwarden_url)
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetch(sleep), 1)
            assert await conn.fetchval("SELECT 'still connected'") == "still connected"
            assert time.monotonic() - started < 8, "the cancel stopped the sleep"
            assert running(direct_url, sleep) == 0
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep($1::float8)", 10.0), 1)
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_a_statement_timeout_cancel_from_outside_is_an_error_and_the_connection_stays(pgwarden_url, direct_url):
    sleep = "SELECT pg_sleep(10)"

    async def scenario():
        conn = await asyncpg.connect(pgwarden_url)
        try:
            loop = asyncio.get_running_loop()
            waiter = loop.run_in_executor(None, wait_until_running, direct_url, sleep)
            query = asyncio.ensure_future(conn.execute(sleep))
            await waiter
            cancelled = scalar(
                direct_url,
                "SELECT count(*) FROM (SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = %s) c",
                [sleep],
            )
            assert cancelled == 1
            with pytest.raises(asyncpg.QueryCanceledError):
                await asyncio.wait_for(query, 10)
            assert await conn.fetchval("SELECT 'still connected'") == "still connected"
        finally:
            await conn.close()

    asyncio.run(scenario())
