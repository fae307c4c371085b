"""A psycopg and an asyncpg connection to pgwarden that live as long as this
process, driven line by line from standard input, so that a test can
restart the database under them and then use them again.

Connects both clients to PGWARDEN_URL (psycopg in autocommit with
prepare_threshold=0, so every statement is prepared by name; asyncpg
prepares by name anyway), prints `ready`, then answers each line:

- `round`: each client runs its named statements once and reads back
  the row the last round wrote; prints
  `ok psycopg_backend=PID asyncpg_backend=PID prepared=N`, where N is how
  many copies of the shared statement text the server session holds, or
  `error CLIENT: EXCEPTION` on the first failure;
- `quit` (or the end of input): closes both and exits 0.
"""

import asyncio
import os
import sys

import asyncpg
import psycopg

SHARED = "SELECT n FROM restart_probe WHERE id = $1"
PSYCOPG_SHARED = "SELECT n FROM restart_probe WHERE id = %s"


class Clients:
    def __init__(self, url):
        self.loop = asyncio.new_event_loop()
        self.psycopg = psycopg.connect(url, autocommit=True, prepare_threshold=0)
        self.asyncpg = self.loop.run_until_complete(asyncpg.connect(url))
        self.round = 0

    def psycopg_round(self):
        conn = self.psycopg
        conn.execute("UPDATE restart_probe SET n = %s WHERE id = %s", [self.round, 1])
        (n,) = conn.execute(PSYCOPG_SHARED, [1]).fetchone()
        assert n == self.round, f"psycopg read {n}, wrote {self.round}"
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        return backend

    async def asyncpg_round(self):
        conn = self.asyncpg
        await conn.execute("UPDATE restart_probe SET n = $1 WHERE id = $2", self.round, 2)
        n = await conn.fetchval(SHARED, 2)
        assert n == self.round, f"asyncpg read {n}, wrote {self.round}"
        prepared = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE statement = $1", SHARED)
        return await conn.fetchval("SELECT pg_backend_pid()"), prepared

    def run_round(self):
        self.round += 1
        try:
            psycopg_backend = self.psycopg_round()
        except Exception as error:  # noqa: BLE001 -- reported to the driving test
            return f"error psycopg: {error!r}"
        try:
            asyncpg_backend, prepared = self.loop.run_until_complete(self.asyncpg_round())
        except Exception as error:  # noqa: BLE001 -- reported to the driving test
            return f"error asyncpg: {error!r}"
        return f"ok psycopg_backend={psycopg_backend} asyncpg_backend={asyncpg_backend} prepared={prepared}"

    def close(self):
        self.psycopg.close()
        self.loop.run_until_complete(self.asyncpg.close())
        self.loop.close()


def main():
    clients = Clients(os.environ["PGWARDEN_URL"])
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "round":
            print(clients.run_round(), flush=True)
        elif command == "quit":
            break
        else:
            print(f"error driver: unknown command {command!r}", flush=True)
    clients.close()


if __name__ == "__main__":
    main()
