//! The WebSocket transport: `GET /ws`.
//!
//! - [`upgrade`]: the upgrade's own checks (RFC 6455 §4.2.1), the subprotocol, the 101 response.
//! - [`socket`]: the upgraded socket: frames in, batches of frames out, no buffer while idle.
//! - [`connection`]: the connection's one task, driving a session over the socket.

mod connection;
mod socket;
mod upgrade;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::error::ApiError;
use crate::handshake;
use crate::session::Session;
use crate::state::AppState;

/// `GET /ws`: the handshake checks, the upgrade's, then the 101; the connection runs in its own
/// task once hyper hands over the socket.
pub async fn handler(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let upgrade = upgrade::check(&mut req);
    let admitted = match handshake::admit(&st, peer, req.headers(), req.uri().query()).await {
        Ok(a) => a,
        Err(response) => return response,
    };
    let (accept, on_upgrade) = match upgrade {
        Ok(u) => u,
        Err((status, message)) => {
            let mut response = handshake::refuse(admitted, ApiError::new(status, "bad_upgrade", message)).await;
            if status == StatusCode::UPGRADE_REQUIRED {
                // RFC 6455 §4.4: say which version this server speaks.
                response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    let (protocol, encoding) = upgrade::offered_subprotocol(req.headers());
    let admitted = match handshake::accept(&st, admitted).await {
        Ok(a) => a,
        Err(response) => return response,
    };
    let deflate = if st.config.websocket_compression { upgrade::deflate_offered(req.headers()) } else { None };
    let session = Session::new(st.clone(), admitted, encoding);
    if let Some(d) = deflate {
        session.outbox().set_deflate(st.config.websocket_compression_min_bytes, d.server_window_bits);
    }
    tokio::spawn(connection::run(session, on_upgrade, st.config.max_message_bytes, deflate.is_some()));
    upgrade::switching_protocols(accept, protocol, deflate)
}
