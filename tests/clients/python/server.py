"""Looking at the database from outside pgwarden, with psycopg over DIRECT_URL."""

import time

import psycopg


def run(direct_url, sql):
    """Runs `sql` (statements without results, such as DDL) directly on the database."""
    with psycopg.connect(direct_url, autocommit=True) as conn:
        conn.execute(sql)


def scalar(direct_url, sql, params=()):
    """The first column of the first row of `sql`, run directly on the database."""
    with psycopg.connect(direct_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchone()[0]


def wait_until_running(direct_url, query, timeout=30.0):
    """Waits until a server session is running `query` (its exact text)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(direct_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            running = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                [query],
            ).fetchone()[0]
            if running:
                return
            time.sleep(0.05)
    raise AssertionError(f"no server session ran {query!r} within {timeout} s")


def running(direct_url, query):
    """How many server sessions are running `query` now."""
    return scalar(
        direct_url,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
        [query],
    )
