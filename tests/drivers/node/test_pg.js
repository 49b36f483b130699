// node-postgres (pg) through pgmux: named queries, which pg parses once per connection and
// then only binds by name, from 20 separate clients at once on a pool of 3 server
// connections; 30 runs each, plus transaction blocks, one of them rolled back.
//
// The statement name `calc` is SELECT $1 + $2 on even clients and SELECT $1 * $2 on odd
// ones: names belong to one client session, never to another.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
// With PGMUX_DRIVER_TLS_CA (a CA's PEM file), every connection uses TLS with
// `ssl: { ca, servername: 'localhost' }` (the chain checked against that CA, the name
// localhost against the certificate) and `enableChannelBinding` (each login must use
// SCRAM-SHA-256-PLUS); the run is shorter (10 rounds), and a plain connection must be refused
// with SQLSTATE 28000 first. With PGMUX_DRIVER_TLS_DIRECT=1 as well, one connection uses
// sslnegotiation: 'direct' (PostgreSQL 17's direct TLS handshake, ALPN postgresql).
// Exits 0 when every result was right, 1 otherwise.
'use strict';

const fs = require('fs');
const { Client } = require('pg');

const TLS_CA = process.env.PGMUX_DRIVER_TLS_CA;
const TLS_DIRECT = Boolean(process.env.PGMUX_DRIVER_TLS_DIRECT);
const CLIENTS = 20;
const ROUNDS = TLS_CA ? 10 : 30;
const TABLE = 'drivers_node_pg';

function check(ok, what) {
  if (!ok) throw new Error(what);
}

async function connect(extra = {}) {
  const config = { connectionTimeoutMillis: 30000 };
  if (TLS_CA) {
    config.ssl = { ca: fs.readFileSync(TLS_CA), servername: 'localhost' };
    config.enableChannelBinding = true;
  }
  const client = new Client({ ...config, ...extra });
  client.on('error', () => {}); // a lost connection also fails the query in flight
  // The SASL mechanism the client picks, seen on its way out.
  let mechanism = null;
  const send = client.connection.sendSASLInitialResponseMessage;
  client.connection.sendSASLInitialResponseMessage = function (chosen, response) {
    mechanism = chosen;
    return send.call(this, chosen, response);
  };
  await client.connect();
  if (config.ssl && extra.ssl !== false) {
    check(client.connection.stream.encrypted === true, 'the connection is not encrypted');
    check(mechanism === 'SCRAM-SHA-256-PLUS', `logged in with ${mechanism}, not SCRAM-SHA-256-PLUS`);
  }
  return client;
}

// Over TLS: a plain connection gets 28000; returns a line saying what was checked.
async function tlsChecks() {
  let refused;
  try {
    const client = await connect({ ssl: false, enableChannelBinding: false });
    await client.end();
  } catch (error) {
    check(error.code === '28000', `a plain connection got ${error.code} ${error.message}, expected 28000`);
    refused = `a plain connection refused with 28000 (${error.message})`;
  }
  check(refused !== undefined, 'a plain connection was accepted');
  let client = await connect();
  const protocol = client.connection.stream.getProtocol();
  await client.end();
  if (!TLS_DIRECT) return `${protocol}; ${refused}`;
  client = await connect({ sslnegotiation: 'direct' });
  const got = await one(client, { text: 'SELECT $1::int + 1 AS v', values: [41] });
  await client.end();
  check(got === 42, `a query over sslnegotiation=direct gave ${got}`);
  return `${protocol}; ${refused}; sslnegotiation=direct works`;
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
  const tls = TLS_CA ? await tlsChecks() : null;
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
      `${servers} server connections, up to ${mostPerClient} per client` +
      (tls ? `; over TLS verified against the CA, SCRAM-SHA-256-PLUS: ${tls}` : '')
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
