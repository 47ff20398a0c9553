//! A subscription as the application sees it: a stream of [`Event`]s whose drop unsubscribes.
//! The position [`crate::app_position::AppPosition`] that keeps the delivery promise (each message once, in
//! order, across reconnects, or a gap) lives in the driver's book of subscriptions.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::events::{Event, Message};
use crate::protocol::ToDriver;

/// A subscription: a stream of [`Event`]s (also readable with [`Subscription::next`]).
/// Dropping it (or [`Subscription::unsubscribe`]) unsubscribes.
///
/// Events are buffered without bound while the application does not read them.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) channel: String,
    pub(crate) generation: u64,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) commands: mpsc::UnboundedSender<ToDriver>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next message, skipping other events; `None` once the subscription has ended.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            match self.events.recv().await? {
                Event::Message(m) => return Some(m),
                Event::Ended(_) => return None,
                _ => continue,
            }
        }
    }

    /// Unsubscribes (the same as dropping the subscription).
    pub fn unsubscribe(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self
            .commands
            .send(ToDriver::Unsubscribe { channel: std::mem::take(&mut self.channel), generation: self.generation });
    }
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}
