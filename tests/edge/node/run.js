// The unmodified @neondatabase/serverless driver against pgfleet's HTTP/WebSocket listener,
// pointed at it only through the driver's documented options. Prints one JSON document.
// env: EDGE_PORT, DB_URL (postgresql://user:password@<db>.db.localhost/<db>), MODE, QUERIES (JSON)
const { neon, neonConfig, Pool, Client } = require('@neondatabase/serverless');
const ws = require('ws');

const port = process.env.EDGE_PORT;
const url = process.env.DB_URL;
neonConfig.fetchEndpoint = () => `http://127.0.0.1:${port}/sql`;
neonConfig.webSocketConstructor = ws;
neonConfig.useSecureWebSocket = false;
neonConfig.wsProxy = (host, p) => `127.0.0.1:${port}/v2?address=${host}:${p}`;

const raw = { getTypeParser: () => (v) => v };  // every value as the server's text

function errorOf(e) {
  return { code: e.code ?? null, position: e.position ?? null, message: e.message, name: e.constructor.name };
}

async function attempt(fn) {
  try { return { ok: await fn() }; } catch (e) { return { error: errorOf(e) }; }
}

async function http() {
  const sql = neon(url);
  const out = {};
  // many parameter types, as the server's text (compared with psql by the test)
  out.typed = [];
  for (const q of JSON.parse(process.env.QUERIES || '[]')) {
    const params = q.params.map((p) => (p && p.$date ? new Date(p.$date) : p && p.$hex ? Buffer.from(p.$hex, 'hex') : p));
    const r = await sql.query(q.sql, params, { arrayMode: true, fullResults: true, types: raw });
    out.typed.push(r.rows);
  }
  // values parsed by the driver's own type parsers
  const [row] = await sql`SELECT ${42}::int AS i, ${'héllo'}::text AS t, ${true}::bool AS b, ${null}::int AS n,
                          ${[1, 2, 3]}::int[] AS a, ${{ k: 'v' }}::jsonb AS j, 1.5::float8 AS f`;
  out.parsed = row;
  out.tagged = await sql`SELECT ${'x'} || ${'y'} AS xy`;
  await sql`DROP TABLE IF EXISTS neon_t`;
  await sql`CREATE TABLE neon_t (id int PRIMARY KEY, note text)`;
  out.commit = await sql.transaction([
    sql`INSERT INTO neon_t VALUES (${1}, ${'one'})`,
    sql`INSERT INTO neon_t VALUES (${2}, ${'two'})`,
    sql`SELECT count(*)::int AS n FROM neon_t`,
  ], { isolationLevel: 'Serializable' });
  out.rollback = await attempt(() => sql.transaction([
    sql`INSERT INTO neon_t VALUES (${3}, ${'three'})`,
    sql`INSERT INTO neon_t VALUES (${1}, ${'again'})`,
  ]));
  out.after_rollback = await sql`SELECT id FROM neon_t ORDER BY id`;
  out.read_only = await attempt(() => sql.transaction([sql`INSERT INTO neon_t VALUES (9, 'x')`], { readOnly: true }));
  out.syntax = await attempt(() => sql.query('SELECT 1 + FROM neon_t'));
  out.full = await sql.query('SELECT id, note FROM neon_t ORDER BY id', [], { fullResults: true });
  out.full = { command: out.full.command, rowCount: out.full.rowCount, rows: out.full.rows,
               fields: out.full.fields.map((f) => [f.name, f.dataTypeID]) };
  return out;
}

async function websocket() {
  const out = {};
  const client = new Client(url);
  await client.connect();
  out.client = (await client.query('SELECT $1::int * 2 AS d, current_setting($2) AS app', [21, 'application_name'])).rows;
  await client.query('LISTEN pings');
  const note = new Promise((resolve) => client.on('notification', (m) => resolve(m.payload)));
  await client.query("NOTIFY pings, 'hello'");
  out.notify = await note;
  await client.end();
  // SCRAM instead of the pipelined cleartext password
  const scram = new Client(url);
  scram.neonConfig.pipelineConnect = false;
  await scram.connect();
  out.scram = (await scram.query('SELECT 7 AS seven')).rows;
  await scram.end();
  const pool = new Pool({ connectionString: url, max: 4 });
  const squares = await Promise.all([...Array(12).keys()].map((i) => pool.query('SELECT $1::int * $1::int AS sq', [i])));
  out.pool = squares.map((r) => r.rows[0].sq);
  const c = await pool.connect();
  await c.query('BEGIN');
  await c.query('INSERT INTO neon_t VALUES (100, $1)', ['ws']);
  await c.query('COMMIT');
  c.release();
  out.pool_tx = (await pool.query('SELECT note FROM neon_t WHERE id = 100')).rows;
  await pool.end();
  return out;
}

async function main() {
  const mode = process.env.MODE || 'all';
  let out;
  if (mode === 'one') {
    out = await attempt(() => neon(url)`SELECT 1 AS one`);
  } else if (mode === 'ws-one') {
    out = await attempt(async () => {
      const c = new Client(url);
      await c.connect();
      try { return (await c.query('SELECT 1 AS one')).rows; } finally { await c.end(); }
    });
  } else {
    out = { http: await http(), ws: await websocket() };
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => { console.error(e); process.exit(1); });
