//! WebSocket framing (RFC 6455), server side, without I/O.
//!
//! [`Reader`] takes client messages off the front of a byte buffer: it checks every rule a
//! server must enforce (masking, reserved bits and opcodes, control-frame limits, fragmentation,
//! UTF-8 of text messages and close reasons, close codes, the message size bound before the
//! payload arrives) and reassembles fragmented messages. [`encode_frame`] and [`encode_close`]
//! write unmasked server frames.
//!
//! Why crier frames WebSockets itself instead of using tungstenite: a connection then owns no
//! buffer while it is idle. The server reads into a stack buffer and keeps bytes only while a
//! frame is incomplete; it writes shared, already-encoded frames straight from the outbox. With
//! tungstenite every connection kept a read buffer, a write buffer the size of its largest
//! batch, a copy of its configuration and two waker proxies for its whole life, and every
//! outgoing frame was validated as UTF-8 once per subscriber (see BENCHMARKS.md for the figures).
//! permessage-deflate (RFC 7692) when the transport negotiated it ([`Reader::set_deflate`]):
//! compressed client messages (RSV1) are inflated here, bounded by the size limit, with a
//! fresh window per message (crier asks for `client_no_context_takeover`); [`deflate_window`]
//! compresses a server message without context takeover in the window a connection negotiated
//! (`server_max_window_bits`), so one result serves every connection with that window.
//! [`Discard`] skips what a client still sends after the server failed the connection.

use std::cell::RefCell;

use crate::codes::CloseCode;
use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Frame opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_BYTES: usize = 14;
/// Largest payload of a control frame.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why a connection must be closed; [`Violation::close_code`] is the code RFC 6455 prescribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// 1002: the bytes break the framing rules.
    Protocol(&'static str),
    /// 1009: a frame or a reassembled message is larger than the bound.
    TooBig,
    /// 1007: a text message or a close reason is not UTF-8.
    InvalidUtf8,
    /// 1008: a message (a fragmented one, or one frame's payload) was not completed within the
    /// bound its reader's user enforces (see [`Reader::assembly_mark`]).
    Unfinished,
}

impl Violation {
    pub fn close_code(self) -> CloseCode {
        match self {
            Violation::Protocol(_) => CloseCode::PROTOCOL_ERROR,
            Violation::TooBig => CloseCode::TOO_BIG,
            Violation::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            Violation::Unfinished => CloseCode::POLICY,
        }
    }

    /// The close frame's reason: the rule broken, or the close code's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Violation::Protocol(why) => why,
            Violation::Unfinished => "message not completed in time",
            other => other.close_code().reason(),
        }
    }
}

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// A binary message (the MessagePack encoding's frames).
    Binary(Vec<u8>),
    /// A ping; its payload is owed back in a pong.
    Ping(Vec<u8>),
    Pong,
    /// The client's close: its code and reason, if it gave a code.
    Close(Option<(u16, String)>),
}

struct Header {
    fin: bool,
    /// RSV1: the message is compressed (permessage-deflate).
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

/// The payload length a frame header at the front of `buf` announces (its second byte and the
/// extended length after it), and where the length ends; `None` if more bytes are needed.
fn payload_len(buf: &[u8]) -> Option<(u64, usize)> {
    Some(match *buf.get(1)? & 0x7F {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    })
}

/// Parses a frame header from the front of `buf`; `Ok(None)` if more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(Violation::Protocol("reserved bits set without an extension"));
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(Violation::Protocol("reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(Violation::Protocol("unmasked frame from a client"));
    }
    let Some((payload_len, at)) = payload_len(buf) else { return Ok(None) };
    if payload_len >> 63 != 0 {
        return Err(Violation::Protocol("frame length with the most significant bit set"));
    }
    let Some(m) = buf.get(at..at + 4) else { return Ok(None) };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        header_len: at + 4,
        payload_len,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Close codes a peer may send (RFC 6455 §7.4; 1005, 1006 and 1015 are never sent on the wire).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn parse_close(payload: Vec<u8>) -> Result<Incoming, Violation> {
    match payload.len() {
        0 => Ok(Incoming::Close(None)),
        1 => Err(Violation::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(Violation::Protocol("invalid close code"));
            }
            let reason = String::from_utf8(payload[2..].to_vec()).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Incoming::Close(Some((code, reason))))
        }
    }
}

/// Reassembles client messages; see the module docs. Holds bytes only for a fragmented message
/// in progress.
#[derive(Debug)]
pub struct Reader {
    /// A fragmented message being assembled: its opcode and its payload so far (boxed: rare,
    /// and the reader lives in every connection).
    /// (The opcode has [`COMPRESSED`] set when the message's first frame had RSV1.)
    partial: Option<Box<(u8, Vec<u8>)>>,
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// When the unfinished message began, in the caller's clock (0: none); kept here, in the
    /// padding after `deflate`, so bounding a message's time costs a connection no byte.
    mark: u32,
    /// A close frame was taken (valid or not): the client sends nothing more.
    saw_close: bool,
}

/// Marks a partial message as compressed (in the stored opcode's unused bits).
const COMPRESSED: u8 = 0x40;

impl Reader {
    /// A reader refusing frames and messages over `max_message` bytes (1009).
    pub fn new(max_message: usize) -> Reader {
        Reader { partial: None, max_message, deflate: false, mark: 0, saw_close: false }
    }

    /// Whether a fragmented message is being assembled (its fragments so far are held here).
    pub fn is_assembling(&self) -> bool {
        self.partial.is_some()
    }

    /// The caller's record of when the unfinished message began (0: none). The reader never
    /// reads a clock; its user sets this when a message starts to wait for more bytes, clears it
    /// when none waits, and refuses the connection ([`Violation::Unfinished`]) when it is too old.
    pub fn assembly_mark(&self) -> u32 {
        self.mark
    }

    pub fn set_assembly_mark(&mut self, mark: u32) {
        self.mark = mark;
    }

    /// Whether the client's close frame was taken off the buffer, even one that broke a rule
    /// (a one-byte payload, an invalid code or reason): the client has finished sending, so a
    /// server failing the connection has nothing left to read (RFC 6455 §5.5.1).
    pub fn saw_close(&self) -> bool {
        self.saw_close
    }

    /// permessage-deflate was negotiated: accept compressed messages (RSV1 on a message's first
    /// frame), inflated with the size bound applied to the inflated size.
    pub fn set_deflate(&mut self, on: bool) {
        self.deflate = on;
    }

    /// Takes the next complete message off the front of `buf`, removing the bytes it used (in
    /// O(1): many small frames in one read cost no repeated moves of the rest); `Ok(None)` when
    /// `buf` holds no complete message yet (what it holds stays there, except complete
    /// fragments, which move into the reader). A frame announcing more than the bound is
    /// refused as soon as its header is in, before its payload.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, Violation> {
        loop {
            let Some(h) = parse_header(buf)? else { return Ok(None) };
            let control = h.opcode & 0x8 != 0;
            if h.rsv1 && (!self.deflate || control || h.opcode == OP_CONTINUATION) {
                return Err(Violation::Protocol(if self.deflate {
                    "RSV1 set on a control or continuation frame"
                } else {
                    "reserved bits set without an extension"
                }));
            }
            if control {
                if !h.fin {
                    return Err(Violation::Protocol("fragmented control frame"));
                }
                if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frame over 125 bytes"));
                }
            } else {
                match (h.opcode, &self.partial) {
                    (OP_CONTINUATION, None) => {
                        return Err(Violation::Protocol("continuation frame with nothing to continue"));
                    }
                    (OP_TEXT | OP_BINARY, Some(_)) => {
                        return Err(Violation::Protocol("new message inside a fragmented one"));
                    }
                    _ => {}
                }
                let so_far = self.partial.as_ref().map_or(0, |p| p.1.len()) as u64;
                if so_far.saturating_add(h.payload_len) > self.max_message as u64 {
                    return Err(Violation::TooBig);
                }
            }
            // Bounded by max_message (data) or 125 (control), so it fits in usize.
            let end = h.header_len + h.payload_len as usize;
            if buf.len() < end {
                return Ok(None);
            }
            let mut payload = buf[h.header_len..end].to_vec();
            buf.advance(end);
            unmask(&mut payload, h.mask);
            let message = match h.opcode {
                OP_PING => Incoming::Ping(payload),
                OP_PONG => Incoming::Pong,
                OP_CLOSE => {
                    self.saw_close = true;
                    parse_close(payload)?
                }
                OP_CONTINUATION => {
                    let Some(mut partial) = self.partial.take() else {
                        return Err(Violation::Protocol("continuation frame with nothing to continue"));
                    };
                    partial.1.extend_from_slice(&payload);
                    if !h.fin {
                        self.partial = Some(partial);
                        continue;
                    }
                    let (opcode, acc) = *partial;
                    finish(opcode, acc, self.max_message)?
                }
                opcode if h.fin => finish(opcode | if h.rsv1 { COMPRESSED } else { 0 }, payload, self.max_message)?,
                opcode => {
                    self.partial = Some(Box::new((opcode | if h.rsv1 { COMPRESSED } else { 0 }, payload)));
                    continue;
                }
            };
            return Ok(Some(message));
        }
    }
}

fn finish(opcode: u8, payload: Vec<u8>, max_message: usize) -> Result<Incoming, Violation> {
    let payload = if opcode & COMPRESSED != 0 { inflate(&payload, max_message)? } else { payload };
    if opcode & !COMPRESSED == OP_TEXT {
        String::from_utf8(payload).map(Incoming::Text).map_err(|_| Violation::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(payload))
    }
}

/// How many distinct server windows [`deflate_window`] compresses with (9 to 15 bits; 8 is
/// served by 9, see there): a fan-out keeps at most this many compressed forms per encoding.
pub const DEFLATE_WINDOWS: usize = 7;

/// The slot of a negotiated `server_max_window_bits` (8..=15, anything else counts as 15) among
/// the [`DEFLATE_WINDOWS`] forms: 8 and 9 share one, see [`deflate_window`].
pub fn deflate_window_slot(window_bits: u8) -> usize {
    usize::from(compress_window_bits(window_bits) - 9)
}

/// The window zlib compresses with for a negotiated `server_max_window_bits`: zlib (and
/// zlib-rs) refuse a raw deflate window of 8 bits, and with 9 bits they never emit a distance
/// over 512 − 262 = 250 bytes (`MAX_DIST`), which a 256-byte (8-bit) window decodes.
fn compress_window_bits(window_bits: u8) -> u8 {
    match window_bits {
        8..=15 => window_bits.max(9),
        _ => 15,
    }
}

thread_local! {
    /// One inflater per thread and one deflater per thread and server window (made on first
    /// use), reset for every message (no context takeover either way): a connection keeps no
    /// compression state, and no message pays for allocating one. The inflater's 32 KiB window
    /// reads any client window (8..15 bits).
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    static DEFLATERS: RefCell<[Option<Compress>; DEFLATE_WINDOWS]> = const { RefCell::new([const { None }; DEFLATE_WINDOWS]) };
}

/// The deflate level of server messages. zlib-rs's level 1 (its "quick" strategy: static
/// Huffman codes) made a 1.8 KB JSON frame 388 bytes in ~3.5 µs; level 2 makes it 289 bytes in
/// ~21 µs (miniz_oxide's level 1, used before: 301 bytes, ~84 µs). One compression per message
/// per node and window, so the smaller frames win.
const DEFLATE_LEVEL: u32 = 2;

/// The tail RFC 7692 §7.2.2 strips from a compressed message and a receiver appends.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflates a permessage-deflate message (without its tail); more than `max` bytes out is
/// [`Violation::TooBig`] (a deflate bomb stops there), corrupt data a protocol error.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, Violation> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out = Vec::with_capacity((compressed.len() * 4).clamp(64, max.max(64)));
        for input in [compressed, &DEFLATE_TAIL[..]] {
            let mut at = 0;
            loop {
                if out.len() == out.capacity() {
                    // Grow (doubling), never past one byte over the bound.
                    let room = (max + 1).saturating_sub(out.len());
                    out.reserve(out.len().max(64).min(room).max(1));
                }
                let (before_in, before_out) = (d.total_in(), out.len());
                let status = d
                    .decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| Violation::Protocol("invalid compressed data"))?;
                at += (d.total_in() - before_in) as usize;
                if out.len() > max {
                    return Err(Violation::TooBig);
                }
                let stalled = d.total_in() == before_in && out.len() == before_out;
                match status {
                    Status::StreamEnd => break,
                    // Done with this input once it is consumed and there was room to spare.
                    _ if at >= input.len() && out.len() < out.capacity() => break,
                    _ if stalled && out.len() < out.capacity() => {
                        return Err(Violation::Protocol("invalid compressed data"));
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    })
}

/// Compressing failed (the compressor reported an error or stopped making progress): the
/// message must go uncompressed, never as a truncated or empty compressed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateError;

impl std::fmt::Display for DeflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("permessage-deflate compression failed")
    }
}

impl std::error::Error for DeflateError {}

/// Compresses a message for permessage-deflate with no context takeover (RFC 7692 §7.2.1) and
/// the full 32 KiB window: [`deflate_window`] with 15 bits.
pub fn deflate(message: &[u8]) -> Result<Vec<u8>, DeflateError> {
    deflate_window(message, 15)
}

/// Compresses a message for permessage-deflate with no context takeover (RFC 7692 §7.2.1),
/// referring back at most `2^window_bits` bytes (the `server_max_window_bits` a connection
/// negotiated, 8..=15; other values mean 15): the result (tail stripped) decodes on its own, so
/// one compression serves every connection with that window. On [`DeflateError`] the caller
/// sends the message uncompressed (RFC 7692 lets any message go so).
pub fn deflate_window(message: &[u8], window_bits: u8) -> Result<Vec<u8>, DeflateError> {
    let slot = deflate_window_slot(window_bits);
    DEFLATERS.with(|cs| {
        let mut cs = cs.borrow_mut();
        let c = cs[slot].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(DEFLATE_LEVEL), false, compress_window_bits(window_bits))
        });
        c.reset();
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        let mut at = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len().max(64));
            }
            let (before_in, before_out) = (c.total_in(), out.len());
            // zlib-rs's errors are not expected for in-memory buffers; should one happen the
            // message goes uncompressed (the caller's choice), never as a broken frame.
            if c.compress_vec(&message[at..], &mut out, FlushCompress::Sync).is_err() {
                return Err(DeflateError);
            }
            at += (c.total_in() - before_in) as usize;
            // A sync flush is complete once all input is in and output had room left.
            if at >= message.len() && out.len() < out.capacity() {
                break;
            }
            if c.total_in() == before_in && out.len() == before_out && out.len() < out.capacity() {
                return Err(DeflateError);
            }
        }
        // A sync flush always ends with the tail; without it the output is not what it claims.
        if !out.ends_with(&DEFLATE_TAIL) {
            return Err(DeflateError);
        }
        out.truncate(out.len() - DEFLATE_TAIL.len());
        Ok(out)
    })
}

/// What a server does with client bytes after it failed the connection (RFC 6455 §7.1.7) and
/// sent its close frame: it reads on, so that unread data does not turn the close into a TCP
/// reset the client sees instead of the close code, and skips every frame without keeping its
/// payload, until the client's close frame (its header is enough). Frame headers are read
/// leniently (any opcode, masked or not): the violation may have been in one.
#[derive(Debug, Default)]
pub struct Discard {
    /// Payload bytes of the current frame still to skip.
    skip: u64,
}

impl Discard {
    /// Skips what `buf` holds (consuming it, keeping at most an incomplete header); `true` once
    /// the header of a close frame is in (`buf` then still starts with it).
    pub fn feed(&mut self, buf: &mut BytesMut) -> bool {
        loop {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(buf.len());
                buf.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return false;
                }
            }
            let [b0, b1, ..] = buf[..] else { return false };
            let Some((len, at)) = payload_len(&buf[..]) else { return false };
            let at = at + if b1 & 0x80 != 0 { 4 } else { 0 };
            if buf.len() < at {
                return false;
            }
            if b0 & 0x0F == OP_CLOSE {
                return true;
            }
            buf.advance(at);
            self.skip = len;
        }
    }
}

/// Bytes [`encode_frame`] adds in front of a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes the header of an unmasked, final server frame into `out`; returns its length.
pub fn encode_header(out: &mut [u8; 10], opcode: u8, len: usize) -> usize {
    out[0] = 0x80 | opcode;
    match len {
        0..=125 => {
            out[1] = len as u8;
            2
        }
        126..=65535 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

/// Appends an unmasked, final server frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let mut header = [0u8; 10];
    let n = encode_header(&mut header, opcode, payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

/// A client → server frame, masked as RFC 6455 requires of clients: `first_byte` carries FIN,
/// RSV1 and the opcode as given. Used by crier's own test and bench clients that need frames a
/// WebSocket library would not send (fragments, compressed messages, protocol violations).
pub fn encode_masked(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MAX_HEADER_BYTES + payload.len());
    f.push(first_byte);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Appends a close frame; the reason is cut (on a character boundary) to fit in 123 bytes.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(out, OP_CLOSE, &payload);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod deflate_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
