// LISTEN/NOTIFY with node-postgres through pgwarden's wire port. A client
// that LISTENs keeps its server session (it is pinned), so pgwarden runs two
// here: one for the listener, one that every other client shares. Run by
// tests/wire_node_clients.rs, which passes PGWARDEN_WIRE_URL.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import pg from 'pg';

const wire = process.env.PGWARDEN_WIRE_URL;
const opened = [];

async function connect() {
  const client = new pg.Client({ connectionString: wire });
  await client.connect();
  opened.push(client);
  return client;
}

after(async () => {
  await Promise.all(opened.map((client) => client.end().catch(() => {})));
});

// The next notification `client` receives, within 10 seconds.
async function nextNotification(client) {
  const [notification] = await once(client, 'notification', { signal: AbortSignal.timeout(10_000) });
  return notification;
}

test('a listening client, idle, receives what others notify, at their commit', async () => {
  const [listener, notifier] = [await connect(), await connect()];
  await listener.query('LISTEN pg_events');
  const listenerPid = (await listener.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;

  let arriving = nextNotification(listener);
  await notifier.query("NOTIFY pg_events, 'plain'");
  let notification = await arriving;
  assert.equal(notification.channel, 'pg_events');
  assert.equal(notification.payload, 'plain');
  assert.notEqual(notification.processId, listenerPid);

  arriving = nextNotification(listener);
  await notifier.query('SELECT pg_notify($1, $2)', ['pg_events', 'with parameters é ✓']);
  assert.equal((await arriving).payload, 'with parameters é ✓');

  const received = [];
  listener.on('notification', (n) => received.push(n.payload));
  await notifier.query('BEGIN');
  await notifier.query("NOTIFY pg_events, 'in a transaction'");
  await notifier.query('SELECT pg_sleep(0.5)');
  assert.deepEqual(received, [], 'a notification arrived before its commit');
  arriving = nextNotification(listener);
  await notifier.query('COMMIT');
  assert.equal((await arriving).payload, 'in a transaction');

  // The listener's own queries still run on its session, between notifications.
  assert.equal((await listener.query('SELECT pg_backend_pid() AS pid')).rows[0].pid, listenerPid);
  assert.deepEqual((await listener.query('SELECT pg_listening_channels() AS c')).rows, [{ c: 'pg_events' }]);
  await Promise.all([listener.end(), notifier.end()]);
});

test("a listener's session is reset before its next user", async () => {
  const listener = await connect();
  await listener.query('LISTEN pg_left_behind');
  await listener.end();
  // Two transactions at once hold both server sessions: neither listens.
  const [first, second] = [await connect(), await connect()];
  await first.query('BEGIN');
  await second.query('BEGIN');
  const show = 'SELECT pg_backend_pid() AS pid, array(SELECT pg_listening_channels()) AS channels';
  const [a, b] = [(await first.query(show)).rows[0], (await second.query(show)).rows[0]];
  assert.notEqual(a.pid, b.pid);
  assert.deepEqual([a.channels, b.channels], [[], []]);
  await first.query('COMMIT');
  await second.query('COMMIT');
});
