// Holds many Baileys sessions in one Node process, for the side-by-side benchmark
// (crates/zapgate/benches/instances.rs): what a Baileys-based gateway pays per number.
//
//   node hold.mjs --url ws://127.0.0.1:PORT/ws/chat --auth DIR --sessions N [--linking C]
//
// Session i keeps its credentials in DIR/i (Baileys' multi-file auth state, as its
// examples and most gateways built on it do). Sessions with stored credentials log in;
// the others register, at most C at a time (default 32), each showing QR codes until it
// is scanned. Writes one JSON object per line on stdout:
//   {"event":"qr","session":i,"qr":"2@..."}   a QR code to scan (the newest counts)
//   {"event":"open","session":i,"open":K}      session i logged in; K are open now
//   {"event":"close","session":i,"status":S}   a connection ended; reopened unless 401
// Prints {"event":"ready"} once Baileys is loaded, and opens nothing before `start`.
// Reads commands on stdin:
//   start    opens the sessions
//   memory   answers {"event":"memory",...}: process.memoryUsage() in KiB, after a full
//            garbage collection when Node runs with --expose-gc
//   quit     closes every socket and exits once credentials are written

import { mkdir } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import makeWASocket, { Browsers, DisconnectReason, useMultiFileAuthState } from 'baileys';
import pino from 'pino';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    auth: { type: 'string' },
    sessions: { type: 'string' },
    linking: { type: 'string', default: '32' },
  },
});
const total = Number(args.sessions);
const linkingCap = Number(args.linking);
if (!args.url || !args.auth || !(total > 0) || !(linkingCap > 0)) {
  process.stderr.write('usage: node hold.mjs --url WS_URL --auth DIR --sessions N [--linking C]\n');
  process.exit(2);
}

const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
const logger = pino(
  { level: process.env.BAILEYS_LOG_LEVEL ?? 'error' },
  pino.destination({ dest: 2, sync: true }),
);

const sockets = new Map();
const opened = new Set();
const saving = [];
let quitting = false;

// Sessions still linking hold one of `linkingCap` slots until they open or are logged out.
let next = 0;
let linking = 0;
const holding = new Set();
function release(i) {
  if (holding.delete(i)) {
    linking -= 1;
    fill();
  }
}

async function start(i) {
  const dir = join(args.auth, String(i));
  await mkdir(dir, { recursive: true });
  const { state, saveCreds } = await useMultiFileAuthState(dir);
  let writes = Promise.resolve();
  saving[i] = () => writes;
  const connect = () => {
    const sock = makeWASocket({
      auth: state,
      waWebSocketUrl: args.url,
      browser: Browsers.ubuntu('Chrome'),
      logger,
      markOnlineOnConnect: false,
    });
    sockets.set(i, sock);
    sock.ev.on('creds.update', () => {
      writes = writes.then(saveCreds).catch((e) => logger.error({ e }, 'saving credentials'));
    });
    sock.ev.on('connection.update', (update) => {
      if (update.qr) emit('qr', { session: i, qr: update.qr });
      if (update.connection === 'open') {
        opened.add(i);
        emit('open', { session: i, open: opened.size });
        release(i);
      }
      if (update.connection === 'close') {
        opened.delete(i);
        const status = update.lastDisconnect?.error?.output?.statusCode ?? null;
        emit('close', { session: i, status });
        if (status === DisconnectReason.loggedOut) {
          release(i);
        } else if (!quitting) {
          // As an app does: at once after pairing (515), after a pause otherwise.
          setTimeout(connect, status === DisconnectReason.restartRequired ? 0 : 1000);
        }
      }
    });
  };
  connect();
  return Boolean(state.creds.registered);
}

async function fill() {
  while (next < total && linking < linkingCap && !quitting) {
    const i = next++;
    linking += 1;
    holding.add(i);
    if (await start(i)) release(i); // already linked: it only logs in
  }
}

emit('ready');
for await (const line of createInterface({ input: process.stdin })) {
  const command = line.trim();
  if (command === 'quit') break;
  if (command === 'start') fill().catch((e) => emit('error', { message: String(e?.message ?? e) }));
  if (command === 'memory') {
    globalThis.gc?.();
    const usage = Object.fromEntries(
      Object.entries(process.memoryUsage()).map(([k, v]) => [k, Math.round(v / 1024)]),
    );
    emit('memory', { collected: Boolean(globalThis.gc), ...usage });
  }
}
quitting = true;
for (const sock of sockets.values()) sock.end(undefined);
await Promise.all(saving.map((wait) => wait()));
process.exit(0);
