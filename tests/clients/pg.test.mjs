// node-postgres (pg.Client and pg.Pool), unchanged, through pgwarden's wire
// port, with a single server session behind it, so that every client here
// takes turns on that one session. Run by tests/wire_node_clients.rs, which
// starts PostgreSQL and pgwarden and passes PGWARDEN_WIRE_URL (pgwarden)
// and PGWARDEN_DIRECT_URL (the same PostgreSQL, without pgwarden).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { from as copyFrom, to as copyTo } from 'pg-copy-streams';

const wire = process.env.PGWARDEN_WIRE_URL;
const direct = process.env.PGWARDEN_DIRECT_URL;
const opened = [];

async function connect(url, options = {}) {
  const client = new pg.Client({ connectionString: url, ...options });
  await client.connect();
  opened.push(client);
  return client;
}

// Whether `promise` is still pending after `ms`: a client waiting for the
// server session another client holds.
async function stillWaiting(promise, ms = 300) {
  const pending = Symbol('pending');
  return (await Promise.race([promise, sleep(ms, pending)])) === pending;
}

let admin;
before(async () => {
  admin = await connect(direct);
  await admin.query(`
    CREATE TABLE pg_types (id int PRIMARY KEY, big bigint, amount numeric, note text, data bytea,
      flag bool, at timestamptz, doc json, docb jsonb, ints int[], notes text[]);
    CREATE TABLE pg_tx (id int PRIMARY KEY, note text);
    CREATE TABLE pg_copy (id int PRIMARY KEY, name text);
    CREATE SCHEMA elsewhere;
    CREATE TABLE public.marker AS SELECT 'public' AS v;
    CREATE TABLE elsewhere.marker AS SELECT 'elsewhere' AS v;`);
});

after(async () => {
  await Promise.all(opened.map((client) => client.end().catch(() => {})));
});

const typed = {
  text: `SELECT $1::int AS int, $2::bigint AS bigint, $3::numeric AS numeric, $4::text AS text,
    $5::bytea AS bytea, $6::bool AS bool, $7::timestamptz AS at, $8::json AS json, $9::jsonb AS jsonb,
    $10::int[] AS ints, $11::text[] AS texts, $12::text AS nothing, $13::float8 AS float,
    $14::date AS day, $15::uuid AS uuid, $16::interval AS span, $17::bigint[] AS bigs`,
  values: [
    -2147483648,
    '9223372036854775807',
    '-12345678901234567890.000000000000000001',
    'héllo wörld ✓ 日本語 🐘 "quoted" \\ back\nslash',
    Buffer.from([0, 1, 2, 0x7f, 0x80, 0xfe, 0xff]),
    false,
    new Date('2024-02-29T12:34:56.789Z'),
    { a: [1, 'x', null], 'ü': { deep: true } },
    { b: 1.5, list: ['é', '{', '"'] },
    [1, null, -3],
    ['a,b', 'c"d', null, '', 'NULL', 'é'],
    null,
    1.5e-7,
    '2024-02-29',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '1 day 02:03:04.5',
    ['-9223372036854775808', '0'],
  ],
};

test('parameters of many types come back as they do from PostgreSQL itself', async () => {
  const viaWire = await connect(wire);
  const fromWire = await viaWire.query(typed);
  const fromServer = await admin.query(typed);
  assert.deepEqual(fromWire.rows, fromServer.rows);
  assert.deepEqual(
    fromWire.fields.map((f) => [f.name, f.dataTypeID]),
    fromServer.fields.map((f) => [f.name, f.dataTypeID]),
  );
  const [row] = fromWire.rows;
  assert.equal(row.text, typed.values[3]);
  assert.deepEqual(row.bytea, typed.values[4]);
  assert.equal(row.bigint, '9223372036854775807');
  assert.equal(row.at.toISOString(), '2024-02-29T12:34:56.789Z');
  assert.deepEqual(row.texts, typed.values[10]);
  assert.equal(row.nothing, null);

  const arrays = await viaWire.query({ ...typed, rowMode: 'array' });
  assert.deepEqual(arrays.rows, [Object.values(fromServer.rows[0])]);
});

test('values written through pgwarden are stored as written', async () => {
  const viaWire = await connect(wire);
  const [, big, amount, note, data, flag, at, doc, docb, ints, notes] = typed.values;
  const insert = `INSERT INTO pg_types VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    RETURNING *`;
  const written = await viaWire.query(insert, [1, big, amount, note, data, flag, at, doc, docb, ints, notes]);
  await viaWire.query(insert, [2, null, null, null, null, null, null, null, null, null, null]);
  const stored = await admin.query('SELECT * FROM pg_types ORDER BY id');
  const read = await viaWire.query('SELECT * FROM pg_types ORDER BY id');
  assert.deepEqual(read.rows, stored.rows);
  assert.deepEqual(written.rows[0], stored.rows[0]);
  assert.equal(stored.rows[0].note, note);
  assert.deepEqual(stored.rows[0].docb, docb);
  assert.deepEqual(stored.rows[1], {
    id: 2, big: null, amount: null, note: null, data: null, flag: null, at: null,
    doc: null, docb: null, ints: null, notes: null,
  });
});

test('named queries of two clients alternate on one server session', async () => {
  const [a, b] = [await connect(wire), await connect(wire)];
  const pids = new Set();
  for (let round = 0; round < 5; round++) {
    // The same name in both clients: two different statements.
    const fromA = await a.query({
      name: 'calc',
      text: 'SELECT $1::int + 1 AS n, pg_backend_pid() AS pid',
      values: [round],
    });
    const fromB = await b.query({
      name: 'calc',
      text: "SELECT $1::text || ' from b' AS n, pg_backend_pid() AS pid",
      values: [String(round)],
    });
    assert.equal(fromA.rows[0].n, round + 1);
    assert.equal(fromB.rows[0].n, `${round} from b`);
    pids.add(fromA.rows[0].pid).add(fromB.rows[0].pid);
  }
  const together = await Promise.all(
    Array.from({ length: 10 }, (_, i) =>
      (i % 2 ? a : b).query({
        name: i % 2 ? 'calc' : 'shared',
        text: i % 2 ? 'SELECT $1::int + 1 AS n, pg_backend_pid() AS pid' : 'SELECT $1::int * 10 AS n, pg_backend_pid() AS pid',
        values: [i],
      }),
    ),
  );
  together.forEach((result, i) => {
    assert.equal(result.rows[0].n, i % 2 ? i + 1 : i * 10);
    pids.add(result.rows[0].pid);
  });
  assert.equal(pids.size, 1, `one server session serves both clients: ${[...pids]}`);
});

test('a pg.Pool of more connections than server sessions answers every query', async () => {
  const pool = new pg.Pool({ connectionString: wire, max: 4 });
  try {
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        pool.query('SELECT $1::int * 2 AS n, pg_backend_pid() AS pid', [i]),
      ),
    );
    results.forEach((result, i) => assert.equal(result.rows[0].n, i * 2));
    assert.equal(new Set(results.map((r) => r.rows[0].pid)).size, 1);
    assert.ok(pool.totalCount > 1, `the pool opened ${pool.totalCount} connections`);
  } finally {
    await pool.end();
  }
});

test('a pipelining client gets every answer, an error in the middle its own', async () => {
  const client = await connect(wire, { pipeline: true });
  const other = await connect(wire);
  const queries = Array.from({ length: 30 }, (_, i) =>
    i === 15
      ? client.query('SELECT 1 / $1::int AS n', [0])
      : client.query({ name: i % 2 ? 'piped' : undefined, text: 'SELECT $1::int AS n', values: [i] }),
  );
  const interleaved = other.query('SELECT $1::text AS t', ['between']);
  const settled = await Promise.allSettled(queries);
  settled.forEach((outcome, i) => {
    if (i === 15) {
      assert.equal(outcome.status, 'rejected');
      assert.equal(outcome.reason.code, '22012');
    } else {
      assert.equal(outcome.status, 'fulfilled', String(outcome.reason));
      assert.equal(outcome.value.rows[0].n, i);
    }
  });
  assert.deepEqual((await interleaved).rows, [{ t: 'between' }]);
});

test('BEGIN…COMMIT keeps the session; the other client waits; ROLLBACK leaves nothing', async () => {
  const pool = new pg.Pool({ connectionString: wire, max: 2 });
  const other = await connect(wire);
  try {
    const client = await pool.connect();
    await client.query('BEGIN');
    await client.query('INSERT INTO pg_tx VALUES (1, $1)', ['committed']);
    const waiting = other.query('SELECT count(*)::int AS n FROM pg_tx');
    assert.ok(await stillWaiting(waiting), 'the session was lent inside a transaction');
    await client.query('COMMIT');
    assert.equal((await waiting).rows[0].n, 1);

    await client.query('BEGIN');
    await client.query('INSERT INTO pg_tx VALUES (2, $1)', ['rolled back']);
    assert.equal((await client.query('SELECT count(*)::int AS n FROM pg_tx')).rows[0].n, 2);
    await client.query('ROLLBACK');
    client.release();
    const stored = await admin.query('SELECT id, note FROM pg_tx ORDER BY id');
    assert.deepEqual(stored.rows, [{ id: 1, note: 'committed' }]);
    assert.equal((await pool.query('SELECT count(*)::int AS n FROM pg_tx')).rows[0].n, 1);
  } finally {
    await pool.end();
  }
});

test('an error inside a transaction, then ROLLBACK: the client and the session go on', async () => {
  const [client, other] = [await connect(wire), await connect(wire)];
  await client.query('BEGIN');
  await client.query('INSERT INTO pg_tx VALUES (3, $1)', ['lost']);
  await assert.rejects(client.query('SELECT 1 / $1::int', [0]), { code: '22012' });
  await assert.rejects(client.query('SELECT 1'), { code: '25P02' });
  await assert.rejects(
    client.query({ name: 'aborted', text: 'SELECT $1::int', values: [1] }),
    { code: '25P02' },
  );
  await client.query('ROLLBACK');
  assert.deepEqual((await client.query({ name: 'aborted', text: 'SELECT $1::int AS n', values: [7] })).rows, [{ n: 7 }]);
  assert.deepEqual((await other.query('SELECT count(*)::int AS n FROM pg_tx WHERE id = 3')).rows, [{ n: 0 }]);
  await assert.rejects(client.query('SELECT * FROM no_such_table'), { code: '42P01' });
  assert.deepEqual((await client.query('SELECT 2 AS n')).rows, [{ n: 2 }]);
});

test("one client's SET, search_path and TimeZone never reach another", async () => {
  const [setter, other] = [await connect(wire), await connect(wire)];
  const show = "SELECT v, current_setting('TimeZone') AS tz, current_setting('statement_timeout') AS st, pg_backend_pid() AS pid FROM marker";
  const defaults = (await other.query(show)).rows[0];
  assert.equal(defaults.v, 'public');

  // SET LOCAL ends with its transaction and does not hold the session.
  await setter.query('BEGIN');
  await setter.query("SET LOCAL TimeZone = 'Pacific/Chatham'");
  await setter.query('COMMIT');
  assert.deepEqual((await other.query(show)).rows[0], defaults);

  // A session-level SET keeps the setter's session until it leaves.
  await setter.query('SET search_path = elsewhere, public');
  await setter.query("SET TimeZone = 'Asia/Kathmandu'");
  await setter.query("SET statement_timeout = '1234s'");
  const mine = (await setter.query(show)).rows[0];
  assert.deepEqual(
    { v: mine.v, tz: mine.tz, st: mine.st },
    { v: 'elsewhere', tz: 'Asia/Kathmandu', st: '1234s' },
  );
  const waiting = other.query(show);
  assert.ok(await stillWaiting(waiting), "the setter's session was lent with its settings");
  await setter.end();
  const reset = (await waiting).rows[0];
  assert.deepEqual(reset, defaults);
  assert.equal(reset.pid, mine.pid, "the other client got the setter's session, reset");
});

test("each client's startup settings hold on the session they share", async () => {
  const alpha = await connect(wire, { application_name: 'alpha', options: '-c TimeZone=Asia/Tokyo' });
  const beta = await connect(wire, { application_name: 'beta', options: '-c search_path=elsewhere,public' });
  const show = "SELECT current_setting('application_name') AS app, current_setting('TimeZone') AS tz, (SELECT v FROM marker) AS v";
  for (let round = 0; round < 3; round++) {
    const [a, b] = await Promise.all([alpha.query(show), beta.query(show)]);
    assert.equal(a.rows[0].app, 'alpha');
    assert.equal(a.rows[0].tz, 'Asia/Tokyo');
    assert.equal(a.rows[0].v, 'public');
    assert.equal(b.rows[0].app, 'beta');
    assert.notEqual(b.rows[0].tz, 'Asia/Tokyo');
    assert.equal(b.rows[0].v, 'elsewhere');
  }
});

test('COPY FROM STDIN and COPY TO STDOUT stream through (pg-copy-streams)', async () => {
  const client = await connect(wire);
  const rows = Array.from({ length: 1000 }, (_, i) => `${i}\tname ${i} é\n`);
  await pipeline(Readable.from(rows), client.query(copyFrom('COPY pg_copy FROM STDIN')));
  const stored = await admin.query('SELECT count(*)::int AS n, max(name) AS last FROM pg_copy');
  assert.deepEqual(stored.rows, [{ n: 1000, last: 'name 999 é' }]);

  const chunks = [];
  for await (const chunk of client.query(copyTo('COPY (SELECT * FROM pg_copy ORDER BY id) TO STDOUT'))) {
    chunks.push(chunk);
  }
  assert.equal(Buffer.concat(chunks).toString(), rows.join(''));
  assert.deepEqual((await client.query('SELECT 1 AS one')).rows, [{ one: 1 }]);
});
