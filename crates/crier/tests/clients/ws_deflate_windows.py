"""Python `websockets` offering permessage-deflate with server_max_window_bits (and
client_max_window_bits), for crates/crier/tests/deflate.rs. Usage: ws_deflate_windows.py WS_URL
TOKEN CHANNEL BITS...

For each BITS: connects offering `server_max_window_bits=BITS` (websockets rejects a response
that does not echo it, RFC 7692 §7.1.2.1, and then inflates with exactly that window), publishes a
message whose repeats lie far apart (so the window matters), reads it back from its own
subscription and prints one JSON line {"bits", "remote_max_window_bits", "same"}. Every wait is
bounded (30 s)."""

import asyncio
import json
import random
import sys

from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory


async def one(url, token, channel, bits, seq):
    rnd = random.Random(seq)
    block = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6000))
    data = {"seq": seq, "a": block, "b": block, "c": block[:200] + block}
    factory = ClientPerMessageDeflateFactory(server_max_window_bits=bits,
                                             client_max_window_bits=max(bits, 9))
    async with connect(url, additional_headers={"Authorization": "Bearer " + token},
                       extensions=[factory], compression=None, max_size=2**20) as ws:
        exts = ws.protocol.extensions
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": channel}))
        await ws.send(json.dumps({"type": "publish", "id": 2, "channel": channel, "data": data}))
        while True:
            f = json.loads(await ws.recv())
            if f.get("type") == "error":
                raise SystemExit(f"error frame: {f}")
            if f.get("type") == "message" and f["data"].get("seq") == seq:
                break
        print(json.dumps({"bits": bits, "extensions": [e.name for e in exts],
                          "remote_max_window_bits": exts[0].remote_max_window_bits if exts else None,
                          "same": f["data"] == data}), flush=True)


async def main(url, token, channel, bits):
    async with asyncio.timeout(30):
        for seq, b in enumerate(bits):
            await one(url, token, channel, b, seq)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], [int(b) for b in sys.argv[4:]]))
