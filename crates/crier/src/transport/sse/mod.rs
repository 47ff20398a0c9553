//! The Server-Sent Events transport: `GET /sse?channel=a&channel=b` (docs/protocol.md, *Server-Sent Events*).
//!
//! The handshake checks are the WebSocket ones ([`handshake::admit`]), then this transport's own
//! (the query and `Last-Event-ID` parse; at least one channel and at most
//! `max_subscriptions_per_connection`; every channel valid and permitted by the token), then
//! [`handshake::accept`] — all answered with the contract's JSON error before the stream starts.
//! The session is the same as a WebSocket connection's, speaking JSON; the transport feeds it
//! one synthesized `subscribe` per channel (with `recover` from the cursor) and streams its
//! outbox as events ([`render`]) on the socket it takes over from hyper — see [`stream`] for
//! the task, the response it writes and liveness.
//!
//! - [`cursor`]: the `id:` of events, resumed from through `Last-Event-ID`.
//! - [`render`]: frames as events (the transport reads a frame's envelope, never its `data`).
//! - [`stream`]: the connection's task and its socket (response head, chunked body).

mod cursor;
mod render;
mod stream;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::Response;
use crier_core::Command;
use crier_protocol::{Encoding, StreamPosition, validate_channel};

use crate::error::ApiError;
use crate::handshake;
use crate::server::TakeOver;
use crate::session::{Session, may_subscribe};
use crate::state::AppState;
use cursor::Cursor;

/// What an SSE request asks for.
#[derive(Debug, Default)]
struct Wanted {
    /// Channels in the order named, without repeats (not validated yet).
    channels: Vec<String>,
    cursor: Cursor,
}

/// Parses the query (`channel`, repeatable; `last_event_id`) and the `Last-Event-ID` header
/// (which wins over the query's: it is what a reconnecting `EventSource` sends).
fn wanted(query: Option<&str>, headers: &HeaderMap) -> Result<Wanted, String> {
    let mut w = Wanted::default();
    let mut from_query = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "channel" if !w.channels.iter().any(|c| *c == value) => w.channels.push(value.into_owned()),
            "last_event_id" => from_query = Some(value.into_owned()),
            _ => {}
        }
    }
    let header = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map_err(|_| "malformed Last-Event-ID: not visible ASCII".to_owned())?.to_owned()),
        None => None,
    };
    if let Some(id) = header.or(from_query) {
        w.cursor = Cursor::parse(&id)?;
    }
    Ok(w)
}

/// The transport's own checks, on an admitted handshake's claims.
fn check(st: &AppState, claims: &crate::auth::Claims, w: &Wanted) -> Result<(), ApiError> {
    if w.channels.is_empty() {
        return Err(ApiError::bad_request("name at least one channel: /sse?channel=<name>"));
    }
    let max = st.config.max_subscriptions_per_connection;
    if w.channels.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_subscriptions",
            format!("at most {max} channels (max_subscriptions_per_connection)"),
        ));
    }
    for channel in &w.channels {
        if let Err(e) = validate_channel(channel) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()));
        }
        // In a namespace with a subscribe proxy, the backend decides when the stream subscribes.
        if !st.policy(channel).subscribe_proxy
            && !may_subscribe(claims.channels.iter().map(String::as_str), &claims.sub, channel)
        {
            let shown: String = channel.chars().take(64).collect();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token does not allow channel {shown}"),
            ));
        }
    }
    Ok(())
}

/// `GET /sse`: the handshake checks, this transport's, then the stream: the handler takes the
/// socket over from hyper ([`TakeOver`]) and the connection's task writes the `200
/// text/event-stream` head and the events itself ([`stream`]).
pub async fn handler(State(st): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let wanted = wanted(parts.uri.query(), &parts.headers);
    let admitted = match handshake::admit(&st, peer, &parts.headers, parts.uri.query()).await {
        Ok(a) => a,
        Err(response) => return response,
    };
    let wanted = match wanted {
        Ok(w) => w,
        Err(message) => return handshake::refuse(admitted, ApiError::bad_request(message)).await,
    };
    if let Err(e) = check(&st, &admitted.claims, &wanted) {
        return handshake::refuse(admitted, e).await;
    }
    let Some(takeover) = parts.extensions.get::<TakeOver>().cloned() else {
        // Only a router served by `server::serve` can hand a socket over.
        return handshake::refuse(admitted, ApiError::unavailable("this connection cannot stream")).await;
    };
    let mut admitted = match handshake::accept(&st, admitted).await {
        Ok(a) => a,
        Err(response) => return response,
    };
    let Wanted { channels, cursor } = wanted;
    // The token's `subs`: subscribed by the server after the named channels, each resuming from
    // the `Last-Event-ID` cursor like them (queued below, not by `Session::new`).
    let subs = std::mem::take(&mut admitted.claims.subs);
    let server_subs: Vec<Command> =
        subs.iter().map(|c| Command::Subscribe { channel: c.as_str().into(), recover: cursor.get(c) }).collect();
    let cursor = cursor.restrict(&[channels.as_slice(), subs.as_slice()].concat());
    let subscriptions: Vec<(String, Option<StreamPosition>)> = channels
        .into_iter()
        .map(|c| {
            let resume = cursor.get(&c);
            (c, resume)
        })
        .collect();
    let session = Session::new(st.clone(), admitted, Encoding::Json);
    for command in server_subs {
        session.outbox().command(command);
    }
    let chunked = parts.version != Version::HTTP_10;
    let head = response_head(parts.headers.get(header::ORIGIN), chunked);
    let drain_ms = st.config.shutdown_drain.as_millis() as u64;
    let counted = st.details.sse_stream();
    takeover.claim(move |io| {
        let sock = stream::SseSocket::new(io, head, chunked);
        tokio::spawn(async move {
            let _counted = counted;
            stream::run(session, subscriptions, cursor, sock, drain_ms).await
        });
    });
    // hyper's part of the connection ends here: this future is dropped with it.
    std::future::pending().await
}

/// The stream's response head. No keep-alive: the stream is the connection's last response.
fn response_head(origin: Option<&HeaderValue>, chunked: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n");
    h.extend_from_slice(b"cache-control: no-cache, no-store\r\n");
    // nginx: do not buffer this response (deploy/nginx.conf also says so for /sse).
    h.extend_from_slice(b"x-accel-buffering: no\r\nconnection: close\r\n");
    if chunked {
        h.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    // An EventSource on another origin is a CORS request: the Origin was checked by the
    // handshake (allowed_origins), so allow the browser to read the stream. (A header value as
    // hyper parsed it: no line breaks.)
    if let Some(origin) = origin {
        h.extend_from_slice(b"access-control-allow-origin: ");
        h.extend_from_slice(origin.as_bytes());
        h.extend_from_slice(b"\r\nvary: Origin\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}
