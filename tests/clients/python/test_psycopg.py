"""psycopg 3 through pgwarden's wire port, on one server session.

Every connection here shares pgwarden's only server session with the
others, one transaction at a time: what psycopg expects of a connection
(its prepared statements, its pipeline, its cancel key, its COPY) must
hold all the same.
"""

import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from hashlib import md5

import psycopg
import pytest
from psycopg.types.json import Json, Jsonb

from server import run, running, scalar, wait_until_running

SERVER_SESSIONS = 1

TYPED_QUERY = """SELECT %s::int, %s::bigint, %s::numeric, %s::text, %s::bytea,
    %s::bool, %s::timestamptz, %s::date, %s::uuid, %s::json, %s::jsonb,
    %s::int[], %s::text[], %s::text"""

DOCUMENT = {"a": [1, "ü", None], "b": {"c": True, "d": 1.5}}

TYPED_VALUES = [
    42,
    -(2**62),
    Decimal("-12345678901234567890.000000000123456789"),
    "grüße, 東京 🐘 'quoted' \\ back\tslash",
    bytes(range(256)),
    True,
    datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    date(2024, 2, 29),
    uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
    Json(DOCUMENT),
    Jsonb(DOCUMENT),
    [1, None, -3],
    ["a", "b,c", '"q"', "", None],
    None,
]

TYPED_EXPECTED = (*TYPED_VALUES[:9], DOCUMENT, DOCUMENT, *TYPED_VALUES[11:])


def connect(url, **options):
    return psycopg.connect(url, autocommit=True, **options)


def typed_rows(url, binary, in_transaction):
    with psycopg.connect(url, autocommit=not in_transaction) as conn:
        with conn.cursor(binary=binary) as cur:
            cur.execute(TYPED_QUERY, TYPED_VALUES)
            first = cur.fetchone()
            cur.execute("SELECT * FROM (VALUES (1, 'one'), (2, NULL), (3, 'three')) v(n, t) ORDER BY n")
            rest = cur.fetchall()
        if in_transaction:
            conn.commit()
        return first, rest


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "transaction"])
def test_parameters_of_many_types_come_back_as_from_postgres(pgwarden_url, direct_url, binary, in_transaction):
    through_pgwarden = typed_rows(pgwarden_url, binary, in_transaction)
    assert through_pgwarden == typed_rows(direct_url, binary, in_transaction)
    assert through_pgwarden[0] == TYPED_EXPECTED
    assert through_pgwarden[1] == [(1, "one"), (2, None), (3, "three")]


def test_transactions_commit_roll_back_and_fail_as_on_postgres(pgwarden_url, direct_url):
    run(direct_url, "CREATE TABLE ledger (id int PRIMARY KEY, note text, at timestamptz)")
    stamp = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with connect(pgwarden_url) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", [1, "kept ✓", stamp])
            conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", [2, None, stamp])
        with conn.transaction():
            conn.execute("INSERT INTO ledger VALUES (3, 'rolled back', now())")
            raise psycopg.Rollback()
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():
                conn.execute("INSERT INTO ledger VALUES (4, 'failed with its transaction', now())")
                conn.execute("INSERT INTO ledger VALUES (1, 'duplicate', now())")
        with conn.transaction():
            with conn.transaction():
                conn.execute("INSERT INTO ledger VALUES (5, 'savepoint kept', now())")
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.transaction():
                    conn.execute("INSERT INTO ledger VALUES (6, 'savepoint rolled back', now())")
                    conn.execute("SELECT 1/0")
        rows = conn.execute("SELECT id, note FROM ledger ORDER BY id").fetchall()
    assert rows == [(1, "kept ✓"), (2, None), (5, "savepoint kept")]
    assert scalar(direct_url, "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger") == "1,2,5"
    assert scalar(direct_url, "SELECT at FROM ledger WHERE id = 1") == stamp


def test_named_statements_of_two_connections_share_one_server_session(pgwarden_url):
    # psycopg names its statements _pg3_0, _pg3_1, ... per connection, so
    # the two connections' first statements have the same name and
    # different texts on the one server session.
    with connect(pgwarden_url, prepare_threshold=0) as a, connect(pgwarden_url, prepare_threshold=0) as b:
        for n in range(10):
            assert a.execute("SELECT %s::int + 1", [n]).fetchone() == (n + 1,)
            assert b.execute("SELECT %s::text || ' from b'", [str(n)]).fetchone() == (f"{n} from b",)
            assert b.execute("SELECT %s::int + 1", [n * 10]).fetchone() == (n * 10 + 1,)
            with a.transaction():
                assert a.execute("SELECT %s::text || ' from a'", [str(n)]).fetchone() == (f"{n} from a",)
                assert a.execute("SELECT %s::int + 1", [n]).fetchone() == (n + 1,)
        backends = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in (a, b)}
        assert len(backends) == 1, "both connections ran on pgwarden's one server session"
        shared = a.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s", ["SELECT $1::int + 1"]
        ).fetchone()[0]
        assert shared == 1, "one text is one statement on the server, whoever prepared it"
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1 / %s::int", [0])
        assert b.execute("SELECT %s::int + 1", [41]).fetchone() == (42,)


def test_statements_psycopg_deallocates_are_prepared_again_when_used_again(pgwarden_url):
    statements = [f"SELECT %s::int * {k}" for k in range(1, 6)]
    with connect(pgwarden_url, prepare_threshold=0) as small, connect(pgwarden_url, prepare_threshold=0) as other:
        small.prepared_max = 2
        for round in range(3):
            for k, sql in enumerate(statements, start=1):
                assert small.execute(sql, [round]).fetchone() == (round * k,)
                assert other.execute(statements[0], [k]).fetchone() == (k,)


@pytest.mark.parametrize("prepare_threshold", [5, 0], ids=["unprepared", "prepared"])
def test_a_pipeline_with_an_error_in_the_middle(pgwarden_url, direct_url, prepare_threshold):
    table = f"piped_{prepare_threshold}"
    run(direct_url, f"CREATE TABLE {table} (n int PRIMARY KEY)")
    insert = f"INSERT INTO {table} VALUES (%s)"
    with connect(pgwarden_url, prepare_threshold=prepare_threshold) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline() as pipeline:
                conn.execute(insert, [1])
                counted = conn.execute(f"SELECT count(*) FROM {table}")
                conn.execute(insert, [2])
                pipeline.sync()
                assert counted.fetchone() == (1,)
                conn.execute(insert, [3])
                conn.execute("SELECT 1 / %s::int", [0])
                conn.execute(insert, [4])
                pipeline.sync()
        conn.execute(insert, [5])
        with conn.pipeline():
            last = conn.execute(f"SELECT array_agg(n ORDER BY n) FROM {table}")
        assert last.fetchone() == ([1, 2, 5],)
    assert scalar(direct_url, f"SELECT array_agg(n ORDER BY n) FROM {table}") == [1, 2, 5]


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_a_cancel_from_another_thread_stops_the_query_and_keeps_the_connection(pgwarden_url, direct_url, how):
    sleep = "SELECT pg_sleep(10)"
    with connect(pgwarden_url) as conn:

        def cancel():
            wait_until_running(direct_url, sleep)
            getattr(conn, how)()

        canceller = threading.Thread(target=cancel)
        canceller.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(sleep)
        canceller.join(30)
        assert time.monotonic() - started < 8, "the cancel stopped the sleep"
        assert conn.execute("SELECT 'still connected'").fetchone() == ("still connected",)
    assert running(direct_url, sleep) == 0


COPY_ROWS = 40_000


def copy_payload(i):
    return f"{i:08d} é " + "x" * 100


@pytest.mark.parametrize("format", ["text", "binary"])
def test_copy_in_and_out_streams_megabytes(pgwarden_url, direct_url, format):
    table = f"copied_{format}"
    run(direct_url, f"CREATE TABLE {table} (id int PRIMARY KEY, payload text)")
    options = " (FORMAT BINARY)" if format == "binary" else ""
    expected = [(i, copy_payload(i)) for i in range(COPY_ROWS)]
    with connect(pgwarden_url) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} (id, payload) FROM STDIN{options}") as copy:
            copy.set_types(["int4", "text"])
            for row in expected:
                copy.write_row(row)
        assert cur.rowcount == COPY_ROWS
        with cur.copy(f"COPY (SELECT id, payload FROM {table} ORDER BY id) TO STDOUT{options}") as copy:
            copy.set_types(["int4", "text"])
            received = list(copy.rows())
        assert received == expected
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (COPY_ROWS,)
    digest = md5("".join(f"{i}:{p};" for i, p in expected).encode()).hexdigest()
    on_server = scalar(direct_url, f"SELECT md5(string_agg(id || ':' || payload || ';', '' ORDER BY id)) FROM {table}")
    assert on_server == digest
    assert scalar(direct_url, f"SELECT pg_total_relation_size('{table}')") > 4_000_000


def test_a_copy_the_client_abandons_is_rolled_back_and_the_connection_stays(pgwarden_url, direct_url):
    run(direct_url, "CREATE TABLE abandoned (id int)")
    with connect(pgwarden_url) as conn, conn.cursor() as cur:
        with pytest.raises(RuntimeError, match="gives up"):
            with cur.copy("COPY abandoned FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i,))
                raise RuntimeError("the client gives up")
        assert conn.execute("SELECT count(*) FROM abandoned").fetchone() == (0,)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def settings(conn):
    return conn.execute("SELECT current_setting('TimeZone'), current_setting('search_path')").fetchone()


def test_a_pinned_connections_settings_are_gone_before_the_next_client(pgwarden_url, direct_url):
    with psycopg.connect(direct_url) as conn:
        defaults = settings(conn)
    assert defaults[0] != "Asia/Tokyo"
    with connect(pgwarden_url) as pinned:
        pinned.execute("SET TimeZone = 'Asia/Tokyo'")
        pinned.execute("SET search_path = pg_catalog")
        for _ in range(3):
            assert settings(pinned) == ("Asia/Tokyo", "pg_catalog")
    with connect(pgwarden_url) as after:
        assert settings(after) == defaults


def test_set_local_stays_in_its_transaction(pgwarden_url, direct_url):
    with psycopg.connect(direct_url) as conn:
        defaults = settings(conn)
    with connect(pgwarden_url) as a, connect(pgwarden_url) as b:
        for _ in range(3):
            with a.transaction():
                a.execute("SET LOCAL TimeZone = 'Asia/Tokyo'")
                assert settings(a)[0] == "Asia/Tokyo"
            assert settings(a) == defaults
            assert settings(b) == defaults


def test_startup_options_follow_each_connection_onto_the_shared_session(pgwarden_url, direct_url):
    with psycopg.connect(direct_url) as conn:
        defaults = settings(conn)
    tokyo_options = "-c TimeZone=Asia/Tokyo -c search_path=pg_catalog"
    with connect(pgwarden_url, options=tokyo_options) as tokyo, connect(pgwarden_url) as plain:
        for _ in range(3):
            assert settings(tokyo) == ("Asia/Tokyo", "pg_catalog")
            assert settings(plain) == defaults
            moment = tokyo.execute("SELECT '2024-01-01 09:00:00'::timestamptz").fetchone()[0]
            assert moment == datetime(2024, 1, 1, 0, 0, tzinfo=timezone.utc)
