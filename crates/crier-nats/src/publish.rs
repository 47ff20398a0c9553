//! Publishing: per channel, publishes queue while the previous store is out and a leader stores
//! what queued as one JetStream message with the channel's expected last sequence (offsets stay
//! contiguous whatever the number of publishers). The leader is the publishing caller itself when
//! the channel was idle (its own store, no task), else a task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use crier_core::broker::{BrokerError, PublishOptions, PublishResult};

use crate::history::new_epoch;
use crate::rawsub::ReqError;
use crate::{H_EPOCH, H_LENS, H_OFFSET, H_PREV, H_TS, Inner, now_us, token};

/// At most this many publications, and about this many bytes, per stored batch.
pub(crate) const BATCH_MAX: usize = 256;
pub(crate) const BATCH_BYTES: usize = 256 * 1024;

/// A caller leading its channel's publishes inline: dropped before it is done (the caller
/// went away mid-store), a task takes the channel over.
struct Takeover<'a> {
    inner: &'a Arc<Inner>,
    channel: &'a str,
    done: bool,
}

impl Drop for Takeover<'_> {
    fn drop(&mut self) {
        if !self.done {
            tokio::spawn(Inner::lead(self.inner.clone(), self.channel.to_owned()));
        }
    }
}

/// The cached position of a channel this node publishes to.
#[derive(Debug, Clone)]
pub(crate) struct Tail {
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
}

/// What a leader stores next: publishes, the channel's cached tail, its subject.
struct Batch {
    pending: Vec<Pending>,
    tail: Option<Tail>,
    subject: async_nats::Subject,
}

/// A publish waiting for its channel's next store.
pub(crate) struct Pending {
    data: Bytes,
    /// `Nats-Msg-Id`: channel token + idempotency key.
    key: Option<String>,
    tx: tokio::sync::oneshot::Sender<Result<PublishResult, BrokerError>>,
}

/// A channel this node publishes to: its cached tail, its queue, whether a leader runs.
pub(crate) struct ChanPub {
    /// The channel's history subject (made once).
    subject: async_nats::Subject,
    pub(crate) tail: Option<Tail>,
    queue: std::collections::VecDeque<Pending>,
    busy: bool,
}

impl Inner {
    /// Queues a publish on the channel's batch; a leader task (one per channel at a time)
    /// stores what queued as one message while the previous store is out.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        channel: &str,
        data: &str,
        opts: PublishOptions<'_>,
    ) -> Result<PublishResult, BrokerError> {
        // Not connected: refused before anything is sent (the client would buffer the publish
        // and send it after a reconnect, long after the caller was told it failed).
        if !self.raw.is_up() {
            return Err(BrokerError::Unavailable("not connected to NATS".into()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = Pending {
            data: Bytes::copy_from_slice(data.as_bytes()),
            key: opts.idempotency_key.map(|k| msg_id(channel, k)),
            tx,
        };
        let lead = {
            let mut t = self.tails.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() > 65_536 {
                t.retain(|_, c| c.busy);
            }
            let c = t.entry(channel.to_owned()).or_insert_with(|| ChanPub {
                subject: self.hist_subject(channel).into(),
                tail: None,
                queue: Default::default(),
                busy: false,
            });
            c.queue.push_back(pending);
            !std::mem::replace(&mut c.busy, true)
        };
        if lead {
            // The caller leads: its own publish (alone in the queue: nobody led) is stored from
            // here, without a task; what queued meanwhile goes to a leader task. Dropped while
            // storing (the caller went away), the guard hands the channel to a task.
            let mut guard = Takeover { inner: self, channel, done: false };
            if let Some(batch) = self.next_batch(channel) {
                self.run_batch(channel, batch).await;
            }
            guard.done = true;
            self.hand_over(channel);
        }
        rx.await.unwrap_or_else(|_| Err(BrokerError::OutcomeUnknown("the publisher stopped".into())))
    }

    /// Drops every cached tail (after a reconnect: the server may have lost its store, and a
    /// sequence of the old one could match one of the new).
    pub(crate) fn forget_tails(&self) {
        for c in self.tails.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            c.tail = None;
        }
    }

    /// After an inline store: a task leads what queued meanwhile, or the channel is idle.
    fn hand_over(self: &Arc<Self>, channel: &str) {
        let rest = {
            let mut t = self.tails.lock().unwrap_or_else(|e| e.into_inner());
            match t.get_mut(channel) {
                Some(c) if !c.queue.is_empty() => true,
                Some(c) => {
                    c.busy = false;
                    false
                }
                None => false,
            }
        };
        if rest {
            tokio::spawn(Inner::lead(self.clone(), channel.to_owned()));
        }
    }

    /// Stores the channel's queued publishes, a batch at a time, until none is left.
    pub(crate) async fn lead(self: Arc<Self>, channel: String) {
        while let Some(batch) = self.next_batch(&channel) {
            self.run_batch(&channel, batch).await;
        }
    }

    /// The next batch of the channel's queue and its cached tail; `None` (and the channel no
    /// longer led) when the queue is empty.
    fn next_batch(&self, channel: &str) -> Option<Batch> {
        let mut t = self.tails.lock().unwrap_or_else(|e| e.into_inner());
        let c = t.get_mut(channel)?;
        let mut batch: Vec<Pending> = Vec::new();
        let mut bytes = 0;
        while let Some(p) = c.queue.front() {
            // A keyed publish is stored alone (its key names one stored message).
            let keyed = p.key.is_some();
            if !batch.is_empty() && (keyed || batch.len() >= BATCH_MAX || bytes + p.data.len() > BATCH_BYTES) {
                break;
            }
            bytes += p.data.len();
            batch.extend(c.queue.pop_front());
            if keyed {
                break;
            }
        }
        if batch.is_empty() {
            c.busy = false;
            return None;
        }
        Some(Batch { pending: batch, tail: c.tail.take(), subject: c.subject.clone() })
    }

    /// Stores a batch and answers its publishers.
    async fn run_batch(&self, channel: &str, batch: Batch) {
        let Batch { pending: batch, mut tail, subject } = batch;
        let result = self.store(channel, subject, &batch, &mut tail).await;
        if let Some(c) = self.tails.lock().unwrap_or_else(|e| e.into_inner()).get_mut(channel) {
            c.tail = tail;
        }
        for (i, p) in batch.into_iter().enumerate() {
            let r = result
                .as_ref()
                .map(|(epoch, first)| PublishResult { epoch: epoch.clone(), offset: first + i as u64 })
                .map_err(Clone::clone);
            let _ = p.tx.send(r);
        }
    }

    /// Stores one batch (the first offset it got and its epoch), keeping `tail` current.
    async fn store(
        &self,
        channel: &str,
        subject: async_nats::Subject,
        batch: &[Pending],
        tail: &mut Option<Tail>,
    ) -> Result<(String, u64), BrokerError> {
        let payload: Bytes = if batch.len() == 1 {
            batch[0].data.clone()
        } else {
            batch.iter().flat_map(|p| p.data.iter().copied()).collect::<Vec<u8>>().into()
        };
        let lens =
            (batch.len() > 1).then(|| batch.iter().map(|p| p.data.len().to_string()).collect::<Vec<_>>().join(","));
        let key = batch.first().and_then(|p| p.key.clone());
        // After a lost race: the sequence this node expected, and the channel's last sequence
        // as the server reported it.
        let (mut tried, mut reported): (Option<u64>, Option<u64>) = (None, None);
        for attempt in 0..16u64 {
            if attempt >= 2 {
                // Lost the race twice: other nodes publish to this channel now. A short random
                // pause lets one of them through instead of colliding again.
                let pause = rand::random_range(0..=attempt * 500);
                tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
            }
            // When this node follows the channel, its sequencer knows the tail as last
            // delivered: fresher than the cached one after another node published, and no read.
            let live = self.live.tail(channel).map(|(epoch, offset, seq)| Tail { seq, epoch, offset });
            let t = match (tail.take(), live) {
                (Some(c), Some(l)) if l.seq > c.seq => {
                    // Another node published since this node's last publish: following saved
                    // a lost race, so the channel is still contended.
                    self.followed.touch(channel);
                    l
                }
                (Some(c), _) => c,
                (None, Some(l)) if reported.map_or_else(|| tried.is_none_or(|t| l.seq > t), |r| l.seq == r) => l,
                (None, _) => match self.last_direct(channel).await? {
                    Some(s) => Tail { seq: s.seq, epoch: s.epoch, offset: s.offset },
                    None => Tail { seq: 0, epoch: new_epoch().into(), offset: 0 },
                },
            };
            let first = t.offset + 1;
            let mut h = String::with_capacity(192);
            h.push_str("NATS/1.0\r\n");
            let mut put = |k: &str, v: &str| {
                h.push_str(k);
                h.push_str(": ");
                h.push_str(v);
                h.push_str("\r\n");
            };
            put(H_EPOCH, &t.epoch);
            put(H_OFFSET, &first.to_string());
            put(H_PREV, &t.seq.to_string());
            put(H_TS, &now_us().to_string());
            put(EXPECTED_LAST_SUBJECT_SEQ, &t.seq.to_string());
            if let Some(l) = &lens {
                put(H_LENS, l);
            }
            if let Some(id) = &key {
                put(MSG_ID, id);
            }
            h.push_str("\r\n");
            self.publish_calls.fetch_add(1, Ordering::Relaxed);
            let reply = match self.raw.request(&subject, h.as_bytes(), &payload, self.opts.command_timeout).await {
                Ok(reply) => reply,
                Err(ReqError::NotSent(e)) => return Err(BrokerError::Unavailable(e)),
                Err(ReqError::Unknown(e)) => return Err(BrokerError::OutcomeUnknown(e)),
            };
            match Ack::of(&reply) {
                Ack::Stored { seq, duplicate: true } => {
                    let firstp = self.at(channel, seq, None).await?.ok_or_else(|| {
                        BrokerError::Internal("the first publish of this idempotency key is no longer stored".into())
                    })?;
                    return Ok((firstp.epoch.to_string(), firstp.first));
                }
                Ack::Stored { seq, duplicate: false } => {
                    let epoch = t.epoch.to_string();
                    *tail = Some(Tail { seq, epoch: t.epoch, offset: first + batch.len() as u64 - 1 });
                    return Ok((epoch, first));
                }
                Ack::WrongLast(last) => {
                    self.lost_race(channel);
                    tried = Some(t.seq);
                    reported = last;
                }
                Ack::Refused(e) => return Err(BrokerError::Unavailable(e)),
            }
        }
        Err(BrokerError::Unavailable("too much contention on the channel".into()))
    }
}

/// JetStream's headers: the store only if the subject's last sequence is this one; the
/// de-duplication id.
const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
const MSG_ID: &str = "Nats-Msg-Id";

/// A publish's `Nats-Msg-Id`: the channel's token, `:`, the idempotency key. A key that is not
/// printable ASCII (it could end the header line) is written `;` + its base64url instead — no
/// other key can give the same id, as the token's alphabet has neither `:` nor `;`.
fn msg_id(channel: &str, key: &str) -> String {
    if key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        format!("{}:{key}", token(channel))
    } else {
        format!("{};{}", token(channel), base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key))
    }
}

/// What JetStream answered a publish.
#[derive(Debug, PartialEq)]
enum Ack {
    Stored {
        seq: u64,
        duplicate: bool,
    },
    /// Refused: the subject's last sequence is not the expected one (the reported one, when
    /// the answer says it).
    WrongLast(Option<u64>),
    /// Refused otherwise (no stream, a limit, JetStream unavailable): nothing was stored.
    Refused(String),
}

/// JetStream's error code of a wrong expected last subject sequence.
const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;

impl Ack {
    /// Reads a publish's answer: the JSON of a publish acknowledgement or error, or a status
    /// (`503`: no stream listens on the subject).
    fn of((headers, payload): &crate::rawsub::Live) -> Ack {
        #[derive(serde::Deserialize)]
        struct Answer {
            seq: Option<u64>,
            #[serde(default)]
            duplicate: bool,
            error: Option<ApiError>,
        }
        #[derive(serde::Deserialize)]
        struct ApiError {
            #[serde(default)]
            err_code: u64,
            #[serde(default)]
            description: String,
        }
        if let Some(h) = headers {
            let status = h.0.split(|&b| b == b'\r').next().unwrap_or_default();
            let status = String::from_utf8_lossy(status);
            let code = status.split_ascii_whitespace().nth(1).unwrap_or("");
            if !code.is_empty() {
                return Ack::Refused(match code {
                    "503" => "no JetStream stream answers for the channel (no responders)".into(),
                    _ => format!("nats status: {}", status.trim()),
                });
            }
        }
        match serde_json::from_slice::<Answer>(payload) {
            Ok(Answer { error: Some(e), .. }) if e.err_code == ERR_WRONG_LAST_SEQUENCE => {
                Ack::WrongLast(reported_last(&e.description))
            }
            Ok(Answer { error: Some(e), .. }) => Ack::Refused(format!("jetstream: {}", e.description)),
            Ok(Answer { seq: Some(seq), duplicate, .. }) => Ack::Stored { seq, duplicate },
            _ => Ack::Refused(format!("jetstream: an answer not understood: {}", String::from_utf8_lossy(payload))),
        }
    }
}

/// The channel's last sequence as a refused publish reports it ("wrong last sequence: N").
fn reported_last(text: &str) -> Option<u64> {
    let at = text.rfind("sequence: ")? + "sequence: ".len();
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{Ack, msg_id, reported_last};
    use crate::history::RawHeaders;
    use bytes::Bytes;

    fn ack(headers: Option<&'static str>, payload: &'static str) -> Ack {
        Ack::of(&(headers.map(|h| RawHeaders(Bytes::from(h))), Bytes::from(payload)))
    }

    #[test]
    fn answers_are_read() {
        assert_eq!(ack(None, r#"{"stream":"s","seq":42}"#), Ack::Stored { seq: 42, duplicate: false });
        assert_eq!(ack(None, r#"{"stream":"s","seq":7,"duplicate":true}"#), Ack::Stored { seq: 7, duplicate: true });
        let wrong = r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4217"}}"#;
        assert_eq!(ack(None, wrong), Ack::WrongLast(Some(4217)));
        assert!(matches!(ack(Some("NATS/1.0 503\r\n\r\n"), ""), Ack::Refused(e) if e.contains("no responders")));
        let full = r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert!(matches!(ack(None, full), Ack::Refused(e) if e.contains("maximum messages exceeded")));
        assert!(matches!(ack(None, "garbage"), Ack::Refused(_)));
        assert_eq!(reported_last("wrong last sequence"), None);
    }

    /// An idempotency key that could end a header line is encoded; others are kept as written
    /// (the ids of publishes stored before stay the same).
    #[test]
    fn message_ids_are_header_safe() {
        assert_eq!(msg_id("a", "k-1"), format!("{}:k-1", crate::token("a")));
        let odd = msg_id("a", "k\r\nNats-Expected-Stream: x");
        assert!(odd.starts_with(&format!("{};", crate::token("a"))) && !odd.contains(['\r', '\n', ':']), "{odd}");
        assert_ne!(msg_id("a", "é"), msg_id("a", "e"));
    }

    /// A refusal of a real nats-server (its words) is read as a lost race with the last sequence.
    #[tokio::test]
    async fn a_real_refusal_reports_the_last_sequence() {
        use async_nats::jetstream::{self, stream};
        if !crier_testkit::nats::nats_available("a_real_refusal_reports_the_last_sequence") {
            return;
        }
        let server = crier_testkit::nats::NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connected");
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config { name: "t".into(), subjects: vec!["t.*".into()], ..Default::default() })
            .await
            .expect("a stream");
        for _ in 0..3 {
            js.publish("t.a", "x".into()).await.expect("sent").await.expect("stored");
        }
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Expected-Last-Subject-Sequence", "1");
        let reply = client.request_with_headers("t.a", h, "y".into()).await.expect("answered");
        let raw = (None, reply.payload);
        assert_eq!(Ack::of(&raw), Ack::WrongLast(Some(3)));
    }
}
