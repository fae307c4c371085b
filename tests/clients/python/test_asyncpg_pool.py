"""An asyncpg pool through pgwarden's wire port, on four server sessions.

Sixteen asyncpg connections share pgwarden's four server sessions: each
acquire runs one statement (a read or a single-row UPDATE), and each
release runs a reset query: asyncpg's own by default
(`Connection.get_reset_query()`, which ends in `RESET ALL`), or one
without `RESET ALL`, given as the pool's `reset`.
"""

import asyncio

import asyncpg
import pytest

from server import run, scalar

SERVER_SESSIONS = 4

OPERATIONS = 500
COUNTERS = 10


async def reset_without_reset_all(conn):
    await conn.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;")


@pytest.mark.parametrize("reset", [None, reset_without_reset_all], ids=["default_reset", "reset_without_reset_all"])
def test_a_pool_of_sixteen_does_mixed_reads_and_updates_without_an_error(pgwarden_url, direct_url, reset):
    run(
        direct_url,
        "DROP TABLE IF EXISTS counters;"
        f"CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);"
        f"INSERT INTO counters SELECT g, 0 FROM generate_series(0, {COUNTERS - 1}) g",
    )

    async def operation(pool, i):
        counter = i % COUNTERS
        async with pool.acquire() as conn:
            if i % 3 == 0:
                status = await conn.execute("UPDATE counters SET n = n + 1 WHERE id = $1", counter)
                assert status == "UPDATE 1"
            else:
                row = await conn.fetchrow("SELECT id, n FROM counters WHERE id = $1", counter)
                assert row["id"] == counter and row["n"] >= 0

    async def scenario():
        pool = await asyncpg.create_pool(pgwarden_url, min_size=4, max_size=16, reset=reset)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(operation(pool, i) for i in range(OPERATIONS)), return_exceptions=True),
                120,
            )
            errors = [repr(r) for r in results if isinstance(r, BaseException)]
            assert errors == [], f"{len(errors)} of {OPERATIONS} failed, the first: {errors[:3]}"
            assert pool.get_size() == 16, "the pool opened all its connections"
        finally:
            await asyncio.wait_for(pool.close(), 30)

    asyncio.run(scenario())
    updates = len(range(0, OPERATIONS, 3))
    assert scalar(direct_url, "SELECT sum(n) FROM counters") == updates
