use super::*;

#[test]
fn deflate_round_trips_and_bombs_stop_at_the_bound() {
    for msg in
        [&b""[..], b"x", &b"{\"type\":\"message\"}".repeat(500), &(0..=255u8).cycle().take(100_000).collect::<Vec<_>>()]
    {
        let z = deflate(msg).unwrap();
        assert!(!z.ends_with(&DEFLATE_TAIL));
        assert_eq!(inflate(&z, msg.len()).unwrap(), msg);
        if !msg.is_empty() {
            assert_eq!(inflate(&z, msg.len() - 1), Err(Violation::TooBig));
        }
    }
    // 16 MiB of zeros in a few KiB: refused at the bound, not inflated whole.
    let bomb = deflate(&vec![0u8; 16 << 20]).unwrap();
    assert!(bomb.len() < 100_000);
    assert_eq!(inflate(&bomb, 65536), Err(Violation::TooBig));
    assert!(matches!(inflate(&[0xff, 0xff, 0xff], 1000), Err(Violation::Protocol(_))));
}

/// Data whose repeats lie at every distance up to 32 KiB: a compressor that ignores the
/// window limit refers further back than a small window allows.
fn far_repeats() -> Vec<u8> {
    let mut seed = 0x2545_f491_u32;
    let block: Vec<u8> = (0..24_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            b'a' + (seed % 26) as u8
        })
        .collect();
    [&block[..], &block[..], &block[..300], &block[..]].concat()
}

#[test]
fn each_window_decodes_with_exactly_that_window() {
    // Inflates through a 64-byte output buffer, so that every back reference goes through
    // the decompressor's window (in one big output buffer zlib would find it there).
    let strict = |z: &[u8], bits: u8| -> Result<Vec<u8>, flate2::DecompressError> {
        let mut d = Decompress::new_with_window_bits(false, bits);
        let input = [z, &DEFLATE_TAIL[..]].concat();
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        loop {
            let (i, o) = (d.total_in(), d.total_out());
            d.decompress(&input[i as usize..], &mut chunk, FlushDecompress::Sync)?;
            out.extend_from_slice(&chunk[..(d.total_out() - o) as usize]);
            if d.total_in() == i && d.total_out() == o {
                return Ok(out);
            }
        }
    };
    let data = far_repeats();
    let full = deflate(&data).unwrap();
    for bits in 9..=15u8 {
        let z = deflate_window(&data, bits).unwrap();
        assert_eq!(strict(&z, bits).unwrap(), data, "{bits} bits");
        assert_eq!(inflate(&z, data.len()).unwrap(), data);
    }
    // The full window finds the 24 KB repeats; a 512-byte one cannot.
    assert!(full.len() * 2 < deflate_window(&data, 9).unwrap().len());
    // A small window refuses data compressed with a larger one (so the test above can fail).
    assert!(strict(&full, 9).is_err());
    // 8 bits is compressed as 9 (zlib's MAX_DIST keeps every distance within 256 bytes).
    assert_eq!(deflate_window(&data, 8), deflate_window(&data, 9));
    assert_eq!(deflate_window_slot(8), deflate_window_slot(9));
    assert_eq!(deflate_window_slot(15), DEFLATE_WINDOWS - 1);
    assert_eq!(deflate_window(&data, 0).unwrap(), full);
}

#[test]
fn discard_skips_frames_without_keeping_them_until_the_close() {
    let mut d = Discard::default();
    // A 1 MiB frame announced (as a too-big one is), its payload in pieces, then a bogus
    // unmasked frame with a reserved opcode, then the client's close.
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&(1u64 << 20).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    let mut buf = BytesMut::from(&head[..5]);
    assert!(!d.feed(&mut buf));
    assert_eq!(buf.len(), 5, "an incomplete header stays");
    buf.extend_from_slice(&head[5..]);
    for _ in 0..256 {
        buf.extend_from_slice(&[0u8; 4096]);
        assert!(!d.feed(&mut buf));
        assert!(buf.is_empty(), "payload is not kept");
    }
    buf.extend_from_slice(&[0x83, 3, 9, 9, 9]);
    buf.extend_from_slice(&encode_masked(0x88, &1000u16.to_be_bytes(), [5, 6, 7, 8])[..3]);
    assert!(!d.feed(&mut buf));
    buf.extend_from_slice(&[6, 7, 8, 0, 0]);
    assert!(d.feed(&mut buf));
}

#[test]
fn compressed_frames_need_the_extension() {
    let z = deflate(b"hello").unwrap();
    let mut frame = vec![0xc1, 0x80 | z.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&z);
    let mut r = Reader::new(1024);
    assert!(matches!(r.next(&mut BytesMut::from(&frame[..])), Err(Violation::Protocol(_))));
    r.set_deflate(true);
    assert_eq!(r.next(&mut BytesMut::from(&frame[..])), Ok(Some(Incoming::Text("hello".into()))));
    // RSV1 on a control frame, or on a continuation, is a protocol error.
    let ping = [0xc9, 0x80, 0, 0, 0, 0];
    assert!(matches!(r.next(&mut BytesMut::from(&ping[..])), Err(Violation::Protocol(_))));
    // Fragmented: RSV1 on the first frame only.
    let (a, b) = z.split_at(2);
    let mut frames = vec![0x41, 0x80 | a.len() as u8, 0, 0, 0, 0];
    frames.extend_from_slice(a);
    frames.extend_from_slice(&[0x80, 0x80 | b.len() as u8, 0, 0, 0, 0]);
    frames.extend_from_slice(b);
    assert_eq!(r.next(&mut BytesMut::from(&frames[..])), Ok(Some(Incoming::Text("hello".into()))));
    // Inflated text must be UTF-8.
    let z = deflate(&[0xff, 0xfe]).unwrap();
    let mut frame = vec![0xc1, 0x80 | z.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&z);
    assert_eq!(r.next(&mut BytesMut::from(&frame[..])), Err(Violation::InvalidUtf8));
}
