"""A real permessage-deflate client for crates/crier/tests/deflate.rs: Python `websockets` with its
default compression offer. Usage: ws_deflate.py WS_URL TOKEN CHANNEL COUNT

Prints one JSON line once subscribed ({"extensions": [...]}), waits for a line on stdin, publishes
one ~2 KiB message (compressed by the client), prints {"ack": offset} once acked, then reads
`message` frames until the one whose data is "last" and prints {"offsets": [...], "own_publish_ack": n}.
Every wait is bounded (30 s)."""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def main(url, token, channel):
    async with asyncio.timeout(30):
        async with connect(url, additional_headers={"Authorization": "Bearer " + token},
                           compression="deflate", max_size=2**20) as ws:
            exts = [e.name for e in ws.protocol.extensions]
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": channel}))
            offsets, ack = [], None
            while True:
                f = json.loads(await ws.recv())
                if f.get("type") == "ack" and f.get("id") == 1:
                    break
            print(json.dumps({"extensions": exts}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await ws.send(json.dumps({"type": "publish", "id": 2, "channel": channel,
                                      "data": {"from": "python", "text": "compressed " * 200}}))
            done = False
            while not done:
                f = json.loads(await ws.recv())
                if f.get("type") == "ack" and f.get("id") == 2:
                    ack = f["offset"]
                    print(json.dumps({"ack": ack}), flush=True)
                elif f.get("type") == "message":
                    offsets.append(f["offset"])
                    done = f["data"] == "last"
                elif f.get("type") == "error":
                    raise SystemExit(f"error frame: {f}")
            print(json.dumps({"offsets": offsets, "own_publish_ack": ack}), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
