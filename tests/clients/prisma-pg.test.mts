// Prisma ORM 7 with its node-postgres adapter (@prisma/adapter-pg),
// unchanged, through pgwarden's wire port, with a single server session
// behind it. Unlike the HTTP adapter (prisma.test.mts), it has sessions:
// interactive transactions, nested writes and upserts run as Prisma runs
// them against PostgreSQL. Run by tests/wire_node_clients.rs (through tsx,
// since the generated client is TypeScript), which starts PostgreSQL and
// pgwarden, generates the client and passes PGWARDEN_WIRE_URL.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { PrismaPg } from '@prisma/adapter-pg';
import { Prisma, PrismaClient } from './prisma/generated/client.ts';

const prisma = new PrismaClient({
  adapter: new PrismaPg({ connectionString: process.env.PGWARDEN_WIRE_URL! }),
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

after(async () => {
  await prisma.$disconnect();
});

test('an interactive transaction commits, and rolls back when it throws', async () => {
  const pen = await prisma.$transaction(async (tx) => {
    const ada = await tx.customer.create({ data: { name: 'ada' } });
    return tx.order.create({
      data: { customerId: ada.id, item: 'pen', quantity: 3, price: '1.50', tags: ['blue'] },
    });
  });
  assert.equal(pen.item, 'pen');

  await assert.rejects(
    prisma.$transaction(async (tx) => {
      const ghost = await tx.customer.create({ data: { name: 'ghost' } });
      assert.equal(await tx.customer.count({ where: { id: ghost.id } }), 1);
      throw new Error('changed my mind');
    }),
    /changed my mind/,
  );
  assert.equal(await prisma.customer.count({ where: { name: 'ghost' } }), 0);

  // Two at once take turns on the one server session.
  const [one, two] = await Promise.all(
    ['one', 'two'].map((name) =>
      prisma.$transaction(async (tx) => {
        const customer = await tx.customer.create({ data: { name } });
        return tx.customer.findUniqueOrThrow({ where: { id: customer.id } });
      }),
    ),
  );
  assert.deepEqual([one.name, two.name], ['one', 'two']);
});

test('a nested write creates a customer with its orders in one transaction', async () => {
  const placedAt = new Date('2024-02-29T12:34:56.789Z');
  // Both orders name the same fields: Prisma 7 writes them as one INSERT,
  // where a field one of them leaves out is NULL rather than the column's
  // default (against PostgreSQL itself as well).
  const grace = await prisma.customer.create({
    data: {
      name: 'grace',
      orders: {
        create: [
          { item: 'tape', quantity: 2, price: '3.10', tags: ['a "b"', 'é'], details: { gift: true }, placedAt },
          { item: 'glue', quantity: 5, price: '0.99', tags: [], details: Prisma.DbNull, placedAt },
        ],
      },
    },
    include: { orders: { orderBy: { item: 'asc' } } },
  });
  const [glue, tape] = grace.orders;
  assert.equal(glue.placedAt.toISOString(), placedAt.toISOString());
  assert.ok(glue.price instanceof Prisma.Decimal);
  assert.equal(glue.price.toString(), '0.99');
  assert.deepEqual(tape.tags, ['a "b"', 'é']);
  assert.deepEqual(tape.details, { gift: true });

  // A nested write that fails half-way leaves nothing behind.
  await assert.rejects(
    prisma.customer.create({
      data: { name: 'half', orders: { create: [{ item: 'x', quantity: 1, price: '123456789.00' }] } },
    }),
  );
  assert.equal(await prisma.customer.count({ where: { name: 'half' } }), 0);
});

test('an upsert creates, then updates', async () => {
  const upsert = (quantity: number) =>
    prisma.customer.upsert({
      where: { name: 'linus' },
      create: { name: 'linus', orders: { create: { item: 'kernel', quantity, price: '0' } } },
      update: { orders: { updateMany: { where: { item: 'kernel' }, data: { quantity } } } },
      include: { orders: true },
    });
  const created = await upsert(1);
  const updated = await upsert(7);
  assert.equal(updated.id, created.id);
  assert.deepEqual(updated.orders.map((o) => o.quantity), [7]);
  assert.equal(await prisma.customer.count({ where: { name: 'linus' } }), 1);
});

test('a unique violation is P2002 and a missing reference P2003', async () => {
  await assert.rejects(prisma.customer.create({ data: { name: 'ada' } }), (error) => {
    assert.ok(error instanceof Prisma.PrismaClientKnownRequestError, String(error));
    assert.equal(error.code, 'P2002');
    return true;
  });
  await assert.rejects(
    prisma.order.create({ data: { customerId: 999999, item: 'ghost', quantity: 1, price: '1' } }),
    (error) => {
      assert.ok(error instanceof Prisma.PrismaClientKnownRequestError, String(error));
      assert.equal(error.code, 'P2003');
      return true;
    },
  );
  // The session goes on after both.
  assert.equal(await prisma.customer.count(), 5);
});
