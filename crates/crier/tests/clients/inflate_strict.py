"""Strict permessage-deflate inflation for crates/crier/tests/deflate.rs: each stdin line is
`BITS HEX` (a compressed message, tail stripped); each stdout line is the inflated message in
hex, or `error: ...`. zlib.decompressobj(-BITS) is given at most 64 output bytes per call, so
every back reference longer than that goes through its window of 2**BITS bytes: data that
refers further back fails ("invalid distance too far back")."""

import sys
import zlib

for line in sys.stdin:
    bits, data = line.split()
    d = zlib.decompressobj(-int(bits))
    data = bytes.fromhex(data) + b"\x00\x00\xff\xff"
    out = bytearray()
    try:
        while data:
            out += d.decompress(data, 64)
            data = d.unconsumed_tail
        print(out.hex(), flush=True)
    except zlib.error as e:
        print("error: %s" % e, flush=True)
