// A backend's two jobs with crier, in Node (>= 18) with no dependencies:
//   node mint_and_publish.mjs token <user>              prints a client token (HS256)
//   node mint_and_publish.mjs publish <channel> <json>  publishes through the REST API
// Settings from the environment: CRIER_JWT_SECRET (the node's jwt_secret), CRIER_URL
// (e.g. http://127.0.0.1:8080), CRIER_API_KEY (one of the node's api_keys).
import { createHmac } from "node:crypto";

const b64url = (buf) => Buffer.from(buf).toString("base64url");

export function mintToken(secret, user, { channels = [`user:${user}`], publish = [], ttlSeconds = 3600 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSeconds, channels, publish }));
  const signature = b64url(createHmac("sha256", secret).update(`${header}.${claims}`).digest());
  return `${header}.${claims}.${signature}`;
}

export async function publish(baseUrl, apiKey, channel, data) {
  const res = await fetch(`${baseUrl}/api/v1/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`publish failed: ${res.status} ${body.error}: ${body.message}`);
  return body; // {channel, epoch, offset}
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [cmd, a, b] = process.argv.slice(2);
  if (cmd === "token") {
    console.log(mintToken(process.env.CRIER_JWT_SECRET, a, { channels: ["chat:*", `user:${a}`], publish: ["chat:*"] }));
  } else if (cmd === "publish") {
    console.log(JSON.stringify(await publish(process.env.CRIER_URL, process.env.CRIER_API_KEY, a, JSON.parse(b))));
  } else {
    console.error("usage: mint_and_publish.mjs token <user> | publish <channel> <json>");
    process.exit(2);
  }
}
