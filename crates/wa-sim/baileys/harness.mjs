// Drives an unmodified Baileys client against wa-sim, for the conformance tests.
//
//   node harness.mjs --url ws://127.0.0.1:PORT/ws/chat --auth DIR
//
// Writes one JSON object per line on stdout, each with `event` and `ms` (since start):
//   {"event":"qr","qr":"2@..."}                 a QR code to scan
//   {"event":"pairing-code","code":"ABCD1234"}  after a `pair` command
//   {"event":"open","jid":"...","name":"..."}   logged in
//   {"event":"history","syncType":0}           a history sync was processed
//   {"event":"sent","id":"...","to":"...","at":UNIX_MS}  a text sent (`at`: when the send began)
//   {"event":"burst","count":N,"failed":N}      after a `burst` command, once all went
//   {"event":"message","id","from","text","pushName"}  a text from someone else
//   {"event":"close","status":401}              the connection ended (401: logged out)
//   {"event":"error","message":"..."}           a command failed
// Reads commands, one per line, on stdin:
//   pair <phone>   ask for a pairing code for <phone> (once the socket is up)
//   send <jid> <text...>   send a text
//   burst <count> <in-flight> <jid,jid,...>   send `count` texts ("burst N") to the jids in
//                  turn, at most `in-flight` at once, as fast as Baileys goes
//   quit           close the socket and exit
// Baileys' own log (pino, JSON lines) goes to stderr; BAILEYS_LOG_LEVEL sets its level.
// A socket closed with 515 (restart required, after pairing) is reopened, as an app does.

import { createInterface } from 'node:readline';
import { format, parseArgs } from 'node:util';

import makeWASocket, { Browsers, DisconnectReason, useMultiFileAuthState } from 'baileys';
import pino from 'pino';

const { values: args } = parseArgs({
  options: { url: { type: 'string' }, auth: { type: 'string' } },
});
if (!args.url || !args.auth) {
  process.stderr.write('usage: node harness.mjs --url WS_URL --auth DIR\n');
  process.exit(2);
}

const started = Date.now();
const emit = (event, fields = {}) =>
  process.stdout.write(JSON.stringify({ event, ms: Date.now() - started, ...fields }) + '\n');
// Synchronous, so nothing Baileys logged is lost when the process exits.
const logger = pino(
  { level: process.env.BAILEYS_LOG_LEVEL ?? 'warn' },
  pino.destination({ dest: 2, sync: true }),
);

// libsignal tells of sessions opened and closed with console.info, objects and all: into
// Baileys' log at debug level, so stdout stays one event per line.
console.info = (...what) => {
  if (logger.isLevelEnabled('debug')) logger.debug({ libsignal: format(...what) });
};

const { state, saveCreds } = await useMultiFileAuthState(args.auth);
let sock;
// Credential writes in order, so quitting can wait for the last one.
let saving = Promise.resolve();
let registered; // resolves once the current socket showed a QR (it is registered)
let open = false;
let quitting = false;

function connect() {
  let ready;
  registered = new Promise((resolve) => (ready = resolve));
  sock = makeWASocket({
    auth: state,
    waWebSocketUrl: args.url,
    browser: Browsers.ubuntu('Chrome'),
    logger,
    markOnlineOnConnect: false,
  });
  sock.ev.on('creds.update', () => {
    saving = saving
      .then(saveCreds)
      .catch((e) => emit('error', { message: `saving credentials: ${e?.message ?? e}` }));
  });
  sock.ev.on('messaging-history.set', ({ syncType }) => emit('history', { syncType }));
  sock.ev.on('messages.upsert', ({ messages }) => {
    for (const m of messages) {
      const text = m.message?.conversation ?? m.message?.extendedTextMessage?.text;
      if (m.key.fromMe || text == null) continue;
      emit('message', { id: m.key.id, from: m.key.remoteJid, text, pushName: m.pushName ?? null });
    }
  });
  sock.ev.on('connection.update', async (update) => {
    if (update.qr) {
      ready();
      emit('qr', { qr: update.qr });
    }
    if (update.connection === 'open') {
      open = true;
      emit('open', { jid: sock.user?.id, name: sock.user?.name ?? null });
    }
    if (update.connection === 'close') {
      open = false;
      const error = update.lastDisconnect?.error;
      const status = error?.output?.statusCode ?? null;
      emit('close', { status, message: error?.message ?? null });
      if (status === DisconnectReason.restartRequired && !quitting) {
        connect();
      } else {
        await saving;
        process.exit(0);
      }
    }
  });
}

// Sends a text; whether it went.
async function send(jid, text) {
  const at = Date.now();
  try {
    const sent = await sock.sendMessage(jid, { text });
    emit('sent', { id: sent.key.id, to: jid, at });
    return true;
  } catch (e) {
    emit('error', { message: String(e?.message ?? e) });
    return false;
  }
}

connect();

for await (const line of createInterface({ input: process.stdin })) {
  const [command, ...rest] = line.trim().split(/\s+/);
  if (command === 'pair') {
    if (open) {
      emit('error', { message: 'already linked' });
      continue;
    }
    await registered;
    try {
      emit('pairing-code', { code: await sock.requestPairingCode(rest[0]) });
    } catch (e) {
      emit('error', { message: String(e?.message ?? e) });
    }
  } else if (command === 'send') {
    await send(rest[0], rest.slice(1).join(' '));
  } else if (command === 'burst') {
    const [count, inFlight] = [Number(rest[0]), Number(rest[1])];
    const jids = (rest[2] ?? '').split(',').filter(Boolean);
    if (!(count > 0 && inFlight > 0 && jids.length)) {
      emit('error', { message: 'usage: burst <count> <in-flight> <jid,jid,...>' });
      continue;
    }
    let next = 0;
    let failed = 0;
    const worker = async () => {
      while (next < count) {
        const i = next++;
        if (!(await send(jids[i % jids.length], `burst ${i}`))) failed++;
      }
    };
    await Promise.all(Array.from({ length: Math.min(inFlight, count) }, worker));
    emit('burst', { count, failed });
  } else if (command === 'quit') {
    quitting = true;
    sock.end(undefined);
    setTimeout(() => process.exit(0), 2000).unref();
  } else if (command) {
    emit('error', { message: `unknown command: ${command}` });
  }
}
