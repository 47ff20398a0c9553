use super::*;
use proptest::prelude::*;

/// A client frame, masked.
fn client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let mut p = payload.to_vec();
    unmask(&mut p, mask);
    out.extend(p);
    out
}

#[test]
fn masked_client_frames_read_back_at_every_length_class() {
    for len in [0usize, 125, 126, 65_535, 65_536] {
        let text = "a".repeat(len);
        let bytes = encode_masked(0x80 | OP_TEXT, text.as_bytes(), [9, 8, 7, 6]);
        assert_eq!(read_all(&bytes, 1 << 20), Ok(vec![Incoming::Text(text)]), "length {len}");
    }
}

fn read_all(bytes: &[u8], max: usize) -> Result<Vec<Incoming>, Violation> {
    let mut r = Reader::new(max);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(m) = r.next(&mut buf)? {
        out.push(m);
    }
    Ok(out)
}

const M: [u8; 4] = [1, 2, 3, 4];

#[test]
#[cfg(target_pointer_width = "64")]
fn the_unfinished_message_mark_costs_the_reader_no_byte() {
    // It lives in the padding after `deflate`: a reader is the size it was without it.
    assert_eq!(std::mem::size_of::<Reader>(), 3 * std::mem::size_of::<usize>());
}

#[test]
fn messages_control_frames_and_fragments() {
    let mut bytes = client(true, OP_TEXT, b"hello", M);
    bytes.extend(client(false, OP_TEXT, "caf".as_bytes(), M));
    bytes.extend(client(true, OP_PING, b"p", M));
    bytes.extend(client(false, OP_CONTINUATION, &"é!".as_bytes()[..1], M));
    bytes.extend(client(true, OP_CONTINUATION, &"é!".as_bytes()[1..], M));
    bytes.extend(client(true, OP_BINARY, &[0, 255], M));
    bytes.extend(client(true, OP_PONG, b"", M));
    bytes.extend(client(true, OP_CLOSE, &[0x03, 0xE8, b'o', b'k'], M));
    let got = read_all(&bytes, 1024).unwrap();
    assert_eq!(
        got,
        vec![
            Incoming::Text("hello".into()),
            Incoming::Ping(b"p".to_vec()),
            Incoming::Text("café!".into()),
            Incoming::Binary(vec![0, 255]),
            Incoming::Pong,
            Incoming::Close(Some((1000, "ok".into()))),
        ]
    );
}

#[test]
fn every_violation_has_its_code() {
    let mut unmasked = client(true, OP_TEXT, b"x", M);
    unmasked[1] &= 0x7F;
    let mut rsv = client(true, OP_TEXT, b"x", M);
    rsv[0] |= 0x40;
    let mut huge = vec![0x81, 0xFF];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (unmasked, 1002),
        (rsv, 1002),
        (client(true, 0x3, b"x", M), 1002),
        (client(true, 0xB, b"x", M), 1002),
        (client(true, OP_CONTINUATION, b"x", M), 1002),
        ([client(false, OP_TEXT, b"a", M), client(true, OP_TEXT, b"b", M)].concat(), 1002),
        (client(false, OP_PING, b"x", M), 1002),
        (client(true, OP_PING, &[0; 126], M), 1002),
        (client(true, OP_CLOSE, &[3], M), 1002),
        (client(true, OP_CLOSE, &1005u16.to_be_bytes(), M), 1002),
        (client(true, OP_CLOSE, &[0x03, 0xE8, 0xFF], M), 1007),
        (huge, 1002),
        (client(true, OP_TEXT, &[0xC3, 0x28], M), 1007),
        ([client(false, OP_TEXT, b"ok", M), client(true, OP_CONTINUATION, &[0xC3], M)].concat(), 1007),
        (client(true, OP_TEXT, &[b' '; 11], M), 1009),
        ([client(false, OP_TEXT, &[b' '; 6], M), client(true, OP_CONTINUATION, &[b' '; 6], M)].concat(), 1009),
    ];
    for (i, (bytes, code)) in cases.into_iter().enumerate() {
        assert_eq!(read_all(&bytes, 10).map_err(|v| v.close_code().0), Err(code), "case {i}");
    }
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    let mut header = vec![0x81, 0xFF];
    header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    header.extend_from_slice(&M);
    assert_eq!(Reader::new(1 << 20).next(&mut BytesMut::from(&header[..])), Err(Violation::TooBig));
}

#[test]
fn server_frames_have_the_right_headers() {
    for len in [0usize, 125, 126, 65535, 65536] {
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, &vec![b'x'; len]);
        assert_eq!(out.len(), header_len(len) + len);
        assert_eq!(out[0], 0x81);
    }
    let mut out = Vec::new();
    encode_close(&mut out, 4009, &"é".repeat(100));
    assert!(out.len() <= 2 + MAX_CONTROL_PAYLOAD);
    assert!(std::str::from_utf8(&out[4..]).is_ok(), "cut on a character boundary");
}

proptest! {
    /// Messages cut into fragments and delivered in arbitrary chunks come out whole, once.
    #[test]
    fn fragments_in_any_chunks_reassemble(
        texts in proptest::collection::vec(".{0,40}", 1..6),
        cuts in proptest::collection::vec(1usize..4, 1..6),
        chunk in 1usize..30,
        mask in any::<[u8; 4]>(),
    ) {
        let mut bytes = Vec::new();
        for (t, parts) in texts.iter().zip(cuts.iter().cycle()) {
            let b = t.as_bytes();
            let step = b.len().div_ceil(*parts).max(1);
            let pieces: Vec<&[u8]> = if b.is_empty() { vec![b] } else { b.chunks(step).collect() };
            for (i, p) in pieces.iter().enumerate() {
                let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                bytes.extend(client(i + 1 == pieces.len(), op, p, mask));
            }
        }
        let mut r = Reader::new(1 << 16);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for c in bytes.chunks(chunk) {
            buf.extend_from_slice(c);
            while let Some(m) = r.next(&mut buf).unwrap() {
                got.push(m);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, texts.into_iter().map(Incoming::Text).collect::<Vec<_>>());
    }

    /// Arbitrary bytes never panic and never hold more than the bound plus a header.
    #[test]
    fn arbitrary_bytes_are_refused_or_wait(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut r = Reader::new(64);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = r.next(&mut buf) {}
    }
}
