//! The session's requests that read or write a channel without subscribing: `publish`,
//! `presence` and `history`.

use bytes::Bytes;
use crier_core::BrokerError;
use crier_core::broker::PublishOptions;
use crier_protocol::frames::ServerFrame;
use crier_protocol::{ErrorCode, StreamPosition, validate_channel};

use super::Session;
use crate::metrics as m;

/// Largest `limit` of a `history` frame.
const MAX_HISTORY_LIMIT: usize = 1000;

impl Session {
    pub(super) async fn publish(&mut self, id: Option<u64>, channel: &str, data: &str, idempotency_key: Option<&str>) {
        if let Err(e) = validate_channel(channel) {
            return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
        }
        if !self.patterns.may_publish(channel) {
            return self.error(id, ErrorCode::Forbidden, "the token does not allow publishing here", Some(channel));
        }
        let opts = PublishOptions { idempotency_key };
        match self.st.broker().publish(channel, data, opts).await {
            Ok(r) => {
                metrics::counter!(m::PUBLISHED, "source" => "client").increment(1);
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

    pub(super) async fn presence(&mut self, id: Option<u64>, channel: &str) {
        if !self.readable(id, channel) {
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

    pub(super) async fn history(
        &mut self,
        id: Option<u64>,
        channel: &str,
        since: Option<StreamPosition>,
        limit: Option<usize>,
    ) {
        if !self.readable(id, channel) {
            return;
        }
        let limit = limit.unwrap_or(self.st.config.history_size).min(MAX_HISTORY_LIMIT);
        match self.st.broker().history(channel, since.as_ref(), limit).await {
            Ok(h) => {
                let frames: Vec<Bytes> = h.publications.into_iter().map(|p| p.frame).collect();
                self.outbox.push(self.encoding.encode_history(id, channel, &h.epoch, h.offset, &frames));
            }
            Err(e) => {
                tracing::warn!(error = %e, "history failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }
}
