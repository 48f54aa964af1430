// One socket.io 4 backend for tests/it/socketio.rs: `node server.js PORT NAME` listens on
// 127.0.0.1:PORT and acknowledges every `echo` event with the payload, NAME and the transport
// the event arrived on, so that a client can tell which backend and which transport answered.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const [port, name] = process.argv.slice(2);
if (!/^\d+$/.test(port || "") || !name) {
  console.error("usage: node server.js PORT NAME");
  process.exit(2);
}

const httpServer = http.createServer();
// No CORS: the Node client sends no Origin, and the test reaches nothing cross-origin.
const io = new Server(httpServer);

io.on("connection", (socket) => {
  socket.on("echo", (payload, ack) => {
    if (typeof ack === "function") {
      ack({ payload, backend: name, transport: socket.conn.transport.name });
    }
  });
});

httpServer.on("error", (err) => {
  console.error(`socket.io backend ${name}: ${err.message}`);
  process.exit(1);
});
httpServer.listen(Number(port), "127.0.0.1");

// The test kills the process; a SIGTERM from anyone else ends it just as quietly.
process.on("SIGTERM", () => process.exit(0));
