//! Recovered messages in the form a connection takes, built once per node: a reconnect storm of
//! many clients recovering the same channel would otherwise transcode and compress each missed
//! message once per recovering connection.
//!
//! Per channel, a small cache of the recovered messages' forms (keyed by epoch and offset; one
//! slot per form: MessagePack, and compressed per encoding and server window), at most
//! [`MAX_ENTRIES`] messages and [`MAX_BYTES`] of built forms, the oldest evicted first. A
//! recovering connection finds or adds the message's entry under the channel's shard lock (a
//! lookup), then builds the form it needs *outside* the lock, in the entry's `OnceLock`: a
//! second connection wanting the same form meanwhile waits for that one build instead of
//! making its own. The cache goes with the channel's entry (no local subscriber left) and is
//! only made for channels whose recovering subscribers take another form than the broker's JSON
//! frame. Its bytes are counted hub-wide ([`crate::Hub::recovered_forms_bytes`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use crier_protocol::Encoding;
use crier_protocol::ws::{DEFLATE_WINDOWS, deflate_window_slot};

use super::forms::{compress, out_len, slot_bits};
use crate::broker::Publication;
use crate::outbox::{Out, Outbox};

/// Messages whose forms a channel keeps: a recovery page's worth for a few pages' overlap.
pub(crate) const MAX_ENTRIES: usize = 256;
/// Bytes of built forms a channel keeps at most (the oldest messages go first past it).
pub(crate) const MAX_BYTES: usize = 4 << 20;

/// One recovered message's forms, each built once, by the first connection that needs it.
pub(crate) struct Entry {
    epoch: Arc<str>,
    offset: u64,
    converted: OnceLock<Bytes>,
    /// [JSON, the other encoding] × window slot, as in a fan-out's `Forms`.
    deflated: [[OnceLock<Out>; DEFLATE_WINDOWS]; 2],
    /// Bytes of the forms built so far (also counted in `total`).
    bytes: AtomicUsize,
    total: Arc<AtomicUsize>,
}

impl Entry {
    fn count(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// What to queue for `outbox`'s connection: the frame in its encoding, compressed when it
    /// negotiated permessage-deflate and the frame is large enough (as a live message).
    pub(crate) fn out_for(&self, outbox: &Outbox, json: &Bytes) -> Out {
        let encoding = outbox.encoding();
        let frame = match encoding {
            Encoding::Json => json.clone(),
            other => self
                .converted
                .get_or_init(|| {
                    let f = other.frame_from_json(json);
                    self.count(f.len());
                    f
                })
                .clone(),
        };
        match outbox.deflate_min() {
            Some(min) if frame.len() >= min => {
                let slot = deflate_window_slot(outbox.deflate_window_bits());
                self.deflated[usize::from(encoding != Encoding::Json)][slot]
                    .get_or_init(|| {
                        let out = compress(&frame, slot_bits(slot));
                        self.count(out_len(&out));
                        out
                    })
                    .clone()
            }
            _ => Out::Frame(frame),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.total.fetch_sub(*self.bytes.get_mut(), Ordering::Relaxed);
    }
}

/// A channel's cache of recovered messages' forms, oldest first.
#[derive(Default)]
pub(crate) struct Recovered {
    entries: VecDeque<Arc<Entry>>,
}

impl Recovered {
    /// The entry of `p` (added if missing, evicting the oldest past the bounds).
    pub(crate) fn entry(&mut self, p: &Publication, total: &Arc<AtomicUsize>) -> Arc<Entry> {
        if let Some(e) = self.entries.iter().rev().find(|e| e.offset == p.offset && e.epoch == p.epoch) {
            return e.clone();
        }
        let mut bytes: usize = self.entries.iter().map(|e| e.bytes.load(Ordering::Relaxed)).sum();
        while self.entries.len() >= MAX_ENTRIES || (bytes > MAX_BYTES && !self.entries.is_empty()) {
            if let Some(old) = self.entries.pop_front() {
                bytes = bytes.saturating_sub(old.bytes.load(Ordering::Relaxed));
            }
        }
        let e = Arc::new(Entry {
            epoch: p.epoch.clone(),
            offset: p.offset,
            converted: OnceLock::new(),
            deflated: Default::default(),
            bytes: AtomicUsize::new(0),
            total: total.clone(),
        });
        self.entries.push_back(e.clone());
        e
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn publication(offset: u64) -> Publication {
        let frame = crier_protocol::frames::encode_message("c", "e", offset, &format!("\"{}\"", "x".repeat(100)));
        Publication { offset, epoch: "e".into(), frame, published_at_us: 0 }
    }

    #[test]
    fn bounded_oldest_first_and_counted() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut cache = Recovered::default();
        let o = Outbox::with_encoding(1 << 20, Encoding::MsgPack);
        o.set_deflate(16, 15);
        for offset in 1..=(MAX_ENTRIES as u64 + 10) {
            let p = publication(offset);
            let out = cache.entry(&p, &total).out_for(&o, &p.frame);
            assert!(matches!(out, Out::Deflated(_)));
        }
        assert_eq!(cache.len(), MAX_ENTRIES, "at most MAX_ENTRIES messages");
        assert_eq!(cache.entries.front().unwrap().offset, 11, "the oldest went first");
        let held: usize = cache.entries.iter().map(|e| e.bytes.load(Ordering::Relaxed)).sum();
        assert!(held > 0);
        assert_eq!(total.load(Ordering::Relaxed), held, "the evicted ones are uncounted");
        // The same message again: the same entry, the form not built again.
        let p = publication(100);
        let a = cache.entry(&p, &total).out_for(&o, &p.frame);
        let b = cache.entry(&p, &total).out_for(&o, &p.frame);
        let (Out::Deflated(a), Out::Deflated(b)) = (a, b) else { panic!("compressed") };
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(total.load(Ordering::Relaxed), held);
        drop(cache);
        assert_eq!(total.load(Ordering::Relaxed), 0, "nothing counted once the channel is gone");
    }
}
