// Node >= 20: subscribe to a channel, publish to it, print what arrives. Node 20 has no global
// WebSocket, so pass the `ws` package's (npm install ws; crier-client from a checkout, see the README).
//
//   crier --dev                       # prints a token (24h) for the user dev-user
//   CRIER_TOKEN=<that token> node examples/node.mjs ws://localhost:8080/ws chat:lobby

import WebSocket from "ws";
import { Crier } from "crier-client";

const [url = "ws://localhost:8080/ws", channel = "chat:lobby"] = process.argv.slice(2);
const token = process.env.CRIER_TOKEN;
if (!token) {
  console.error("set CRIER_TOKEN (crier --dev prints one)");
  process.exit(2);
}

const crier = new Crier(url, { token, WebSocket });
crier.on("state", (s) => console.log(`[${s}]`));
crier.on("close", (e) => console.log(`closed ${e.code} ${e.reason}${e.reconnect ? `, retrying in ${e.delay} ms` : ""}`));

crier.subscribe(channel, {
  onMessage: (m) => console.log(`${m.channel} #${m.offset}:`, JSON.stringify(m.data)),
  onGap: (g) => console.log(`messages lost on ${g.channel} (${g.reason}); continuing after #${g.offset}`),
  onError: (e) => console.error(`subscription refused: ${e.code} ${e.message}`),
});

try {
  const { offset } = await crier.publish(channel, { text: "hello from node", at: new Date().toISOString() });
  console.log(`published as #${offset}`);
  console.log("here now:", await crier.presence(channel));
} catch (e) {
  console.error(`request failed: ${e.code} ${e.message}`);
}

process.on("SIGINT", () => {
  crier.close();
  process.exit(0);
});
