"""What every Python client test needs: where pgwarden and the database are.

tests/wire_python_clients.rs starts a private PostgreSQL and a pgwarden in
front of it, and passes:

- PGWARDEN_URL: pgwarden's wire port;
- PGWARDEN_SERVER_SESSIONS: the size of pgwarden's pool of server sessions;
- DIRECT_URL: the same database without pgwarden, to compare results with
  and to look at the server's sessions from outside.

Each test module names the pool size it is written for (SERVER_SESSIONS);
run against another one, its tests fail at once rather than prove nothing.
"""

import os

import pytest


def _required(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through `cargo test --test wire_python_clients`")
    return value


@pytest.fixture
def pgwarden_url(request):
    expected = getattr(request.module, "SERVER_SESSIONS", None)
    actual = int(_required("PGWARDEN_SERVER_SESSIONS"))
    assert actual == expected, f"{request.module.__name__} needs {expected} server sessions, pgwarden has {actual}"
    return _required("PGWARDEN_URL")


@pytest.fixture
def direct_url():
    return _required("DIRECT_URL")
