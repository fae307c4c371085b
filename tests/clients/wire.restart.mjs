// node-postgres and postgres.js clients that live through database restarts
// behind pgwarden. Driven by tests/wire_node_clients.rs one command per line
// on stdin, each answered with one JSON line on stdout:
//   connect  opens the clients and runs the work once
//   run      runs the work again (the Rust side restarts the database between)
//   exit     closes the clients and exits
// Every answer says which steps failed and what the clients noticed of their
// connections: errors, ends, new connections, closes.
import { createInterface } from 'node:readline';
import pg from 'pg';
import postgres from 'postgres';

const wire = process.env.PGWARDEN_WIRE_URL;
const events = { clientErrors: [], clientEnded: 0, poolErrors: [], poolConnections: 0, jsCloses: 0 };
let client;
let pool;
let sql;

async function connect() {
  client = new pg.Client({ connectionString: wire });
  client.on('error', (error) => events.clientErrors.push(String(error)));
  client.on('end', () => events.clientEnded++);
  await client.connect();
  pool = new pg.Pool({ connectionString: wire, max: 2 });
  pool.on('connect', () => events.poolConnections++);
  pool.on('error', (error) => events.poolErrors.push(String(error)));
  sql = postgres(wire, { max: 1, onnotice: () => {}, onclose: () => events.jsCloses++ });
}

// Each step returns what it read; the expected value is beside it.
const steps = {
  pgNamed: [async () => (await client.query({
    name: 'restart_read',
    text: 'SELECT name FROM restart_item WHERE id = $1',
    values: [1],
  })).rows[0].name, 'one'],
  pgUnnamed: [async () => (await client.query('SELECT $1::int + 1 AS n', [1])).rows[0].n, 2],
  // Both of the pool's connections, each with the name prepared.
  poolNamed: [async () => (await Promise.all([41, 42].map(async (n) => (await pool.query({
    name: 'restart_add',
    text: 'SELECT $1::int + 1 AS n',
    values: [n],
  })).rows[0].n))).join(), '42,43'],
  jsPrepared: [async () => (await sql`SELECT name FROM restart_item WHERE id = ${2}`)[0].name, 'two'],
  jsPipelined: [async () => (await Promise.all([1, 2, 3, 4, 5].map(
    async (n) => (await sql`SELECT ${n}::int * 10 AS n`)[0].n,
  ))).join(), '10,20,30,40,50'],
  jsTransaction: [async () => (await sql.begin(async (tx) => {
    await tx`UPDATE restart_item SET uses = uses + 1 WHERE id = 1`;
    return tx`SELECT uses FROM restart_item WHERE id = 1`;
  }))[0].uses > 0, true],
};

async function work() {
  const failed = [];
  const read = {};
  for (const [name, [step, expected]] of Object.entries(steps)) {
    try {
      read[name] = await step();
      if (read[name] !== expected) failed.push(`${name}: read ${read[name]}, expected ${expected}`);
    } catch (error) {
      failed.push(`${name}: ${error.code ?? ''} ${error.message}`);
    }
  }
  return { failed, read, events, pgProcessId: client.processID };
}

const commands = {
  connect: async () => {
    await connect();
    return work();
  },
  run: work,
  exit: async () => {
    await Promise.all([client.end(), pool.end(), sql.end()]);
    return { exited: true };
  },
};

for await (const line of createInterface({ input: process.stdin })) {
  const command = commands[line.trim()];
  const answer = command ? await command() : { unknown: line };
  process.stdout.write(`${JSON.stringify(answer)}\n`);
  if (line.trim() === 'exit') process.exit(0);
}
