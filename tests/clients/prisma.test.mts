// Prisma ORM with its Neon HTTP adapter (@prisma/adapter-neon), unchanged,
// against pgwarden's /sql. Run by tests/neon_client.rs (through tsx, since
// the generated client is TypeScript), which starts PostgreSQL and pgwarden,
// generates the client and passes PGWARDEN_FETCH_ENDPOINT and
// PGWARDEN_CONNECTION_STRING.
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { neonConfig } from '@neondatabase/serverless';
import { PrismaNeonHttp } from '@prisma/adapter-neon';
import { Prisma, PrismaClient } from './prisma/generated/client.ts';

neonConfig.fetchEndpoint = process.env.PGWARDEN_FETCH_ENDPOINT;
const prisma = new PrismaClient({
  adapter: new PrismaNeonHttp(process.env.PGWARDEN_CONNECTION_STRING!, {}),
});

before(async () => {
  await prisma.$executeRawUnsafe('DROP TABLE IF EXISTS prisma_order, prisma_customer');
  await prisma.$executeRawUnsafe(
    'CREATE TABLE prisma_customer (id serial PRIMARY KEY, name text NOT NULL UNIQUE)',
  );
  await prisma.$executeRawUnsafe(`CREATE TABLE prisma_order (
    id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES prisma_customer (id),
    item text NOT NULL,
    quantity int NOT NULL,
    price numeric(10, 2) NOT NULL,
    tags text[] NOT NULL DEFAULT '{}',
    details jsonb,
    placed_at timestamptz(3) NOT NULL DEFAULT now())`);
});

// Writes that Prisma runs as a transaction (nested writes, upserts) need
// a session, which the HTTP adapter does not have, against Neon as here;
// every write below is a single statement.
test('create, read back every type, filter and include relations', async () => {
  const placedAt = new Date('2024-02-29T12:34:56.789Z');
  const ada = await prisma.customer.create({ data: { name: 'ada' } });
  const pen = await prisma.order.create({
    data: { customerId: ada.id, item: 'pen', quantity: 3, price: '1.50', tags: ['blue', 'a "b"'], details: { gift: true } },
  });
  assert.deepEqual(pen.tags, ['blue', 'a "b"']);
  assert.deepEqual(pen.details, { gift: true });
  await prisma.order.create({
    data: { customerId: ada.id, item: 'ink', quantity: 1, price: '12.00', placedAt },
  });

  const found = await prisma.customer.findUnique({
    where: { name: 'ada' },
    include: { orders: { orderBy: { item: 'asc' } } },
  });
  const [ink, again] = found!.orders;
  assert.ok(ink.price instanceof Prisma.Decimal);
  assert.equal(ink.price.toString(), '12');
  assert.equal(ink.placedAt.toISOString(), placedAt.toISOString());
  assert.equal(again.id, pen.id);

  const big = await prisma.order.findMany({
    where: { quantity: { gt: 2 }, customer: { name: 'ada' } },
    select: { item: true, customer: { select: { name: true } } },
  });
  assert.deepEqual(big, [{ item: 'pen', customer: { name: 'ada' } }]);
});

test('update, aggregate and delete', async () => {
  const grace = await prisma.customer.create({ data: { name: 'grace' } });
  const created = await prisma.order.createMany({
    data: [
      { customerId: grace.id, item: 'tape', quantity: 2, price: '3.10' },
      { customerId: grace.id, item: 'glue', quantity: 5, price: '0.99' },
    ],
  });
  assert.equal(created.count, 2);
  const updated = await prisma.order.updateMany({
    where: { customerId: grace.id },
    data: { quantity: { increment: 1 } },
  });
  assert.equal(updated.count, 2);
  const totals = await prisma.order.aggregate({
    where: { customerId: grace.id },
    _sum: { quantity: true },
    _count: true,
  });
  assert.equal(totals._sum.quantity, 9);
  assert.equal(totals._count, 2);
  const deleted = await prisma.order.deleteMany({ where: { item: 'glue' } });
  assert.equal(deleted.count, 1);
});

test('raw queries carry their parameters', async () => {
  const rows = await prisma.$queryRaw<{ sum: number }[]>`SELECT ${40}::int + ${2}::int AS sum`;
  assert.deepEqual(rows, [{ sum: 42 }]);
});

// The HTTP adapter passes the driver's error on without mapping it to a
// Prisma code (its WebSocket adapter would say P2002 and P2003), so Prisma
// reports the SQLSTATE itself: what matters is that it arrives intact.
test('database errors reach Prisma with their SQLSTATE', async () => {
  await assert.rejects(prisma.customer.create({ data: { name: 'ada' } }), (error) => {
    assert.ok(error instanceof Prisma.PrismaClientKnownRequestError, String(error));
    assert.equal(error.code, '23505');
    assert.match(error.message, /prisma_customer_name_key/);
    return true;
  });
  await assert.rejects(
    prisma.order.create({ data: { customerId: 999999, item: 'ghost', quantity: 1, price: '1' } }),
    (error) => {
      assert.ok(error instanceof Prisma.PrismaClientKnownRequestError, String(error));
      assert.equal(error.code, '23503');
      return true;
    },
  );
});
