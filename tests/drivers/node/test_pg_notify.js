// LISTEN/NOTIFY with node-postgres (pg) through pgmux: client.on('notification') on 10
// clients (a pool of 2 in transaction mode), LISTEN then UNLISTEN.
//
// Checks, as the Python tests' notify_common.py: 50 notifications from one transaction
// arrive in order, with payloads of 0 to 7999 bytes intact, on every listener; each carries
// the process id that pg_backend_pid() gave in the sender's transaction (through pgmux in
// transaction mode, not the sender's BackendKeyData pid, client.processID); a listener
// receives its own NOTIFY; after UNLISTEN nothing arrives on that channel (the next
// notification is one sent after it, on a channel the client still listens to).
//
// node-postgres sends a query without values as a simple Query: LISTEN and UNLISTEN here
// are simple Queries; the pg_notify() calls have values (extended protocol).
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
// Exits 0 when every result was right, 1 otherwise.
'use strict';

const { Client } = require('pg');

const LISTENERS = 10;
const BURST = 50;
const MAX_PAYLOAD = 7999;
const WAIT_MS = 30000;
const EXPECT_MOVES = Boolean(process.env.PGMUX_DRIVER_EXPECT_MOVES);
const JOBS = 'node_jobs';
const MARKER = 'node_marker';
const ALPHABET = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';

function check(ok, what) {
  if (!ok) throw new Error(what);
}

// The payload of the burst's notification i: from 0 bytes (i = 0) to 7999 (the last).
function payload(i) {
  const length = Math.floor((i * MAX_PAYLOAD) / (BURST - 1));
  let text = '';
  for (let k = 0; k < length; k++) text += ALPHABET[(i * 31 + k * 7) % ALPHABET.length];
  return text;
}

function show([channel, text, pid]) {
  const shown = text.length > 40 ? `${text.slice(0, 20)}...(${text.length} bytes)` : text;
  return JSON.stringify([channel, shown, pid]);
}

function expectSequence(who, got, expected) {
  for (let k = 0; k < Math.min(got.length, expected.length); k++) {
    const [g, e] = [got[k], expected[k]];
    check(g[0] === e[0] && g[1] === e[1] && g[2] === e[2], `${who}: notification ${k} was ${show(g)}, expected ${show(e)}`);
  }
  check(
    got.length === expected.length,
    `${who}: ${got.length} notifications, expected ${expected.length}` +
      (got.length < expected.length ? `; the first missing: ${show(expected[got.length])}` : '')
  );
}

function checkSenderPid(who, notifiedPid, keyPid) {
  if (EXPECT_MOVES) {
    check(notifiedPid !== keyPid, `${who}: the sender's server pid ${notifiedPid} equals its BackendKeyData pid`);
  } else {
    check(notifiedPid === keyPid, `${who}: the sender's server pid ${notifiedPid} is not its BackendKeyData pid ${keyPid}`);
  }
}

// A client that queues its notifications; `receive(n)` waits for the next n (fewer if
// they do not come within WAIT_MS).
async function connect() {
  const client = new Client({ connectionTimeoutMillis: 30000 });
  client.on('error', () => {}); // a lost connection also fails the query in flight
  const queue = [];
  let wake = null;
  client.on('notification', (msg) => {
    queue.push([msg.channel, msg.payload, msg.processId]);
    if (wake) wake();
  });
  client.receive = async (count) => {
    const deadline = Date.now() + WAIT_MS;
    while (queue.length < count && Date.now() < deadline) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, deadline - Date.now());
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = null;
    }
    return queue.splice(0, count);
  };
  await client.connect();
  return client;
}

// Sends [channel, payload] pairs in one transaction; returns its pg_backend_pid().
async function send(sender, notes) {
  await sender.query('BEGIN');
  const { rows } = await sender.query('SELECT pg_backend_pid() AS pid');
  for (const [channel, text] of notes) {
    await sender.query({ text: 'SELECT pg_notify($1, $2)', values: [channel, text] });
  }
  await sender.query('COMMIT');
  return rows[0].pid;
}

async function main() {
  const listeners = [];
  for (let i = 0; i < LISTENERS; i++) listeners.push(await connect());
  for (const client of listeners) await client.query(`LISTEN ${JOBS}`);
  await listeners[1].query(`LISTEN ${MARKER}`);

  const sender = await connect();
  const payloads = [...Array(BURST).keys()].map(payload);
  const pid = await send(
    sender,
    payloads.map((p) => [JOBS, p])
  );
  checkSenderPid('sender', pid, sender.processID);

  // Self-notification: listener 0's own NOTIFY, in a transaction, comes back to it.
  await listeners[0].query('BEGIN');
  const own = (await listeners[0].query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
  await listeners[0].query(`NOTIFY ${JOBS}, 'self'`);
  await listeners[0].query('COMMIT');
  checkSenderPid('listener 0', own, listeners[0].processID);

  const expected = payloads.map((p) => [JOBS, p, pid]).concat([[JOBS, 'self', own]]);
  for (let i = 0; i < LISTENERS; i++) {
    expectSequence(`listener ${i}`, await listeners[i].receive(expected.length), expected);
  }

  await listeners[1].query(`UNLISTEN ${JOBS}`);
  const last = await send(sender, [
    [JOBS, 'after unlisten'],
    [MARKER, 'end'],
  ]);
  for (let i = 0; i < LISTENERS; i++) {
    if (i === 1) {
      expectSequence('listener 1 after UNLISTEN', await listeners[1].receive(1), [[MARKER, 'end', last]]);
    } else {
      expectSequence(`listener ${i}`, await listeners[i].receive(1), [[JOBS, 'after unlisten', last]]);
    }
  }

  for (const client of listeners.concat([sender])) await client.end();
  const version = require('pg/package.json').version;
  console.log(
    `node-postgres ${version}: ${LISTENERS} listeners got ${BURST} notifications ` +
      `(0 to ${MAX_PAYLOAD} bytes) in order with the sender's server pid, and their own; nothing after UNLISTEN`
  );
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.log(`node_pg_notify: FAILED: ${error.message || error}`);
    process.exit(1);
  }
);
