"""psycopg 3 through pgwarden's wire port, on two server sessions.

A connection that leaves state on its server session (LISTEN, a session
SET) keeps that session for itself until it leaves; the other connections
go on sharing the second one and never see that state.
"""

import psycopg

from server import run

SERVER_SESSIONS = 2


def connect(url, **options):
    return psycopg.connect(url, autocommit=True, **options)


def test_listen_notify_reaches_a_waiting_listener(pgwarden_url):
    with connect(pgwarden_url) as listener, connect(pgwarden_url) as notifier:
        listener.execute("LISTEN jobs")
        notifier.execute("NOTIFY jobs, 'one'")
        notifier.execute("SELECT pg_notify('jobs', %s)", ["two ✓"])
        received = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=2)]
        assert received == [("jobs", "one"), ("jobs", "two ✓")]

        # Notifications of a transaction arrive at its commit, not before.
        with notifier.transaction():
            notifier.execute("NOTIFY jobs, 'three'")
            early = list(listener.notifies(timeout=0.5))
            assert early == []
        received = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert received == ["three"]

        # The listener still runs statements, and hears while it does.
        assert listener.execute("SELECT 'listening'").fetchone() == ("listening",)
        heard = []
        listener.add_notify_handler(heard.append)
        notifier.execute("NOTIFY jobs, 'four'")
        listener.execute("SELECT pg_sleep(0.2)")
        assert [n.payload for n in heard] == ["four"]


def test_session_settings_of_one_connection_never_reach_another(pgwarden_url, direct_url):
    run(
        direct_url,
        "CREATE SCHEMA app; CREATE TABLE app.t (v text); INSERT INTO app.t VALUES ('app');"
        "CREATE TABLE public.t (v text); INSERT INTO public.t VALUES ('public')",
    )
    with psycopg.connect(direct_url) as conn:
        default_zone = conn.execute("SHOW TimeZone").fetchone()[0]
    assert default_zone != "Asia/Tokyo"
    with connect(pgwarden_url) as pinned, connect(pgwarden_url) as other, connect(pgwarden_url) as third:
        pinned.execute("SET search_path = app, public")
        pinned.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(5):
            assert pinned.execute("SELECT v FROM t").fetchone() == ("app",)
            assert pinned.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            for conn in (other, third):
                assert conn.execute("SELECT v FROM t").fetchone() == ("public",)
                assert conn.execute("SHOW TimeZone").fetchone() == (default_zone,)
        sessions = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in (pinned, other, third)}
        assert len(sessions) == 2, "the pinned connection has one session, the others share the second"
    with connect(pgwarden_url) as first, connect(pgwarden_url) as second:
        for conn in (first, second):
            assert conn.execute("SELECT v FROM t").fetchone() == ("public",)
            assert conn.execute("SHOW TimeZone").fetchone() == (default_zone,)
