// Drizzle ORM's neon-http driver, unchanged, over the Neon driver against
// pgwarden's /sql. Run by tests/neon_client.rs, which starts PostgreSQL and
// pgwarden and passes PGWARDEN_FETCH_ENDPOINT and PGWARDEN_CONNECTION_STRING.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { neon, neonConfig } from '@neondatabase/serverless';
import { drizzle } from 'drizzle-orm/neon-http';
import { and, asc, eq, gt, relations, sql } from 'drizzle-orm';
import { integer, jsonb, numeric, pgTable, serial, text, timestamp } from 'drizzle-orm/pg-core';

neonConfig.fetchEndpoint = process.env.PGWARDEN_FETCH_ENDPOINT;

const customer = pgTable('drizzle_customer', {
  id: serial('id').primaryKey(),
  name: text('name').notNull().unique(),
});

const order = pgTable('drizzle_order', {
  id: serial('id').primaryKey(),
  customerId: integer('customer_id').notNull().references(() => customer.id),
  item: text('item').notNull(),
  quantity: integer('quantity').notNull(),
  price: numeric('price', { precision: 10, scale: 2 }).notNull(),
  tags: text('tags').array().notNull().default(sql`'{}'`),
  details: jsonb('details'),
  placedAt: timestamp('placed_at', { withTimezone: true }).notNull().defaultNow(),
});

const customerRelations = relations(customer, ({ many }) => ({ orders: many(order) }));
const orderRelations = relations(order, ({ one }) => ({
  customer: one(customer, { fields: [order.customerId], references: [customer.id] }),
}));

const db = drizzle({
  client: neon(process.env.PGWARDEN_CONNECTION_STRING),
  schema: { customer, order, customerRelations, orderRelations },
});

/// The original database error under Drizzle's wrapper.
function databaseError(error) {
  return error.cause ?? error;
}

before(async () => {
  await db.execute(sql`DROP TABLE IF EXISTS drizzle_order, drizzle_customer`);
  await db.execute(sql`CREATE TABLE drizzle_customer (id serial PRIMARY KEY, name text NOT NULL UNIQUE)`);
  await db.execute(sql`CREATE TABLE drizzle_order (
    id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES drizzle_customer (id),
    item text NOT NULL,
    quantity int NOT NULL,
    price numeric(10, 2) NOT NULL,
    tags text[] NOT NULL DEFAULT '{}',
    details jsonb,
    placed_at timestamptz NOT NULL DEFAULT now())`);
});

test('insert returning, select with filters, update and delete', async () => {
  const [ada] = await db.insert(customer).values({ name: 'ada' }).returning();
  assert.equal(typeof ada.id, 'number');
  const placedAt = new Date('2024-02-29T12:34:56.789Z');
  const inserted = await db
    .insert(order)
    .values([
      { customerId: ada.id, item: 'pen', quantity: 3, price: '1.50', tags: ['blue', 'a "b"'], details: { gift: true } },
      { customerId: ada.id, item: 'ink', quantity: 1, price: '12.00', placedAt },
    ])
    .returning();
  assert.equal(inserted.length, 2);
  assert.deepEqual(inserted[0].tags, ['blue', 'a "b"']);
  assert.deepEqual(inserted[0].details, { gift: true });
  assert.equal(inserted[1].price, '12.00');
  assert.equal(inserted[1].placedAt.toISOString(), placedAt.toISOString());
  assert.ok(inserted[0].placedAt instanceof Date);

  const big = await db
    .select({ item: order.item, quantity: order.quantity })
    .from(order)
    .where(and(eq(order.customerId, ada.id), gt(order.quantity, 2)));
  assert.deepEqual(big, [{ item: 'pen', quantity: 3 }]);

  const [updated] = await db
    .update(order)
    .set({ quantity: sql`${order.quantity} + 1` })
    .where(eq(order.item, 'ink'))
    .returning({ quantity: order.quantity });
  assert.equal(updated.quantity, 2);

  const [{ total }] = await db
    .select({ total: sql`sum(${order.price} * ${order.quantity})`.mapWith(Number) })
    .from(order);
  assert.equal(total, 28.5);

  const deleted = await db.delete(order).where(eq(order.item, 'pen')).returning({ id: order.id });
  assert.equal(deleted.length, 1);
});

test('relational queries', async () => {
  const [grace] = await db.insert(customer).values({ name: 'grace' }).returning();
  await db.insert(order).values([
    { customerId: grace.id, item: 'tape', quantity: 2, price: '3.10' },
    { customerId: grace.id, item: 'glue', quantity: 5, price: '0.99' },
  ]);
  const found = await db.query.customer.findFirst({
    where: eq(customer.name, 'grace'),
    with: { orders: { columns: { item: true, quantity: true }, orderBy: [asc(order.item)] } },
  });
  assert.equal(found.name, 'grace');
  assert.deepEqual(found.orders, [
    { item: 'glue', quantity: 5 },
    { item: 'tape', quantity: 2 },
  ]);
});

test('a batch is one transaction: all of it, or none of it on an error', async () => {
  const [alan] = await db.insert(customer).values({ name: 'alan' }).returning();
  const [, , rows] = await db.batch([
    db.insert(order).values({ customerId: alan.id, item: 'chalk', quantity: 1, price: '0.50' }),
    db.update(order).set({ quantity: 7 }).where(eq(order.item, 'chalk')),
    db.select({ quantity: order.quantity }).from(order).where(eq(order.item, 'chalk')),
  ]);
  assert.deepEqual(rows, [{ quantity: 7 }]);

  await assert.rejects(
    db.batch([
      db.insert(order).values({ customerId: alan.id, item: 'slate', quantity: 1, price: '9.00' }),
      db.insert(customer).values({ name: 'alan' }),
    ]),
    (error) => databaseError(error).code === '23505',
  );
  const slate = await db.select().from(order).where(eq(order.item, 'slate'));
  assert.deepEqual(slate, [], 'the failed batch left nothing behind');
});

test('database errors reach the application with their SQLSTATE', async () => {
  await assert.rejects(
    db.insert(order).values({ customerId: 999999, item: 'ghost', quantity: 1, price: '1.00' }),
    (error) => {
      const cause = databaseError(error);
      assert.equal(cause.code, '23503');
      assert.equal(cause.constraint, 'drizzle_order_customer_id_fkey');
      return true;
    },
  );
});
