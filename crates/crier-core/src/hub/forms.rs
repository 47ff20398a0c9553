//! The forms of one shared frame a channel's subscribers take: the broker's JSON frame itself,
//! its MessagePack form, and each of these compressed for permessage-deflate per server window
//! in use. Each form is built once per fan-out (once per message per node) and shared as
//! [`Bytes`] by every subscriber that takes it.
//!
//! A channel remembers which forms its subscribers need ([`Needs`], exact after each fan-out:
//! the fan-out's pass over the subscribers recomputes it; a new subscriber adds its own), so
//! [`Forms::build`] makes them *before* the hub takes the channel's shard lock: the lock covers
//! only the pushes. A form found missing under the lock (a subscriber that joined between the
//! two) is built there, once.
//!
//! Compression is the one WebSocket notion in crier-core: a compressed frame is shared like a
//! plain one, so it is built where the fan-out is (the framing itself stays in crier-protocol and
//! the transport).

use bytes::Bytes;
use crier_protocol::Encoding;
use crier_protocol::ws::{DEFLATE_WINDOWS, deflate_window, deflate_window_slot};

use crate::outbox::{Out, Outbox};

/// The forms a channel's subscribers need besides the JSON frame: one bit per form, and the
/// smallest frame any of them takes compressed. 8 bytes in every channel's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Needs {
    bits: u16,
    deflate_min: u32,
}

const MSGPACK: u16 = 1;
const _: () = assert!(2 * DEFLATE_WINDOWS < 16, "one bit per form");

fn deflate_bit(msgpack: bool, slot: usize) -> u16 {
    1 << (1 + usize::from(msgpack) * DEFLATE_WINDOWS + slot)
}

impl Default for Needs {
    fn default() -> Needs {
        Needs { bits: 0, deflate_min: u32::MAX }
    }
}

impl Needs {
    /// Adds what `outbox`'s connection takes.
    pub(crate) fn add(&mut self, outbox: &Outbox) {
        let msgpack = outbox.encoding() != Encoding::Json;
        if msgpack {
            self.bits |= MSGPACK;
        }
        if let Some(min) = outbox.deflate_min() {
            self.bits |= deflate_bit(msgpack, deflate_window_slot(outbox.deflate_window_bits()));
            self.deflate_min = self.deflate_min.min(u32::try_from(min).unwrap_or(u32::MAX));
        }
    }

    /// Every subscriber takes the JSON frame as it is.
    pub(crate) fn plain(&self) -> bool {
        self.bits == 0
    }
}

/// The frames of one fan-out in each form built so far.
#[derive(Default)]
pub(crate) struct Forms {
    /// The other encoding's form (MessagePack is the one other encoding).
    converted: Option<Bytes>,
    /// What a deflate subscriber is sent: [JSON, the other encoding] × window slot
    /// ([`deflate_window_slot`]); [`Out::Frame`] when compressing failed.
    deflated: [[Option<Out>; DEFLATE_WINDOWS]; 2],
}

impl Forms {
    /// Builds every form `needs` names for `json` (outside the hub's lock).
    pub(crate) fn build(json: &Bytes, needs: Needs) -> Forms {
        let mut forms = Forms::default();
        if needs.plain() {
            return forms;
        }
        if needs.bits & MSGPACK != 0 {
            forms.converted = Some(Encoding::MsgPack.frame_from_json(json));
        }
        for (msgpack, per_window) in forms.deflated.iter_mut().enumerate() {
            let frame = if msgpack == 1 { forms.converted.as_ref() } else { Some(json) };
            let Some(frame) = frame.filter(|f| f.len() >= needs.deflate_min as usize) else { continue };
            for (slot, out) in per_window.iter_mut().enumerate() {
                if needs.bits & deflate_bit(msgpack == 1, slot) != 0 {
                    *out = Some(compress(frame, slot_bits(slot)));
                }
            }
        }
        forms
    }
}

/// A window that compresses for `slot` (9 serves 8 too, see [`deflate_window_slot`]).
pub(super) fn slot_bits(slot: usize) -> u8 {
    9 + slot as u8
}

/// `frame` compressed, or — should the compressor fail — sent as it is (RFC 7692 lets any
/// message go uncompressed): never a broken compressed frame.
pub(super) fn compress(frame: &Bytes, window_bits: u8) -> Out {
    match deflate_window(frame, window_bits) {
        Ok(z) => Out::Deflated(Bytes::from(z)),
        Err(e) => {
            tracing::error!(error = %e, bytes = frame.len(), "sending a message uncompressed");
            Out::Frame(frame.clone())
        }
    }
}

/// `json` in the subscriber's encoding: the shared JSON bytes themselves, or the other
/// encoding's form from `forms` (built there on first use).
fn frame_for(outbox: &Outbox, json: &Bytes, converted: &mut Option<Bytes>) -> Bytes {
    match outbox.encoding() {
        Encoding::Json => json.clone(),
        other => converted.get_or_insert_with(|| other.frame_from_json(json)).clone(),
    }
}

/// What to queue for this subscriber: the frame in its encoding, compressed when the connection
/// negotiated permessage-deflate and the frame is large enough — taken from `forms`, or built
/// into it on first use.
pub(crate) fn out_for(outbox: &Outbox, json: &Bytes, forms: &mut Forms) -> Out {
    let min = outbox.deflate_min();
    let encoding = outbox.encoding();
    if min.is_none() && encoding == Encoding::Json {
        return Out::Frame(json.clone());
    }
    let frame = frame_for(outbox, json, &mut forms.converted);
    match min {
        Some(min) if frame.len() >= min => {
            let bits = outbox.deflate_window_bits();
            let slot = deflate_window_slot(bits);
            forms.deflated[usize::from(encoding != Encoding::Json)][slot]
                .get_or_insert_with(|| compress(&frame, slot_bits(slot)))
                .clone()
        }
        _ => Out::Frame(frame),
    }
}

/// The bytes an item counts against its outbox's bound.
pub(crate) fn out_len(out: &Out) -> usize {
    match out {
        Out::Frame(f) | Out::Deflated(f) => f.len(),
        Out::Ping => 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn outbox(encoding: Encoding, window: Option<u8>) -> Outbox {
        let o = Outbox::with_encoding(1 << 20, encoding);
        if let Some(bits) = window {
            o.set_deflate(16, bits);
        }
        o
    }

    fn ptr(out: &Out) -> *const u8 {
        match out {
            Out::Frame(b) | Out::Deflated(b) => b.as_ptr(),
            Out::Ping => std::ptr::null(),
        }
    }

    #[test]
    fn built_forms_are_the_ones_queued() {
        let json = crier_protocol::frames::encode_message("c", "e", 1, r#"{"text":"hello hello hello"}"#);
        let subscribers = [
            outbox(Encoding::Json, None),
            outbox(Encoding::MsgPack, None),
            outbox(Encoding::Json, Some(15)),
            outbox(Encoding::MsgPack, Some(12)),
            outbox(Encoding::Json, Some(8)),
        ];
        let mut needs = Needs::default();
        subscribers.iter().for_each(|o| needs.add(o));
        let built = Forms::build(&json, needs);
        // Each subscriber's item is a form built before (no build left for under the lock).
        for o in &subscribers {
            let mut forms = Forms::build(&json, needs);
            let before: Vec<*const u8> = [forms.converted.as_ref().map(|b| b.as_ptr())]
                .into_iter()
                .flatten()
                .chain(forms.deflated.iter().flatten().flatten().map(ptr))
                .collect();
            let item = out_for(o, &json, &mut forms);
            let taken = ptr(&item);
            assert!(taken == json.as_ptr() || before.contains(&taken), "built in advance");
        }
        assert!(built.converted.is_some());
        assert_eq!(built.deflated.iter().flatten().filter(|f| f.is_some()).count(), 3, "JSON 15 and 9, MessagePack 12");
        // Nothing to build for JSON-only subscribers without compression.
        let mut plain = Needs::default();
        plain.add(&subscribers[0]);
        assert!(plain.plain());
        // Under the minimum size nothing is compressed.
        let small = Bytes::from_static(b"{}");
        assert!(Forms::build(&small, needs).deflated.iter().flatten().all(Option::is_none));
    }
}
