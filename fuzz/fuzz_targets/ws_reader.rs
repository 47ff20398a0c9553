//! Arbitrary bytes → the server's WebSocket frame reader (`crier_protocol::ws::Reader`): never
//! panics; fed the same bytes whole or in chunks (the first byte picks the chunk size) it yields
//! the same messages and the same violation; no message exceeds the bound; control payloads fit
//! in 125 bytes. With permessage-deflate on (the first byte's top bit), compressed messages are
//! inflated and the bound holds for their inflated size.
#![no_main]

use crier_protocol::ws::{Incoming, MAX_CONTROL_PAYLOAD, Reader, Violation};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 256;

fn read(bytes: &[u8], chunk: usize, deflate: bool) -> (Vec<Incoming>, Option<Violation>) {
    let mut reader = Reader::new(MAX);
    reader.set_deflate(deflate);
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match reader.next(&mut buf) {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(v) => return (got, Some(v)),
            }
        }
    }
    (got, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else { return };
    // The first byte: permessage-deflate on or off (top bit), and the chunk size.
    let deflate = first & 0x80 != 0;
    let whole = read(bytes, bytes.len(), deflate);
    let chunked = read(bytes, usize::from((first & 0x7f) % 17) + 1, deflate);
    assert_eq!(whole, chunked, "chunking changed the outcome");
    for m in &whole.0 {
        match m {
            Incoming::Text(t) => assert!(t.len() <= MAX),
            Incoming::Binary(b) => assert!(b.len() <= MAX),
            Incoming::Ping(p) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
            Incoming::Close(Some((_, reason))) => assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2),
            Incoming::Close(None) | Incoming::Pong => {}
        }
    }
});
