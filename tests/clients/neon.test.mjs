// The Neon serverless driver, unchanged, against pgwarden's /sql.
// Run by tests/neon_client.rs, which starts PostgreSQL and pgwarden and
// passes PGWARDEN_FETCH_ENDPOINT and PGWARDEN_CONNECTION_STRING.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { neon, neonConfig, NeonDbError } from '@neondatabase/serverless';

neonConfig.fetchEndpoint = process.env.PGWARDEN_FETCH_ENDPOINT;
const connectionString = process.env.PGWARDEN_CONNECTION_STRING;
const sql = neon(connectionString);

test('tagged templates carry parameters of every JS kind', async () => {
  const when = new Date('2024-02-29T12:34:56.789Z');
  const bytes = Buffer.from([0xde, 0xad, 0xbe, 0xef]);
  const [row] = await sql`
    SELECT ${42}::int AS n, ${1.5}::float8 AS f, ${'héllo ✓'}::text AS s, ${null}::text AS z,
           ${true}::bool AS b, ${when}::timestamptz AS d, ${bytes}::bytea AS y,
           ${[1, 2, 3]}::int[] AS a, ${['x', 'y z']}::text[] AS t, ${{ k: 'v', n: [1] }}::jsonb AS j`;
  assert.equal(row.n, 42);
  assert.equal(row.f, 1.5);
  assert.equal(row.s, 'héllo ✓');
  assert.equal(row.z, null);
  assert.equal(row.b, true);
  assert.equal(row.d.toISOString(), when.toISOString());
  assert.deepEqual([...row.y], [0xde, 0xad, 0xbe, 0xef]);
  assert.deepEqual(row.a, [1, 2, 3]);
  assert.deepEqual(row.t, ['x', 'y z']);
  assert.deepEqual(row.j, { k: 'v', n: [1] });
});

test('fullResults and arrayMode', async () => {
  const full = neon(connectionString, { fullResults: true });
  const result = await full`SELECT 1 AS one, 'two' AS two`;
  assert.equal(result.command, 'SELECT');
  assert.equal(result.rowCount, 1);
  assert.deepEqual(result.fields.map((f) => f.name), ['one', 'two']);
  assert.equal(result.fields[0].dataTypeID, 23);
  assert.deepEqual(result.rows, [{ one: 1, two: 'two' }]);

  const arrays = neon(connectionString, { arrayMode: true });
  assert.deepEqual(await arrays`SELECT 1, 'two'`, [[1, 'two']]);
});

test('sql.query with a parameter list', async () => {
  const rows = await sql.query('SELECT $1::int + $2::int AS sum', [40, 2]);
  assert.deepEqual(rows, [{ sum: 42 }]);
});

test('transactions with options run as one transaction', async () => {
  const [setting, sum] = await sql.transaction(
    (txn) => [
      txn`SELECT current_setting('transaction_isolation') AS level, current_setting('transaction_read_only') AS ro`,
      txn`SELECT ${2}::int + ${3}::int AS sum`,
    ],
    { isolationLevel: 'Serializable', readOnly: true },
  );
  assert.deepEqual(setting, [{ level: 'serializable', ro: 'on' }]);
  assert.deepEqual(sum, [{ sum: 5 }]);

  await sql`CREATE TABLE IF NOT EXISTS client_ledger (n int PRIMARY KEY)`;
  await assert.rejects(
    sql.transaction([sql`INSERT INTO client_ledger VALUES (1)`, sql`INSERT INTO client_ledger VALUES (1)`]),
    (error) => error instanceof NeonDbError && error.code === '23505',
  );
  const [{ count }] = await sql`SELECT count(*)::int AS count FROM client_ledger`;
  assert.equal(count, 0, 'the failed transaction left nothing behind');
});

test('an SQL error surfaces as NeonDbError with code and position', async () => {
  await assert.rejects(sql`SELECT 1 FROM WHERE`, (error) => {
    assert.ok(error instanceof NeonDbError, `not a NeonDbError: ${error}`);
    assert.equal(error.code, '42601');
    assert.equal(error.position, '15');
    assert.equal(error.severity, 'ERROR');
    return true;
  });
});
