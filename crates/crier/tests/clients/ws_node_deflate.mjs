// Node `ws` with its default permessage-deflate offer, for crates/crier/tests/deflate.rs.
// Usage: node ws_node_deflate.mjs WS_MODULE_PATH WS_URL TOKEN CHANNEL
// Connects (ws offers `permessage-deflate; client_max_window_bits`), subscribes, publishes a
// ~20 KB message (ws compresses it: over its 1 KiB threshold), reads it back from its own
// subscription and prints one JSON line: {"extensions" (as ws took them), "header" (crier's
// answer), "same"}. Bounded: 30 s.
import { pathToFileURL } from "node:url";

const [wsPath, url, token, channel] = process.argv.slice(2);
const { default: WebSocket } = await import(pathToFileURL(wsPath).href);
setTimeout(() => {
  console.error("timed out");
  process.exit(2);
}, 30000).unref();

const words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"];
const data = { from: "node", items: Array.from({ length: 400 }, (_, i) => `${words[i % 8]} ${words[(i * 7) % 8]} ${i}`) };
const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } });
let header = null;
ws.on("upgrade", (res) => {
  header = res.headers["sec-websocket-extensions"] ?? null;
});
ws.on("error", (e) => {
  console.error(String(e));
  process.exit(1);
});
ws.on("open", () => {
  ws.send(JSON.stringify({ type: "subscribe", id: 1, channel }));
  ws.send(JSON.stringify({ type: "publish", id: 2, channel, data }), { compress: true });
});
ws.on("message", (raw) => {
  const f = JSON.parse(raw.toString());
  if (f.type === "error") {
    console.error(JSON.stringify(f));
    process.exit(1);
  }
  if (f.type === "message" && f.data && f.data.from === "node") {
    const same = JSON.stringify(f.data) === JSON.stringify(data);
    console.log(JSON.stringify({ extensions: ws.extensions, header, same }));
    ws.close(1000);
  }
});
ws.on("close", () => process.exit(0));
