// Keeps the Neon driver busy for PGWARDEN_LOAD_MS milliseconds with point
// reads and single-row UPDATEs, then prints one JSON line: how many queries
// succeeded, how many failed, the first errors, and the acknowledged writes.
import { neon, neonConfig } from '@neondatabase/serverless';

neonConfig.fetchEndpoint = process.env.PGWARDEN_FETCH_ENDPOINT;
const sql = neon(process.env.PGWARDEN_CONNECTION_STRING);
const until = Date.now() + Number(process.env.PGWARDEN_LOAD_MS ?? 5000);
const report = { ok: 0, failed: 0, writes: 0, errors: [] };

async function client(id) {
  while (Date.now() < until) {
    try {
      if (report.ok % 2 === 0) {
        await sql`UPDATE client_load SET n = n + 1 WHERE id = ${id}`;
        report.writes += 1;
      } else {
        await sql`SELECT n FROM client_load WHERE id = ${id}`;
      }
      report.ok += 1;
    } catch (error) {
      report.failed += 1;
      if (report.errors.length < 5) report.errors.push(String(error));
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

await Promise.all([1, 2, 3, 4].map(client));
console.log(JSON.stringify(report));
