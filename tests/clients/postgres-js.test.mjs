// postgres.js, unchanged, through pgwarden's wire port, with a single
// server session behind it. postgres.js prepares every statement under a
// name of its own (prepare: true, its default), pipelines the queries of one
// connection, and describes a statement (Parse, Describe, Flush) before it
// binds values whose types it has to learn. Run by tests/wire_node_clients.rs,
// which passes PGWARDEN_WIRE_URL (pgwarden) and PGWARDEN_DIRECT_URL (the same
// PostgreSQL, without pgwarden).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import postgres from 'postgres';

const closed = [];
// One connection each (max: 1), so concurrent queries share it.
const sql = postgres(process.env.PGWARDEN_WIRE_URL, {
  max: 1,
  onnotice: () => {},
  onclose: (id) => closed.push(id),
});
const other = postgres(process.env.PGWARDEN_WIRE_URL, { max: 1, onnotice: () => {} });
const direct = postgres(process.env.PGWARDEN_DIRECT_URL, { max: 1, onnotice: () => {} });

// A result (postgres.js's Array subclass, or an array of them) as plain arrays.
const plain = (result) => Array.from(result, (x) => (Array.isArray(x) ? Array.from(x) : x));

// Whether `promise` is still pending after `ms`: a client waiting for the
// server session another client holds.
async function stillWaiting(promise, ms = 300) {
  const pending = Symbol('pending');
  return (await Promise.race([promise, sleep(ms, pending)])) === pending;
}

before(async () => {
  await direct`CREATE TABLE js_item (id int PRIMARY KEY, name text NOT NULL UNIQUE, tags text[], doc jsonb)`;
  await direct`CREATE TABLE js_copy (id int, name text)`;
});

after(async () => {
  await Promise.all([sql.end(), other.end(), direct.end()]);
});

const typed = (db) => db`
  SELECT ${42}::int AS int, ${'9223372036854775807'}::bigint AS bigint,
    ${'-1234567890.0000000001'}::numeric AS numeric, ${'héllo ✓ 日本語 🐘 "q" \\'}::text AS text,
    ${Buffer.from([0, 1, 0xfe, 0xff])}::bytea AS bytea, ${true}::bool AS bool,
    ${new Date('2024-02-29T12:34:56.789Z')}::timestamptz AS at,
    ${db.json({ a: [1, 'x', null] })}::jsonb AS doc, ${[1, 2, 3]}::int[] AS ints,
    ${['a,b', 'c"d', '']}::text[] AS texts, ${null}::text AS nothing`;

test('parameters of many types come back as they do from PostgreSQL itself', async () => {
  const [fromWire] = await typed(sql);
  const [fromServer] = await typed(direct);
  assert.deepEqual(fromWire, fromServer);
  assert.equal(fromWire.text, 'héllo ✓ 日本語 🐘 "q" \\');
  assert.deepEqual(fromWire.doc, { a: [1, 'x', null] });
  assert.deepEqual(fromWire.texts, ['a,b', 'c"d', '']);
});

test('concurrent queries pipelined on one connection each get their own answer', async () => {
  const queries = Array.from({ length: 60 }, (_, i) =>
    [
      () => sql`SELECT ${i}::int AS n, pg_backend_pid() AS pid`,
      () => sql`SELECT ${`text ${i}`} AS t, pg_backend_pid() AS pid`,
      () => other`SELECT ${i} * 2 AS n, pg_backend_pid() AS pid`,
    ][i % 3](),
  );
  const results = await Promise.all(queries);
  results.forEach(([row], i) => {
    if (i % 3 === 0) assert.equal(row.n, i);
    if (i % 3 === 1) assert.equal(row.t, `text ${i}`);
    if (i % 3 === 2) assert.equal(Number(row.n), i * 2);
  });
  assert.equal(new Set(results.map(([row]) => row.pid)).size, 1, 'one server session served both');
});

test('an error in the middle of concurrent queries: the others still answer', async () => {
  const settled = await Promise.allSettled([
    sql`SELECT ${1}::int AS n`,
    sql`SELECT 1 / ${0}::int AS n`,
    sql`SELECT ${3}::int AS n`,
    sql`SELECT n FROM no_such_table`,
    sql`SELECT ${5}::int AS n`,
    other`SELECT ${6}::int AS n`,
  ]);
  assert.deepEqual(
    settled.map((s) => (s.status === 'fulfilled' ? s.value[0].n : s.reason.code)),
    [1, '22012', 3, '42P01', 5, 6],
  );
  assert.deepEqual(plain(await sql`SELECT ${7}::int AS n`), [{ n: 7 }]);
});

test('sql.begin commits, rolls back on a throw and on an error, and keeps its savepoints', async () => {
  const inserted = await sql.begin(async (tx) => {
    await tx`INSERT INTO js_item ${tx({ id: 1, name: 'pen', tags: ['blue'], doc: tx.json({ n: 1 }) })}`;
    const waiting = other`SELECT count(*)::int AS n FROM js_item`;
    assert.ok(await stillWaiting(waiting), 'the session was lent inside a transaction');
    await tx.savepoint(async (inner) => {
      await inner`INSERT INTO js_item (id, name) VALUES (2, 'ink')`;
    });
    await assert.rejects(
      tx.savepoint((inner) => inner`INSERT INTO js_item (id, name) VALUES (3, 'pen')`),
      { code: '23505' },
    );
    return [await tx`SELECT id FROM js_item ORDER BY id`, waiting];
  });
  assert.deepEqual(plain(inserted[0]), [{ id: 1 }, { id: 2 }]);
  assert.deepEqual(plain(await inserted[1]), [{ n: 2 }], 'the waiting client ran after the commit');

  await assert.rejects(
    sql.begin(async (tx) => {
      await tx`INSERT INTO js_item (id, name) VALUES (4, 'tape')`;
      throw new Error('changed my mind');
    }),
    /changed my mind/,
  );
  await assert.rejects(
    sql.begin(async (tx) => {
      await tx`INSERT INTO js_item (id, name) VALUES (5, 'glue')`;
      await tx`INSERT INTO js_item (id, name) VALUES (6, 'glue')`;
    }),
    { code: '23505' },
  );
  assert.deepEqual(plain(await direct`SELECT id, name, tags, doc FROM js_item ORDER BY id`), [
    { id: 1, name: 'pen', tags: ['blue'], doc: { n: 1 } },
    { id: 2, name: 'ink', tags: null, doc: null },
  ]);
});

test('a cancelled query fails with 57014 and its connection goes on', async () => {
  const started = Date.now();
  const sleeping = sql`SELECT pg_sleep(10)`;
  const waiting = other`SELECT ${'after the cancel'} AS t`;
  await sleep(500);
  sleeping.cancel();
  await assert.rejects(sleeping, { code: '57014' });
  assert.ok(Date.now() - started < 8000, `the cancel took ${Date.now() - started} ms`);
  assert.deepEqual(plain(await waiting), [{ t: 'after the cancel' }]);
  assert.deepEqual(plain(await sql`SELECT ${1}::int AS n`), [{ n: 1 }]);
  assert.deepEqual(closed, [], 'the connection was closed');
});

test('a cursor reads in batches across round trips (Execute with a row limit, Flush)', async () => {
  const batches = [];
  for await (const rows of sql`SELECT n FROM generate_series(1, 95) n`.cursor(10)) {
    batches.push(rows.map((row) => row.n));
  }
  assert.equal(batches.length, 10);
  assert.deepEqual(batches.flat(), Array.from({ length: 95 }, (_, i) => i + 1));
  assert.deepEqual(plain(await other`SELECT ${2}::int AS n`), [{ n: 2 }]);
});

test('COPY in through .writable() and out through .readable()', async () => {
  const rows = Array.from({ length: 500 }, (_, i) => `${i}\tname ${i} é\n`);
  await pipeline(Readable.from(rows), await sql`COPY js_copy FROM STDIN`.writable());
  assert.deepEqual(plain(await direct`SELECT count(*)::int AS n FROM js_copy`), [{ n: 500 }]);
  const chunks = [];
  for await (const chunk of await other`COPY (SELECT * FROM js_copy ORDER BY id) TO STDOUT`.readable()) {
    chunks.push(chunk);
  }
  assert.equal(Buffer.concat(chunks).toString(), rows.join(''));
  assert.deepEqual(plain(await sql`SELECT ${3}::int AS n`), [{ n: 3 }]);
});

test('statements prepared again and again, and unsafe ones, by two clients', async () => {
  for (let round = 0; round < 5; round++) {
    const [a, b] = await Promise.all([
      sql`SELECT name FROM js_item WHERE id = ${1}`,
      other.unsafe('SELECT name FROM js_item WHERE id = $1', [2], { prepare: true }),
    ]);
    assert.deepEqual([plain(a), plain(b)], [[{ name: 'pen' }], [{ name: 'ink' }]]);
  }
  assert.deepEqual(plain(await sql.unsafe('SELECT 1 AS one; SELECT 2 AS two')), [[{ one: 1 }], [{ two: 2 }]]);
});
