// socket.io 4 clients for tests/it/socketio.rs: `node client.js URL COUNT [QUERY_KEY]` opens COUNT
// clients to URL at once (each with `?QUERY_KEY=<i>` when QUERY_KEY is given). Every client
// connects over long-polling, echoes once, upgrades its engine to WebSocket, and echoes again;
// both echoes must come from the same backend, on the transport they were sent on. Prints one
// JSON line, `{"connected":n,"upgraded":n,"echoed":n,"backends":{NAME:n},"errors":{WHAT:n}}`,
// and exits 0 within SIO_CLIENT_TIMEOUT_MS (default 20000); clients still busy then count as
// "timeout: STAGE".
"use strict";

const { io } = require("socket.io-client");

const [url, countArg, queryKey] = process.argv.slice(2);
const count = Number(countArg);
const timeoutMs = Number(process.env.SIO_CLIENT_TIMEOUT_MS || 20000);
if (!url || !Number.isInteger(count) || count < 1 || !(timeoutMs > 0)) {
  console.error("usage: node client.js URL COUNT [QUERY_KEY]");
  process.exit(2);
}

// What went wrong, with the HTTP status and body socket.io's errors carry in `description` and
// `context` (a 400 `{"code":1,"message":"Session ID unknown"}` is a session on another backend).
function describe(err) {
  if (!err) return "";
  let text = err.message || String(err);
  const detail = err.description;
  if (typeof detail === "number") text += ` ${detail}`;
  else if (detail && detail.message) text += ` (${detail.message})`;
  const body = err.context && err.context.responseText;
  if (typeof body === "string" && body) text += ` ${body.split("\n")[0].slice(0, 120)}`;
  return text;
}

function runClient(i) {
  const outcome = { stage: "connect", connected: false, upgraded: false, echoed: false };
  let finish;
  const done = new Promise((resolve) => {
    finish = (error) => {
      if (outcome.error !== undefined) return;
      outcome.error = error;
      resolve();
    };
  });

  const socket = io(url, {
    // One engine.io session per client: by default io() shares a Manager per URL.
    forceNew: true,
    reconnection: false,
    timeout: timeoutMs,
    // In Node this gives the engine a cookie jar: Set-Cookie from polling responses is sent back
    // on later polling requests and on the WebSocket upgrade (engine.io-client 6.6).
    withCredentials: true,
    query: queryKey ? { [queryKey]: String(i) } : {},
    transports: ["polling", "websocket"],
    // The upgrade is started by hand after the polling echo; left to itself, the engine probes
    // WebSocket as soon as it opens and the first echo could travel either way.
    upgrade: false,
  });
  socket.on("connect_error", (err) => finish(`connect_error: ${describe(err)}`));
  socket.on("disconnect", (reason, details) =>
    finish(`disconnect: ${reason}${details ? ` ${describe(details)}` : ""}`),
  );

  socket.once("connect", async () => {
    outcome.connected = true;
    const engine = socket.io.engine;
    const echo = async (transport) => {
      outcome.stage = `${transport} echo`;
      const payload = `${transport} ${i}`;
      const reply = await socket.emitWithAck("echo", payload);
      if (reply.payload !== payload || reply.transport !== transport) {
        throw new Error(`${transport} echo came back as ${JSON.stringify(reply)}`);
      }
      return reply.backend;
    };
    try {
      const pollingBackend = await echo("polling");

      outcome.stage = "upgrade";
      // A failed probe keeps the engine on polling without any event but upgradeError, whose
      // message drops the cause: the probe transport's own error says what the server answered.
      let probeFailure = "";
      const createTransport = engine.createTransport.bind(engine);
      engine.createTransport = (name) => {
        const transport = createTransport(name);
        transport.once("error", (err) => (probeFailure = describe(err)));
        return transport;
      };
      const upgraded = new Promise((resolve, reject) => {
        engine.once("upgrade", resolve);
        engine.once("upgradeError", (err) =>
          reject(new Error(`upgradeError: ${probeFailure || describe(err)}`)),
        );
      });
      // What engine.io-client's onOpen calls when `upgrade` is on; the exact version is pinned.
      engine._probe("websocket");
      await upgraded;
      outcome.upgraded = true;

      const websocketBackend = await echo("websocket");
      if (websocketBackend !== pollingBackend) {
        throw new Error(`echoes from two backends: ${pollingBackend}, ${websocketBackend}`);
      }
      outcome.echoed = true;
      outcome.backend = pollingBackend;
      finish(null);
    } catch (err) {
      finish(err.message);
    }
  });
  return { outcome, done, finish };
}

async function main() {
  const clients = [];
  for (let i = 0; i < count; i++) clients.push(runClient(i));
  const timer = setTimeout(() => {
    for (const client of clients) client.finish(`timeout: ${client.outcome.stage}`);
  }, timeoutMs);
  await Promise.all(clients.map((client) => client.done));
  clearTimeout(timer);

  const summary = { connected: 0, upgraded: 0, echoed: 0, backends: {}, errors: {} };
  const tally = (map, key) => (map[key] = (map[key] || 0) + 1);
  for (const { outcome } of clients) {
    if (outcome.connected) summary.connected++;
    if (outcome.upgraded) summary.upgraded++;
    if (outcome.echoed) {
      summary.echoed++;
      tally(summary.backends, outcome.backend);
    }
    if (outcome.error) tally(summary.errors, outcome.error);
  }
  console.log(JSON.stringify(summary));
  // Closing politely would only add time; the sockets die with the process.
  process.exit(0);
}

main();
