// node-postgres as a client of a pgfleet listener. Connection settings come from the
// libpq environment (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE), which
// pg reads itself. Prints one JSON object on stdout for tests/compat/test_node.py.
'use strict';
const fs = require('fs');
const { Client, Pool } = require('pg');

function ssl() {
  const mode = process.env.PGSSLMODE || 'disable';
  if (mode === 'disable') return false;
  const ca = process.env.PGSSLROOTCERT ? fs.readFileSync(process.env.PGSSLROOTCERT, 'utf8') : undefined;
  if (mode === 'verify-full') return { ca, rejectUnauthorized: true };
  if (mode === 'verify-ca') return { ca, rejectUnauthorized: true, checkServerIdentity: () => undefined };
  return { rejectUnauthorized: false };
}

async function main() {
  const out = {};
  const client = new Client({ ssl: ssl(), connectionTimeoutMillis: 30000 });
  await client.connect();
  try {
    out.one = (await client.query('SELECT 1 AS one')).rows[0].one;
    out.user = (await client.query('SELECT current_user AS u')).rows[0].u;
    out.encrypted = Boolean(client.connection.stream.encrypted);
    // a parameterised query (extended protocol, unnamed statement)
    out.sum = (await client.query('SELECT $1::int + $2::int AS sum', [40, 2])).rows[0].sum;
    out.echo = (await client.query('SELECT $1::text AS t, $2::jsonb AS j', ['héllo', { a: [1, 2] }])).rows[0];
    // a named prepared statement: parsed once per connection, then only bound and executed
    out.prepared = [];
    for (let i = 0; i < 10; i++) {
      const r = await client.query({ name: 'times-three', text: 'SELECT $1::int * 3 AS n', values: [i] });
      out.prepared.push(r.rows[0].n);
    }
    // a table, a transaction that commits and one that rolls back
    const t = process.env.COMPAT_TABLE;
    await client.query(`DROP TABLE IF EXISTS "${t}"`);
    await client.query(`CREATE TABLE "${t}" (id int PRIMARY KEY, v text)`);
    await client.query('BEGIN');
    for (let i = 0; i < 20; i++) {
      await client.query({ name: 'ins', text: `INSERT INTO "${t}" VALUES ($1, $2)`, values: [i, `v${i}`] });
    }
    await client.query('COMMIT');
    await client.query('BEGIN');
    await client.query(`DELETE FROM "${t}"`);
    await client.query('ROLLBACK');
    out.count = Number((await client.query(`SELECT count(*) AS c FROM "${t}"`)).rows[0].c);
    try {
      await client.query('SELECT 1 / $1::int', [0]);
      out.error = null;
    } catch (e) {
      out.error = e.code;
    }
    out.after_error = (await client.query('SELECT 2 AS two')).rows[0].two;
    // several statements in one simple query
    const multi = await client.query('SELECT 1 AS a; SELECT 2 AS b');
    out.multi = multi.map((r) => r.rows[0]);
    await client.query(`DROP TABLE "${t}"`);
  } finally {
    await client.end();
  }
  // a pool of connections, many concurrent parameterised queries
  const pool = new Pool({ ssl: ssl(), max: 5, connectionTimeoutMillis: 30000 });
  try {
    const rs = await Promise.all(
      Array.from({ length: 50 }, (_, i) => pool.query({ name: 'sq', text: 'SELECT $1::int * $1::int AS sq', values: [i] })));
    out.pool = rs.map((r) => r.rows[0].sq);
  } finally {
    await pool.end();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
