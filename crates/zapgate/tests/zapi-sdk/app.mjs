// Held-out client "app" for zapgate: uses only the public API of z-api-sdk@0.0.1.
// Config: ZAPI_BASE_URL, ZAPI_INSTANCE_ID, ZAPI_TOKEN, ZAPI_CLIENT_TOKEN (optional),
//         ZAPI_MAX_RETRIES (optional; SDK default 2 when unset).
// Prints exactly one JSON line on stdout and always exits 0.
import { ZAPI } from "z-api-sdk";

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function fail(err) {
  const status = err && typeof err.status === "number" ? err.status : null;
  const error = err && err.message ? String(err.message) : String(err);
  out({ ok: false, status, error });
}

function need(args, n, usage) {
  if (args.length < n) throw new Error(`usage: ${usage}`);
}

async function run(argv) {
  const [cmd, ...args] = argv;
  const maxRetries = process.env.ZAPI_MAX_RETRIES;
  const zapi = new ZAPI({
    baseURL: process.env.ZAPI_BASE_URL,
    instanceId: process.env.ZAPI_INSTANCE_ID,
    token: process.env.ZAPI_TOKEN,
    clientToken: process.env.ZAPI_CLIENT_TOKEN || undefined,
    maxRetries: maxRetries !== undefined && maxRetries !== "" ? Number(maxRetries) : undefined,
  });

  switch (cmd) {
    case "status":
      return zapi.instance.getStatus();
    case "webhooks": {
      need(args, 1, "webhooks <url-base>");
      const base = args[0].replace(/\/+$/, "");
      return {
        received: await zapi.webhooks.updateReceived(`${base}/received`),
        delivery: await zapi.webhooks.updateDelivery(`${base}/delivery`),
        messageStatus: await zapi.webhooks.updateMessageStatus(`${base}/status`),
      };
    }
    case "send":
      need(args, 2, "send <phone> <text>");
      return zapi.messages.sendText({ phone: args[0], message: args[1] });
    case "reply":
      need(args, 3, "reply <phone> <messageId> <text>");
      return zapi.messages.sendText({ phone: args[0], messageId: args[1], message: args[2] });
    case "read":
      need(args, 2, "read <phone> <messageId>");
      return zapi.messages.readMessage({ phone: args[0], messageId: args[1] });
    case "exists":
      need(args, 1, "exists <phone>");
      return zapi.contacts.phoneExists(args[0]);
    case "queue":
      return zapi.queue.list();
    case "queue-clear":
      return zapi.queue.clear();
    case "queue-delete":
      need(args, 1, "queue-delete <zaapId>");
      return zapi.queue.deleteMessage(args[0]);
    default:
      throw new Error(
        "usage: app.mjs status|webhooks|send|reply|read|exists|queue|queue-clear|queue-delete ..."
      );
  }
}

try {
  const result = await run(process.argv.slice(2));
  out({ ok: true, result: result === undefined ? null : result });
} catch (err) {
  fail(err);
}
process.exitCode = 0;
