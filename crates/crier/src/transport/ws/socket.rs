//! The upgraded WebSocket socket: reads client messages and writes server frames, holding no
//! buffer while idle.
//!
//! Reads go into a buffer on the stack; only the bytes of an incomplete frame are kept (in
//! `rbuf`, freed once a message completes). Writes go straight from the outbox's shared frames to
//! the socket with one `sendmsg` per batch; only what the socket does not take at once is copied
//! (into `wbuf`, freed once written). Framing rules live in [`crier_protocol::ws`].
//!
//! The socket calls are `sendmsg`/`send`/`recv` (through socket2) rather than tokio's
//! `writev`/`write`/`read`: the socket calls skip the VFS layer (`fdget_pos`, `vfs_writev`),
//! which took ~10% of the gateway's CPU in a fan-out profile (`perf record`, 10,000 subscribers).

use std::io::{self, Read};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use crier_core::Out;
use crier_protocol::ws::{self as frame, Incoming, Violation};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::transport::poll_io;

/// Bytes read from the socket per read call (on the stack).
const READ_CHUNK: usize = 4096;
/// How long a client message may stay unfinished (a fragmented message, or a frame whose
/// payload is still arriving) while the client keeps sending: then 1008. Bytes held meanwhile
/// are bounded by `max_message_bytes` (the fragments) plus one frame's.
pub const MESSAGE_ASSEMBLY_TIMEOUT_S: u32 = 10;
/// Frames per `sendmsg` (each takes two slices). Small: the slice and header arrays are
/// initialised on every write, and most batches hold one to a few frames.
const FRAMES_PER_WRITE: usize = 16;

/// What ended reading.
#[derive(Debug)]
pub enum ReadError {
    /// The client broke a framing rule: close with the violation's code.
    Violation(Violation),
    Io(io::Error),
}

/// A server-side WebSocket over a TCP stream; see the module docs.
pub struct WsSocket {
    io: TcpStream,
    reader: frame::Reader,
    /// Bytes of an incomplete frame (empty, without allocation, between messages).
    rbuf: BytesMut,
    /// Bytes the socket did not take yet, and how many of them were written.
    wbuf: Vec<u8>,
    written: usize,
    /// The payload of the last ping still owed a pong (only the latest is answered, RFC 6455 §5.5.3).
    pong: Option<Box<[u8]>>,
}

impl WsSocket {
    /// `leftover`: bytes the HTTP layer read past the upgrade request (a client may send its
    /// first frame without waiting for the 101).
    pub fn new(io: TcpStream, leftover: Bytes, max_message: usize, deflate: bool) -> WsSocket {
        let mut reader = frame::Reader::new(max_message);
        reader.set_deflate(deflate);
        WsSocket { io, reader, rbuf: BytesMut::from(&leftover[..]), wbuf: Vec::new(), written: 0, pong: None }
    }

    /// The next message; `Ok(None)` when the client's stream ended. A ping is answered (the pong
    /// goes out with the next write) and also reported.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Incoming>, ReadError>> {
        loop {
            if !self.rbuf.is_empty() {
                match self.reader.next(&mut self.rbuf) {
                    Ok(Some(message)) => {
                        if self.rbuf.is_empty() {
                            self.rbuf = BytesMut::new();
                        }
                        // A message came out whole, and none is half assembled: whatever is
                        // left in the buffer is the start of the next one.
                        if !self.reader.is_assembling() {
                            self.reader.set_assembly_mark(0);
                        }
                        if let Err(v) = self.check_unfinished() {
                            return Poll::Ready(Err(ReadError::Violation(v)));
                        }
                        if let Incoming::Ping(payload) = &message {
                            self.pong = Some(payload.as_slice().into());
                        }
                        return Poll::Ready(Ok(Some(message)));
                    }
                    Ok(None) => {
                        if let Err(v) = self.check_unfinished() {
                            return Poll::Ready(Err(ReadError::Violation(v)));
                        }
                    }
                    Err(v) => return Poll::Ready(Err(ReadError::Violation(v))),
                }
            }
            // The stack buffer lives inside the call, which runs only once the socket is
            // readable: zeroing it on every wake-up was 60% of a fan-out's user-space instructions.
            let rbuf = &mut self.rbuf;
            let read = poll_io(&self.io, cx, Interest::READABLE, |io| {
                let mut chunk = [0u8; READ_CHUNK];
                let n = (&*SockRef::from(io)).read(&mut chunk)?;
                rbuf.extend_from_slice(&chunk[..n]);
                Ok(n)
            });
            match ready!(read) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
            }
        }
    }

    /// Bounds how long a message stays unfinished: the clock starts when bytes of a message
    /// wait for more (fragments in the reader, or a partial frame) and stops when the message
    /// completes (a message that follows in the same read starts its own clock); past
    /// [`MESSAGE_ASSEMBLY_TIMEOUT_S`] the connection is refused (checked whenever the client
    /// sends something, e.g. a ping between fragments; a client that sends nothing more is
    /// closed by the heartbeat).
    fn check_unfinished(&mut self) -> Result<(), Violation> {
        if !self.reader.is_assembling() && self.rbuf.is_empty() {
            self.reader.set_assembly_mark(0);
            return Ok(());
        }
        // Seconds on the process's monotonic clock, never 0.
        let now = (crier_core::clock_ms() / 1000) as u32 + 1;
        match self.reader.assembly_mark() {
            0 => self.reader.set_assembly_mark(now),
            since if now.saturating_sub(since) >= MESSAGE_ASSEMBLY_TIMEOUT_S => {
                metrics::counter!(crate::metrics::MESSAGE_ASSEMBLY_TIMEOUTS).increment(1);
                return Err(Violation::Unfinished);
            }
            _ => {}
        }
        Ok(())
    }

    /// The connection stopped reading (backpressure: frames wait behind a request in flight).
    /// That time is the server's, not the client's: the unfinished-message clock starts again
    /// when reading resumes, so a client is never closed 1008 for bytes the server did not read.
    pub fn reading_paused(&mut self) {
        self.reader.set_assembly_mark(0);
    }

    /// The client sent its close frame (even an invalid one): nothing more will come.
    pub fn peer_closed(&self) -> bool {
        self.reader.saw_close()
    }

    /// After a violation: reads and drops what the client still sends ([`frame::Discard`]: no
    /// payload is kept, at most an incomplete frame header) until its close frame (`Ok(true)`)
    /// or the end of its stream (`Ok(false)`).
    pub fn poll_discard(&mut self, cx: &mut Context<'_>, discard: &mut frame::Discard) -> Poll<io::Result<bool>> {
        loop {
            if discard.feed(&mut self.rbuf) {
                return Poll::Ready(Ok(true));
            }
            let rbuf = &mut self.rbuf;
            let read = poll_io(&self.io, cx, Interest::READABLE, |io| {
                let mut chunk = [0u8; READ_CHUNK];
                let n = (&*SockRef::from(io)).read(&mut chunk)?;
                rbuf.extend_from_slice(&chunk[..n]);
                Ok(n)
            });
            if ready!(read)? == 0 {
                return Poll::Ready(Ok(false));
            }
        }
    }

    /// True while bytes wait to be written (a pong counts).
    pub fn is_writing(&self) -> bool {
        self.written < self.wbuf.len() || self.pong.is_some()
    }

    /// Writes what waits; `Ready(Ok)` once everything is out (the buffer is then freed).
    pub fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.written == self.wbuf.len()
            && let Some(payload) = self.pong.take()
        {
            self.wbuf.clear();
            self.written = 0;
            frame::encode_frame(&mut self.wbuf, frame::OP_PONG, &payload);
        }
        while self.written < self.wbuf.len() {
            let rest = &self.wbuf[self.written..];
            let n = ready!(poll_io(&self.io, cx, Interest::WRITABLE, |io| SockRef::from(io).send(rest)))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.wbuf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Starts writing a batch (call only when [`WsSocket::is_writing`] is false): frames go out
    /// with `sendmsg` straight from their shared bytes; whatever the socket does not take now is
    /// copied into the write buffer for [`WsSocket::poll_write_pending`]. `text`: the frames are
    /// text (the connection's encoding says so), else binary.
    pub fn write_batch(&mut self, cx: &mut Context<'_>, batch: &[Out], text: bool) -> io::Result<()> {
        let data_op = if text { frame::OP_TEXT } else { frame::OP_BINARY };
        let mut rest = batch;
        while !rest.is_empty() {
            let (now, later) = rest.split_at(rest.len().min(FRAMES_PER_WRITE));
            let mut headers = [[0u8; 10]; FRAMES_PER_WRITE];
            let mut lens = [0usize; FRAMES_PER_WRITE];
            for (i, out) in now.iter().enumerate() {
                let (op, payload, rsv1) = parts(out, data_op);
                lens[i] = frame::encode_header(&mut headers[i], op, payload.len());
                if rsv1 {
                    headers[i][0] |= RSV1;
                }
            }
            let mut slices = [io::IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let mut total = 0;
            for (i, out) in now.iter().enumerate() {
                let payload = parts(out, data_op).1;
                slices[2 * i] = io::IoSlice::new(&headers[i][..lens[i]]);
                slices[2 * i + 1] = io::IoSlice::new(payload);
                total += lens[i] + payload.len();
            }
            let slices = &slices[..2 * now.len()];
            let written = match poll_io(&self.io, cx, Interest::WRITABLE, |io| SockRef::from(io).send_vectored(slices))
            {
                Poll::Ready(Ok(0)) if total > 0 => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => 0,
            };
            if written < total {
                // The socket is full: keep the unwritten tail (this chunk's, then the rest).
                let mut skip = written;
                for s in slices {
                    let take = skip.min(s.len());
                    skip -= take;
                    self.wbuf.extend_from_slice(&s[take..]);
                }
                for out in later {
                    let (op, payload, rsv1) = parts(out, data_op);
                    let mut header = [0u8; 10];
                    let n = frame::encode_header(&mut header, op, payload.len());
                    if rsv1 {
                        header[0] |= RSV1;
                    }
                    self.wbuf.extend_from_slice(&header[..n]);
                    self.wbuf.extend_from_slice(payload);
                }
                self.written = 0;
                return Ok(());
            }
            rest = later;
        }
        Ok(())
    }

    /// Queues a close frame (with a code and reason, or empty) after whatever waits.
    pub fn queue_close(&mut self, close: Option<(u16, &str)>) {
        match close {
            Some((code, reason)) => frame::encode_close(&mut self.wbuf, code, reason),
            None => frame::encode_frame(&mut self.wbuf, frame::OP_CLOSE, &[]),
        }
    }
}

/// The first header byte's RSV1 bit: a permessage-deflate compressed message.
const RSV1: u8 = 0x40;

/// A queued item's opcode, payload and whether it is compressed.
fn parts(out: &Out, data_op: u8) -> (u8, &[u8], bool) {
    match out {
        Out::Frame(bytes) => (data_op, bytes, false),
        Out::Deflated(bytes) => (data_op, bytes, true),
        Out::Ping => (frame::OP_PING, &[], false),
    }
}
