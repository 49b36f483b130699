// node-postgres (pg) through pgmux: named queries, which pg parses once per connection and
// then only binds by name, from 20 separate clients at once on a pool of 3 server
// connections; 30 runs each, plus transaction blocks, one of them rolled back.
//
// The statement name `calc` is SELECT $1 + $2 on even clients and SELECT $1 * $2 on odd
// ones: names belong to one client session, never to another.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
// Exits 0 when every result was right, 1 otherwise.
'use strict';

const { Client } = require('pg');

const CLIENTS = 20;
const ROUNDS = 30;
const TABLE = 'drivers_node_pg';

function check(ok, what) {
  if (!ok) throw new Error(what);
}

async function connect() {
  const client = new Client({ connectionTimeoutMillis: 30000 });
  client.on('error', () => {}); // a lost connection also fails the query in flight
  await client.connect();
  return client;
}

async function one(client, query) {
  const result = await client.query(query);
  return Object.values(result.rows[0])[0];
}

// Runs client i's rounds; returns the set of backend pids its transactions ran on.
async function runClient(i) {
  const pids = new Set();
  const client = await connect();
  const even = i % 2 === 0;
  const calc = (a, b) => ({
    name: 'calc',
    text: even ? 'SELECT $1::int + $2::int AS v' : 'SELECT $1::int * $2::int AS v',
    values: [a, b],
  });
  const add = (a, b) => ({ name: 'add', text: 'SELECT $1::int + $2::int AS s', values: [a, b] });
  const insert = (n, k) => ({
    name: 'insert',
    text: `INSERT INTO ${TABLE} (client, round, k) VALUES ($1, $2, $3)`,
    values: [i, n, k],
  });
  const count = (n) => ({
    name: 'count',
    text: `SELECT count(*)::int AS c FROM ${TABLE} WHERE client = $1 AND round = $2`,
    values: [i, n],
  });
  try {
    for (let n = 0; n < ROUNDS; n++) {
      let got = await one(client, add(i, n));
      check(got === i + n, `round ${n}: add ${i} + ${n} gave ${got}`);
      got = await one(client, calc(i, n));
      const expected = even ? i + n : i * n;
      check(got === expected, `round ${n}: calc(${i}, ${n}) gave ${got}, expected ${expected}`);

      await client.query('BEGIN');
      pids.add(await one(client, 'SELECT pg_backend_pid()'));
      await client.query(insert(n, 0));
      await client.query(insert(n, 1));
      got = await one(client, count(n));
      check(got === 2, `round ${n}: ${got} rows inside the transaction, expected 2`);
      await client.query('COMMIT');

      if (n % 10 === 9) {
        await client.query('BEGIN');
        await client.query(insert(n, 99));
        got = await one(client, count(n));
        check(got === 3, `round ${n}: ${got} rows before rollback, expected 3`);
        await client.query('ROLLBACK');
        got = await one(client, count(n));
        check(got === 2, `round ${n}: ${got} rows after rollback, expected 2`);
      }
    }
  } finally {
    await client.end();
  }
  return pids;
}

async function main() {
  let client = await connect();
  await client.query(`DROP TABLE IF EXISTS ${TABLE}`);
  await client.query(`CREATE TABLE ${TABLE} (client int, round int, k int)`);
  await client.end();

  const results = await Promise.allSettled([...Array(CLIENTS).keys()].map(runClient));
  const failed = results.map((r, i) => [i, r]).filter(([, r]) => r.status === 'rejected');
  for (const [i, r] of failed.slice(0, 5)) console.log(`node-postgres: client ${i}: ${r.reason}`);
  if (failed.length > 0) {
    console.log(`node-postgres: FAILED: ${failed.length} of ${CLIENTS} clients (the first 5 shown)`);
    return 1;
  }
  const pids = results.map((r) => r.value);
  const mostPerClient = Math.max(...pids.map((p) => p.size));
  if (process.env.PGMUX_DRIVER_EXPECT_MOVES && mostPerClient < 2) {
    console.log('node-postgres: FAILED: each client ran on one server connection only: nothing moved');
    return 1;
  }

  client = await connect();
  const { rows } = await client.query(
    `SELECT client, count(*)::int AS rows, sum(k)::int AS ks FROM ${TABLE} GROUP BY client ORDER BY client`
  );
  await client.query(`DROP TABLE ${TABLE}`);
  await client.end();
  const got = JSON.stringify(rows.map((r) => [r.client, r.rows, r.ks]));
  const expected = JSON.stringify([...Array(CLIENTS).keys()].map((i) => [i, ROUNDS * 2, ROUNDS]));
  if (got !== expected) {
    console.log(`node-postgres: FAILED: rows per client (client, rows, sum of k) were ${got}, expected ${expected}`);
    return 1;
  }
  const version = require('pg/package.json').version;
  const servers = new Set(pids.flatMap((p) => [...p])).size;
  console.log(
    `node-postgres ${version}: ${CLIENTS} clients x ${ROUNDS} rounds, all results right; ` +
      `${servers} server connections, up to ${mostPerClient} per client`
  );
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.log(`node-postgres: FAILED: ${error.stack || error}`);
    process.exit(1);
  }
);
