// node-postgres (pg) as an upgrade worker (tests/drivers/upgrade; what it does:
// python/upgrade_common.py). ONE pg.Client all along: the prepared statements are named
// queries ({ name, text, values }: parsed once per connection, then only bound by name),
// the transactions BEGIN ... COMMIT, the backend pid client.processID, the cancel pg's own
// Client#cancel(client, query) (a second Client sends the CancelRequest with the first one's
// processID and secretKey) on a pg_sleep(30) submitted as a pg.Query.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE; the
// cancel check's watching connection uses PGMUX_DRIVER_UPGRADE_WATCH_DB (default
// PGDATABASE); progress goes to PGMUX_DRIVER_UPGRADE_DIR/node_pg.progress, and the loop
// stops when PGMUX_DRIVER_UPGRADE_DIR/stop exists.
// Exits 0 when every result was right, 1 otherwise.
'use strict';

const fs = require('fs');
const path = require('path');
const { Client, Query } = require('pg');

const NAME = 'node_pg';
const APP = `drvupg_${NAME}`;
const STATEMENT_TIMEOUT = '41s';
const TABLE = `drivers_upgrade_${NAME}`;
const MARKER = `drvupg cancel ${NAME}`;
const WAIT_MS = 20000;
const MAX_ERRORS = 20;
const DIR = process.env.PGMUX_DRIVER_UPGRADE_DIR;
const PROGRESS = path.join(DIR, `${NAME}.progress`);
const STOP = path.join(DIR, 'stop');
const INSERT = { name: 'upg_insert', text: `INSERT INTO ${TABLE} (n) VALUES ($1)` };
const CHECK = {
  name: 'upg_check',
  text: `SELECT count(*)::int AS n, current_setting('application_name') AS app,
         current_setting('statement_timeout') AS timeout FROM ${TABLE} WHERE n <= $1`,
};

function check(ok, what) {
  if (!ok) throw new Error(what);
}

let transactions = 0;
const errors = [];

function writeProgress() {
  fs.writeFileSync(`${PROGRESS}.tmp`, `${transactions} ${errors.length}\n`);
  fs.renameSync(`${PROGRESS}.tmp`, PROGRESS);
}

async function expect(client, n, where) {
  const { rows } = await client.query({ ...CHECK, values: [n] });
  const got = [rows[0].n, rows[0].app, rows[0].timeout];
  const want = [n, APP, STATEMENT_TIMEOUT];
  check(JSON.stringify(got) === JSON.stringify(want), `${where}: CHECK(${n}) gave ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The driver's cancel of a running pg_sleep(30) must end it with 57014.
async function cancelCheck(client) {
  const query = new Query(`SELECT pg_sleep(30) /* ${MARKER} */`);
  const ended = new Promise((resolve) => {
    query.on('error', (error) => resolve(error));
    query.on('end', () => resolve(null));
  });
  let finished = false;
  ended.then(() => { finished = true; });
  client.query(query);
  const watcher = new Client({ database: process.env.PGMUX_DRIVER_UPGRADE_WATCH_DB || process.env.PGDATABASE });
  watcher.on('error', () => {});
  await watcher.connect();
  try {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const { rows } = await watcher.query(
        `SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active'
         AND query LIKE '%${MARKER}%' AND query NOT LIKE '%pg_stat_activity%'`);
      if (rows[0].n > 0) break;
      check(!finished, 'the pg_sleep ended before it was cancelled');
      check(Date.now() < deadline, `the pg_sleep did not start within ${WAIT_MS} ms`);
      await sleep(50);
    }
  } finally {
    await watcher.end();
  }
  const canceller = new Client();
  canceller.on('error', () => {});
  canceller.cancel(client, query);
  const error = await ended;
  check(error !== null, 'the pg_sleep was not cancelled');
  check(error.code === '57014', `the cancelled pg_sleep gave ${error.code} ${error.message}, expected 57014`);
}

async function main() {
  const client = new Client({ connectionTimeoutMillis: 30000 });
  let broken = null;
  client.on('error', (error) => { broken = broken || error; });
  client.on('end', () => { broken = broken || new Error('the connection ended'); });
  // What pgmux reported in ParameterStatus messages, last value first.
  const reported = {};
  client.connection.on('parameterStatus', (msg) => { reported[msg.parameterName] = msg.parameterValue; });
  await client.connect();
  await client.query(`DROP TABLE IF EXISTS ${TABLE}; CREATE TABLE ${TABLE} (n int)`);
  await client.query(`SET application_name = '${APP}'`);
  await client.query(`SET statement_timeout = '${STATEMENT_TIMEOUT}'`);
  await expect(client, 0, 'before the loop');
  const pid = client.processID;
  writeProgress();

  while (!fs.existsSync(STOP)) {
    const n = transactions + 1;
    let open = false;
    try {
      await client.query('BEGIN');
      open = true;
      await client.query({ ...INSERT, values: [n] });
      await expect(client, n, 'in a transaction');
      await client.query('COMMIT');
      open = false;
      transactions = n;
      await expect(client, n, 'single statement');
    } catch (error) {
      errors.push(`${error.code || ''} ${error.message}`);
      writeProgress();
      if (broken) {
        console.log(`${NAME}: FAILED: the connection broke: ${errors[errors.length - 1]} (${broken.message})`);
        return 1;
      }
      if (open) {
        try {
          await client.query('ROLLBACK');
        } catch (e) {
          errors.push(`ROLLBACK: ${e.message}`);
        }
      }
      if (errors.length >= MAX_ERRORS) break;
    }
    writeProgress();
  }

  if (errors.length) {
    for (const e of errors.slice(0, 5)) console.log(`${NAME}: error: ${e}`);
    console.log(`${NAME}: FAILED: ${errors.length} errors in ${transactions} transactions (the first 5 shown)`);
    return 1;
  }
  try {
    check(transactions > 0, 'no transaction committed');
    check(!broken, `the connection broke: ${broken && broken.message}`);
    check(client.processID === pid, `backend pid ${client.processID}, was ${pid}`);
    await expect(client, transactions, 'at the end');
    check((await client.query('SHOW application_name')).rows[0].application_name === APP, 'application_name lost');
    check((await client.query('SHOW statement_timeout')).rows[0].statement_timeout === STATEMENT_TIMEOUT,
      'statement_timeout lost');
    check(reported.application_name === APP,
      `the application_name last reported to pg is ${JSON.stringify(reported.application_name)}`);
    await cancelCheck(client);
    await expect(client, transactions, 'after the cancel');
    check(client.processID === pid, 'backend pid changed by the cancel');
  } catch (error) {
    console.log(`${NAME}: FAILED: end checks: ${error.message}`);
    return 1;
  } finally {
    await client.end().catch(() => {});
  }
  console.log(`${NAME}: ${transactions} transactions, 0 errors, 0 reconnects; one connection, backend pid ${pid} `
    + 'all along; application_name, statement_timeout and the named queries kept; a cancel after the upgrades gave 57014');
  return 0;
}

main().then(
  (status) => process.exit(status),
  (error) => {
    console.log(`${NAME}: FAILED: ${error.stack || error}`);
    process.exit(1);
  },
);
