//! The session's requests that read or write a channel without subscribing: `publish`,
//! `presence` and `history`.

use bytes::Bytes;
use crier_core::BrokerError;
use crier_core::broker::PublishOptions;
use crier_protocol::frames::ServerFrame;
use crier_protocol::{ErrorCode, StreamPosition, validate_channel};
use tokio::sync::SemaphorePermit;

use super::Session;
use crate::metrics as m;
use crate::proxy::{Answer, Kind};

/// Largest `limit` of a `history` frame.
const MAX_HISTORY_LIMIT: usize = 1000;

impl Session {
    /// `slot`: the broker slot the request holds, given back while a publish proxy is asked.
    pub(super) async fn publish(
        &mut self,
        id: Option<u64>,
        channel: &str,
        data: &str,
        idempotency_key: Option<&str>,
        mut slot: Option<SemaphorePermit<'_>>,
    ) {
        if let Err(e) = validate_channel(channel) {
            return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
        }
        if !self.st.policy(channel).client_publish {
            return self.error(id, ErrorCode::Forbidden, "clients may not publish in this namespace", Some(channel));
        }
        let replaced;
        let data = if self.st.policy(channel).publish_proxy {
            // The backend decides instead of the token's patterns, and may rewrite the data.
            drop(slot.take());
            let Some(proxies) = self.st.proxies.as_deref() else {
                // Unreachable: the settings refuse publish_proxy without publish_url.
                return self.error(id, ErrorCode::Unavailable, "no publish proxy configured", Some(channel));
            };
            let data_value = serde_json::value::RawValue::from_string(data.to_owned()).ok();
            let body = serde_json::json!({"client": self.client(), "user": &*self.user, "channel": channel, "data": data_value});
            match proxies.publish(&body).await {
                Ok(Answer::Allowed(a)) => match a.data {
                    Some(new) => {
                        replaced = new;
                        replaced.get()
                    }
                    None => data,
                },
                Ok(Answer::Refused { reason }) => return self.error(id, ErrorCode::Forbidden, &reason, Some(channel)),
                Err(f) => return self.error(id, ErrorCode::Unavailable, &f.message(Kind::Publish), Some(channel)),
            }
        } else if !self.patterns.may_publish(channel) {
            return self.error(id, ErrorCode::Forbidden, "the token does not allow publishing here", Some(channel));
        } else {
            data
        };
        if data.len() > self.st.config.max_message_bytes {
            return self.error(
                id,
                ErrorCode::MessageTooLarge,
                "the publish backend's replacement data is larger than max_message_bytes",
                Some(channel),
            );
        }
        let opts = PublishOptions { idempotency_key };
        match self.st.broker().publish(channel, data, opts).await {
            Ok(r) => {
                metrics::counter!(m::PUBLISHED, "source" => "client").increment(1);
                if self.st.config.webhooks.as_ref().is_some_and(|w| w.events.iter().any(|e| e == "client_publish"))
                    && let Err(e) = self.st.broker().hook_publish(channel, &self.user, &self.client(), data).await
                {
                    tracing::warn!(error = %e, "webhooks: could not queue a client_publish event");
                }
                self.send(&ServerFrame::Ack {
                    id,
                    channel: Some(channel),
                    epoch: Some(&r.epoch),
                    offset: Some(r.offset),
                    recovered: None,
                });
            }
            Err(BrokerError::OutcomeUnknown(e)) => {
                tracing::warn!(error = %e, "client publish: outcome unknown");
                self.error(
                    id,
                    ErrorCode::OutcomeUnknown,
                    "the broker did not confirm the publish; it may have been published: retry with the same idempotency_key",
                    Some(channel),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "client publish failed");
                self.error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable; the message was not published",
                    Some(channel),
                )
            }
        }
    }

    /// Whether the token may read `channel` and its namespace keeps presence (else the error is
    /// sent: `forbidden` either way).
    fn presence_readable(&mut self, id: Option<u64>, channel: &str) -> bool {
        if !self.readable(id, channel) {
            return false;
        }
        if !self.st.policy(channel).presence {
            self.error(id, ErrorCode::Forbidden, "presence is off in this channel's namespace", Some(channel));
            return false;
        }
        true
    }

    pub(super) async fn presence(&mut self, id: Option<u64>, channel: &str) {
        if !self.presence_readable(id, channel) {
            return;
        }
        match self.st.broker().presence(channel).await {
            Ok(clients) => self.send(&ServerFrame::Presence { id, channel, clients: &clients }),
            Err(e) => {
                tracing::warn!(error = %e, "presence failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }

    /// `presence_stats`: how many clients and distinct users are in the channel's presence.
    pub(super) async fn presence_stats(&mut self, id: Option<u64>, channel: &str) {
        if !self.presence_readable(id, channel) {
            return;
        }
        match self.st.broker().presence_stats(channel).await {
            Ok(s) => self.send(&ServerFrame::PresenceStats { id, channel, clients: s.clients, users: s.users }),
            Err(e) => {
                tracing::warn!(error = %e, "presence_stats failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }

    pub(super) async fn history(
        &mut self,
        id: Option<u64>,
        channel: &str,
        since: Option<StreamPosition>,
        limit: Option<usize>,
        slot: Option<SemaphorePermit<'_>>,
    ) {
        if !self.readable(id, channel) {
            return;
        }
        let limit = limit.unwrap_or(self.st.policy(channel).history_size).min(MAX_HISTORY_LIMIT);
        let read = self.st.broker().history(channel, since.as_ref(), limit).await;
        drop(slot);
        match read {
            Ok(h) => {
                // A reply never larger than half the queue (and at least one message): the
                // rest is one `since` away (`more`/`next`), and what the connection receives
                // meanwhile still fits.
                let budget = self.st.config.client_queue_max_bytes / 2;
                let (mut bytes, mut last, mut next) = (0, 0, None);
                let mut frames: Vec<Bytes> = Vec::new();
                for p in h.publications {
                    if !frames.is_empty() && bytes + p.frame.len() > budget {
                        next = Some(last);
                        break;
                    }
                    bytes += p.frame.len();
                    last = p.offset;
                    frames.push(p.frame);
                }
                let reply = self.encoding.encode_history(id, channel, &h.epoch, h.offset, &frames, next);
                // Paced: the reply waits for room instead of overflowing the queue.
                if self.outbox.room(reply.len()).await {
                    self.outbox.push(reply);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "history failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }
}
