//! The node's own subscriber connection for the live subjects: one connection speaking the
//! NATS client protocol (`CONNECT`, `SUB`/`UNSUB`, `MSG`/`HMSG`, `PING`/`PONG`), dispatching
//! messages by subscription id to each channel's sink, inline in its read loop (the node's one
//! dispatcher: no task and no queue per channel) — as the Redis broker owns its pub/sub
//! connection. It exists for memory: the async-nats client gives every subscription its own
//! queue whose first block (32 messages) is allocated at once, ~6 KiB per subscribed channel.
//! The node's publishes take it too ([`RawSub::request`], [`RawSub::publish`]): a JetStream
//! publish's acknowledgement comes back on the connection that also receives the republished
//! message (one connection for the server to write to per publish instead of two, and no client
//! task between the caller and the socket), and a presence event follows the message stored
//! before it on one connection, so every node sees them in that order.
//!
//! It serves every kind of connection the broker accepts ([`Conf`]): plain TCP or TLS (a
//! `tls://` URL, or a server whose `INFO` says `tls_required`: upgraded with rustls after
//! `INFO`, as the NATS protocol does; roots from `nats_tls_ca_file`, else the system's), and
//! no credentials, a token, a user and password from the URL, an nkey (the `INFO` nonce signed
//! with the seed) or a `.creds` file (its user JWT, and the nonce signed with its seed).
//! It reconnects to the seed URLs, then to the servers they announced (`connect_urls` of their
//! `INFO`), as the async-nats client does. Secrets are never logged: errors name what failed,
//! never the token, password or seed.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::rustls;
use base64::Engine;
use bytes::Bytes;
use crier_core::broker::BrokerError;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::NatsAuth;

use crate::history::RawHeaders;

/// A message of a live subject: its header block and payload (slices of one buffer).
pub(crate) type Live = (Option<RawHeaders>, Bytes);

/// Where a subscription's messages go: called inline by the connection's read loop (the
/// node's one dispatcher), in the order the server sent them.
pub(crate) trait Sink: Send + Sync {
    fn push(self: Arc<Self>, m: Live);
    /// The subject it subscribes (asked again when the connection is re-established; `None`:
    /// no longer wanted).
    fn subject(&self) -> Option<String>;
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;

/// The subscription id of the connection's reply inbox (channel subscriptions count from 1).
const REPLY_SID: u64 = 0;

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum ReqError {
    /// Nothing was sent (not connected).
    NotSent(String),
    /// Sent, and no answer came (timed out, or the connection was lost): the server may have
    /// acted on it.
    Unknown(String),
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::NotSent(e) | ReqError::Unknown(e) => f.write_str(e),
        }
    }
}

/// The subscriber connection.
pub(crate) struct RawSub {
    writer: tokio::sync::Mutex<Option<Writer>>,
    /// The reply subjects' prefix (`_INBOX.<random>`: what a NATS user's permissions allow
    /// for replies, as for the async-nats client's requests).
    inbox: String,
    /// Requests waiting for their reply, by the last token of their reply subject.
    replies: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Live>>>,
    next_req: AtomicU64,
    /// Waiters for the server's `PONG`s, in the order their `PING`s were written.
    pongs: Mutex<VecDeque<tokio::sync::oneshot::Sender<()>>>,
    /// Subscription id → where its messages go (the subject is asked of the sink when needed).
    subs: Mutex<HashMap<u64, Arc<dyn Sink>>>,
    next_sid: AtomicU64,
    /// Connected and subscribed (the broker's readiness includes it, as on Redis).
    up: AtomicBool,
}

/// A server to connect to.
#[derive(Clone)]
pub(crate) struct Addr {
    host: String,
    port: u16,
    /// `tls://`: TLS whatever the server's `INFO` says.
    tls: bool,
    /// User and password from the URL (percent-decoded).
    user: Option<(String, String)>,
}

/// How the connection authenticates (no `Debug`: it holds secrets).
pub(crate) enum Cred {
    None,
    Token(String),
    /// The nkey pair of a seed (`SU...`): `nkey` = its public key, `sig` = the signed nonce.
    Nkey(nkeys::KeyPair),
    /// A `.creds` file: the user JWT, and the nkey pair of its seed that signs the nonce.
    Jwt(String, nkeys::KeyPair),
}

/// What the connection needs: the servers, the credential, the TLS roots, its name.
pub(crate) struct Conf {
    addrs: Vec<Addr>,
    cred: Cred,
    /// PEM file of the private CA (`None`: the system roots).
    ca_file: Option<std::path::PathBuf>,
    name: String,
    /// A `PING` every `probe_every`, answered within `probe_within`, or the connection is
    /// dropped and made again (a server that hangs with its socket open: `SIGSTOP`, a full
    /// disk stalling it, a network path that black-holes packets).
    probe_every: Duration,
    probe_within: Duration,
}

impl Conf {
    /// The settings from the broker's options and parsed URLs (the credential read again from
    /// its file; errors name the file, never its content), and the TLS configuration when TLS
    /// is certain (a `tls://` URL or a CA file: loaded now, so a bad CA file stops the start).
    pub(crate) fn new(
        opts: &crate::NatsOptions,
        urls: &[async_nats::ServerAddr],
    ) -> Result<(Conf, Option<Arc<rustls::ClientConfig>>), BrokerError> {
        let read = |what: &str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| BrokerError::Internal(format!("nats {what} {}: {e}", p.display())))
        };
        let cred = match &opts.auth {
            NatsAuth::None => Cred::None,
            NatsAuth::TokenFile(p) => Cred::Token(read("token file", p)?.trim().to_owned()),
            NatsAuth::NkeyFile(p) => {
                Cred::Nkey(nkeys::KeyPair::from_seed(read("nkey file", p)?.trim()).map_err(|_| {
                    BrokerError::Internal(format!("nats nkey file {}: not an nkey seed (SU...)", p.display()))
                })?)
            }
            NatsAuth::CredentialsFile(p) => {
                let bad =
                    || BrokerError::Internal(format!("nats credentials file {}: no user JWT and seed", p.display()));
                let (jwt, seed) = parse_creds(&read("credentials file", p)?).ok_or_else(bad)?;
                Cred::Jwt(jwt, nkeys::KeyPair::from_seed(&seed).map_err(|_| bad())?)
            }
        };
        let conf = Conf {
            addrs: Conf::addrs(urls).map_err(BrokerError::Internal)?,
            cred,
            ca_file: opts.tls_ca_file.clone(),
            name: format!("crier {} live", opts.node_id),
            probe_every: opts.probe_interval,
            probe_within: opts.command_timeout,
        };
        let tls = if conf.ca_file.is_some() || urls.iter().any(|u| u.tls_required()) {
            Some(tls_config(conf.ca_file.as_deref()).map_err(BrokerError::Internal)?)
        } else {
            None
        };
        Ok((conf, tls))
    }

    /// Servers from the broker's URLs (`nats://`, `tls://`; `user:password@` taken from them).
    pub(crate) fn addrs(urls: &[async_nats::ServerAddr]) -> Result<Vec<Addr>, String> {
        urls.iter()
            .map(|u| {
                if u.is_websocket() {
                    return Err(format!("nats_url: {}: websocket URLs are not supported", u.scheme()));
                }
                let user = u.username().map(|n| (percent_decode(n), percent_decode(u.password().unwrap_or(""))));
                Ok(Addr { host: u.host().to_owned(), port: u.port(), tls: u.tls_required(), user })
            })
            .collect()
    }
}

/// The TLS client configuration: roots from the CA file, else the system's.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| format!("nats_tls_ca_file {}: {e}", path.display());
            let pem = std::fs::read(path).map_err(|e| bad(&e))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(&format!("not a PEM certificate file: {e}")))?;
                roots.add(cert).map_err(|e| bad(&format!("not a usable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(&"holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err("nats TLS: no system root certificate found (set nats_tls_ca_file)".to_owned());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("nats TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The user and password of the first URL that has a user (percent-decoded).
pub(crate) fn url_user(urls: &[async_nats::ServerAddr]) -> Option<(String, String)> {
    let u = urls.iter().find(|u| u.username().is_some())?;
    Some((percent_decode(u.username().unwrap_or("")), percent_decode(u.password().unwrap_or(""))))
}

/// `%XX` escapes of a URL's user or password decoded (a malformed escape is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The user JWT and the seed of a `.creds` file: the first and second armoured blocks
/// (`-----BEGIN NATS USER JWT-----` … `------END NATS USER JWT------`, then the seed's).
pub(crate) fn parse_creds(text: &str) -> Option<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l.starts_with("---") && l.contains("BEGIN") {
            let body = lines.by_ref().find(|l| !l.is_empty())?;
            if body.starts_with("---") {
                return None;
            }
            blocks.push(body.to_owned());
            if blocks.len() == 2 {
                break;
            }
        }
    }
    let seed = blocks.pop()?;
    let jwt = blocks.pop()?;
    Some((jwt, seed))
}

impl RawSub {
    /// Starts the connection task (it connects, and reconnects with backoff, on its own);
    /// `on_reconnect` runs after every (re)connection once the subscriptions are re-established.
    /// `tls`: the TLS configuration when already loaded (else loaded when a server asks).
    pub(crate) fn start(
        conf: Conf,
        tls: Option<Arc<rustls::ClientConfig>>,
        on_reconnect: impl Fn() + Send + Sync + 'static,
    ) -> Arc<RawSub> {
        let me = Arc::new(RawSub {
            writer: tokio::sync::Mutex::new(None),
            inbox: format!("_INBOX.{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
            replies: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            pongs: Mutex::new(VecDeque::new()),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
            up: AtomicBool::new(false),
        });
        tokio::spawn(conn_loop(Arc::downgrade(&me), conf, tls, on_reconnect));
        me
    }

    /// Subscribes `subject`; its messages go to `sink`. Returns the subscription id once the
    /// server has the subscription (a `PING` after the `SUB` was answered), or after 2 s.
    pub(crate) async fn subscribe(&self, subject: &str, sink: Arc<dyn Sink>) -> u64 {
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).insert(sid, sink);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            // Not connected: the connection task sends it (and every channel resyncs) once up.
            let mut w = self.writer.lock().await;
            if let Some(wr) = w.as_mut() {
                self.pongs.lock().unwrap_or_else(|e| e.into_inner()).push_back(tx);
                if send(wr, format!("SUB {subject} {sid}\r\nPING\r\n").as_bytes()).await.is_err() {
                    // The read side notices and reconnects; the subscription is re-sent then.
                    *w = None;
                }
            } else {
                drop(tx);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        sid
    }

    /// Whether the connection is up (subscriptions take effect at once).
    pub(crate) async fn connected(&self) -> bool {
        self.writer.lock().await.is_some()
    }

    /// Whether the connection is up and its subscriptions sent (lock-free, for readiness).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Waits (at most `within`) for the connection to be up.
    pub(crate) async fn wait_connected(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.connected().await && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a request (`HPUB` with a reply subject of this connection's inbox; `headers`: a
    /// whole header block, `NATS/1.0\r\n...\r\n\r\n`) and returns its reply, waiting at most
    /// `within`. The node's JetStream publishes go this way: on the connection that also
    /// receives their republished messages, one fewer connection for the server to write to
    /// per publish, and no client task between the caller and the socket.
    pub(crate) async fn request(
        self: &Arc<Self>,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
        within: Duration,
    ) -> Result<Live, ReqError> {
        let id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut frame = Vec::with_capacity(subject.len() + self.inbox.len() + headers.len() + payload.len() + 64);
        let total = headers.len() + payload.len();
        frame.extend_from_slice(format!("HPUB {subject} {}.{id} {} {total}\r\n", self.inbox, headers.len()).as_bytes());
        frame.extend_from_slice(headers);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        // Written by a task of its own: a caller that goes away (its request dropped) cannot
        // cut a frame half way and leave the connection mid-frame. Only the wait for the writer
        // is bounded here (`send` bounds the write, dropping the connection when it times out).
        let me = self.clone();
        let write = tokio::spawn(async move {
            let Ok(mut w) = tokio::time::timeout(within, me.writer.lock()).await else {
                return Err(ReqError::NotSent("the nats connection stayed busy".into()));
            };
            let Some(wr) = w.as_mut() else {
                return Err(ReqError::NotSent("not connected to NATS".into()));
            };
            // Registered under the writer's lock: a lost connection clears the waiters under it
            // too, so no waiter of an old connection outlives it.
            me.replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
            if let Err(e) = send(wr, &frame).await {
                // Maybe partly written: the connection is dropped (the read side reconnects).
                *w = None;
                drop(w);
                me.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                return Err(ReqError::Unknown(format!("nats write: {e}")));
            }
            Ok(())
        });
        write.await.unwrap_or_else(|e| Err(ReqError::Unknown(format!("nats write: {e}"))))?;
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ReqError::Unknown("the nats connection was lost before the answer".into())),
            Err(_) => {
                self.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                Err(ReqError::Unknown(format!("no answer from nats within {within:?}")))
            }
        }
    }

    /// Publishes a message (`HPUB`, no reply; `headers`: a whole header block). On this
    /// connection, after the node's publishes sent before it — a presence event after the
    /// message stored before it, as the node issued them.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), ReqError> {
        let total = headers.len() + payload.len();
        let mut frame = Vec::with_capacity(subject.len() + total + 32);
        frame.extend_from_slice(format!("HPUB {subject} {} {total}\r\n", headers.len()).as_bytes());
        frame.extend_from_slice(headers);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        // A task of its own, as for a request (a frame is never cut half way).
        let me = self.clone();
        let write = tokio::spawn(async move {
            let mut w = me.writer.lock().await;
            let Some(wr) = w.as_mut() else {
                return Err(ReqError::NotSent("not connected to NATS".into()));
            };
            send(wr, &frame).await.map_err(|e| {
                *w = None;
                ReqError::Unknown(format!("nats write: {e}"))
            })
        });
        write.await.unwrap_or_else(|e| Err(ReqError::Unknown(format!("nats write: {e}"))))
    }

    /// Fails every request waiting for a reply (the connection they were sent on is gone).
    fn drop_waiters(&self) {
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub(crate) async fn unsubscribe(&self, sid: u64) {
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).remove(&sid);
        let mut w = self.writer.lock().await;
        if let Some(wr) = w.as_mut()
            && send(wr, format!("UNSUB {sid}\r\n").as_bytes()).await.is_err()
        {
            *w = None;
        }
    }
}

/// The longest a connection attempt (TCP, `INFO`, TLS, `CONNECT` answered) may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

async fn conn_loop(
    me: Weak<RawSub>,
    conf: Conf,
    mut tls: Option<Arc<rustls::ClientConfig>>,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) {
    let mut failures = 0u32;
    // The seeds, then the servers they told of (`connect_urls`), as the async-nats client
    // does: a cluster named by one seed is still reached when that server is gone.
    let mut known = conf.addrs.clone();
    loop {
        let mut i = 0;
        while let Some(addr) = known.get(i).cloned() {
            i += 1;
            let Some(sub) = me.upgrade() else { return };
            // Bounded as a whole: a server that takes the socket but never answers is skipped.
            let attempt = tokio::time::timeout(HANDSHAKE, connect(&addr, &conf, &mut tls)).await;
            let attempt = attempt.unwrap_or_else(|_| Err(io_err("no answer to CONNECT within 5s")));
            match attempt {
                Ok((reader, mut writer, urls)) => {
                    failures = 0;
                    learn(&mut known, &addr, &urls);
                    // Every subscription again (under the writer's lock: a subscribe meanwhile
                    // waits, then sends its own), then the channels re-read what they missed.
                    let mut w = sub.writer.lock().await;
                    sub.pongs.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    let all: Vec<(u64, Arc<dyn Sink>)> = {
                        let s = sub.subs.lock().unwrap_or_else(|e| e.into_inner());
                        s.iter().map(|(sid, sink)| (*sid, sink.clone())).collect()
                    };
                    let mut out = format!("SUB {}.* {REPLY_SID}\r\n", sub.inbox);
                    for (sid, sink) in all {
                        if let Some(subject) = sink.subject() {
                            out.push_str(&format!("SUB {subject} {sid}\r\n"));
                        }
                    }
                    if send(&mut writer, out.as_bytes()).await.is_err() {
                        continue;
                    }
                    *w = Some(writer);
                    sub.up.store(true, Ordering::SeqCst);
                    drop(w);
                    on_reconnect();
                    drop(sub);
                    tokio::select! {
                        () = read_loop(&me, reader) => {}
                        () = probe(&me, conf.probe_every, conf.probe_within) => {
                            tracing::warn!(host = %addr.host, port = addr.port, "nats subscriber connection: no PONG within {:?}; connecting again", conf.probe_within);
                        }
                    }
                    if let Some(sub) = me.upgrade() {
                        sub.up.store(false, Ordering::SeqCst);
                        let mut w = sub.writer.lock().await;
                        *w = None;
                        sub.drop_waiters();
                    }
                }
                Err(e) => {
                    // Said once per outage (then at debug level): a wrong credential or CA
                    // would otherwise fill the log. The error never holds a secret.
                    if failures == 0 {
                        tracing::warn!(host = %addr.host, port = addr.port, error = %e, "nats subscriber connection failed; retrying");
                    } else {
                        tracing::debug!(host = %addr.host, port = addr.port, error = %e, "nats subscriber connection failed");
                    }
                }
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(Duration::from_millis((50u64 << failures.min(5)).min(2000))).await;
    }
}

/// The longest a write may take (a server that stopped reading fills the socket's buffer).
const WRITE_WITHIN: Duration = Duration::from_secs(2);

/// Writes and flushes (TLS: the record goes out now), within [`WRITE_WITHIN`].
async fn send(w: &mut Writer, bytes: &[u8]) -> std::io::Result<()> {
    let write = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(WRITE_WITHIN, write).await.unwrap_or_else(|_| Err(io_err("write timed out")))
}

/// Returns when a `PING` (one every `every`) got no `PONG` within `within` — the connection is
/// then dropped by the caller — or when the connection is gone.
async fn probe(me: &Weak<RawSub>, every: Duration, within: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(sub) = me.upgrade() else { return };
        // Bounded as a whole: taking the writer may wait for a write to a server that hangs.
        let answered = tokio::time::timeout(within, async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut w = sub.writer.lock().await;
                let Some(wr) = w.as_mut() else { return false };
                sub.pongs.lock().unwrap_or_else(|e| e.into_inner()).push_back(tx);
                if send(wr, b"PING\r\n").await.is_err() {
                    return false;
                }
            }
            rx.await.is_ok()
        })
        .await;
        if answered != Ok(true) {
            return;
        }
    }
}

/// Adds the servers of an `INFO`'s `connect_urls` (`host:port`) not known yet, reached like
/// the server that told of them (TLS, user).
fn learn(known: &mut Vec<Addr>, from: &Addr, urls: &[String]) {
    for u in urls {
        let Some((host, port)) = u.rsplit_once(':') else { continue };
        let Ok(port) = port.parse::<u16>() else { continue };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !known.iter().any(|k| k.host == host && k.port == port) {
            known.push(Addr { host: host.to_owned(), port, tls: from.tls, user: from.user.clone() });
        }
    }
}

fn io_err(what: impl Into<String>) -> std::io::Error {
    std::io::Error::other(what.into())
}

/// Connects to `addr`: `INFO`, TLS if the URL or the server asks for it, `CONNECT` with the
/// credential, and a `PING` answered. Returns the `connect_urls` of the server's `INFO` too.
async fn connect(
    addr: &Addr,
    conf: &Conf,
    tls: &mut Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<(Reader, Writer, Vec<String>)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((addr.host.as_str(), addr.port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    // INFO read straight off the socket (no read-ahead: a TLS handshake may follow).
    let info = tokio::time::timeout(Duration::from_secs(2), read_info(&stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no INFO from the server"))??;
    let info: serde_json::Value =
        serde_json::from_str(&info).map_err(|e| io_err(format!("unreadable INFO from the server: {e}")))?;
    let tls_required = addr.tls || info["tls_required"].as_bool() == Some(true);
    let (r, mut w): (Box<dyn AsyncRead + Send + Unpin>, Writer) = if tls_required {
        let config = match tls {
            Some(c) => c.clone(),
            None => {
                let c = tls_config(conf.ca_file.as_deref()).map_err(io_err)?;
                *tls = Some(c.clone());
                c
            }
        };
        let name = rustls::pki_types::ServerName::try_from(addr.host.clone())
            .map_err(|e| io_err(format!("nats TLS: server name {}: {e}", addr.host)))?;
        let s = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_rustls::TlsConnector::from(config).connect(name, stream),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let (r, w) = tokio::io::split(s);
        (Box::new(r), Box::new(w))
    } else {
        let (r, w) = stream.into_split();
        (Box::new(r), Box::new(w))
    };
    let mut r = BufReader::new(r);
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
        "protocol": 1, "lang": "rust-crier", "version": env!("CARGO_PKG_VERSION"), "name": conf.name,
        "tls_required": tls_required,
    });
    let nonce = info["nonce"].as_str().unwrap_or("").as_bytes();
    let sign = |kp: &nkeys::KeyPair| {
        kp.sign(nonce)
            .map(|s| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s))
            .map_err(|_| io_err("nats: signing the server's nonce with the nkey failed"))
    };
    match &conf.cred {
        Cred::None => {}
        Cred::Token(t) => connect["auth_token"] = t.as_str().into(),
        Cred::Nkey(kp) => {
            connect["nkey"] = kp.public_key().into();
            connect["sig"] = sign(kp)?.into();
        }
        Cred::Jwt(jwt, kp) => {
            connect["jwt"] = jwt.as_str().into();
            connect["sig"] = sign(kp)?.into();
        }
    }
    if let Some((user, pass)) = &addr.user {
        connect["user"] = user.as_str().into();
        connect["pass"] = pass.as_str().into();
    }
    send(&mut w, format!("CONNECT {connect}\r\nPING\r\n").as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(io_err("closed during the handshake"));
        }
        match line.trim_end() {
            "PONG" => {
                let urls = info["connect_urls"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                return Ok((r, w, urls));
            }
            // The server's error (`-ERR 'Authorization Violation'`) names no secret.
            l if l.starts_with("-ERR") => return Err(io_err(l.to_owned())),
            _ => {}
        }
    }
}

/// Reads the server's `INFO` line byte by byte off the socket (nothing read past it) and
/// returns its JSON.
async fn read_info(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut byte) {
            Ok(0) => return Err(io_err("closed before INFO")),
            Ok(_) => {
                if byte[0] == b'\n' {
                    break;
                }
                line.push(byte[0]);
                if line.len() > 64 * 1024 {
                    return Err(io_err("INFO line too long"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end();
    match text.strip_prefix("INFO") {
        Some(json) => Ok(json.trim().to_owned()),
        None => Err(io_err(format!("unexpected greeting: {}", text.chars().take(80).collect::<String>()))),
    }
}

async fn read_loop(me: &Weak<RawSub>, mut r: Reader) {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        let (hdr, rest) = if let Some(rest) = l.strip_prefix("HMSG ") {
            (true, rest)
        } else if let Some(rest) = l.strip_prefix("MSG ") {
            (false, rest)
        } else {
            if l == "PONG" {
                let Some(sub) = me.upgrade() else { return };
                let waiter = sub.pongs.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                if let Some(tx) = waiter {
                    let _ = tx.send(());
                }
            } else if l == "PING" {
                let Some(sub) = me.upgrade() else { return };
                let mut w = sub.writer.lock().await;
                if let Some(wr) = w.as_mut()
                    && send(wr, b"PONG\r\n").await.is_err()
                {
                    return;
                }
            } else if l.starts_with("-ERR") {
                tracing::warn!(error = l, "nats subscriber connection: server error");
            }
            continue;
        };
        // MSG <subject> <sid> [reply] <bytes> ; HMSG <subject> <sid> [reply] <hdr bytes> <total bytes>
        let mut t = [""; 5];
        let mut n = 0;
        for word in rest.split_ascii_whitespace() {
            if n == t.len() {
                return;
            }
            t[n] = word;
            n += 1;
        }
        let (sid, hlen, total) = match (hdr, n) {
            (false, 3 | 4) => (t[1], "0", t[n - 1]),
            (true, 4 | 5) => (t[1], t[n - 2], t[n - 1]),
            _ => return,
        };
        let (Ok(sid), Ok(hlen), Ok(total)) = (sid.parse::<u64>(), hlen.parse::<usize>(), total.parse::<usize>()) else {
            return;
        };
        if hlen > total {
            return;
        }
        let mut buf = vec![0u8; total + 2];
        if r.read_exact(&mut buf).await.is_err() {
            return;
        }
        buf.truncate(total);
        let Some(sub) = me.upgrade() else { return };
        if sid == REPLY_SID {
            // A reply: to the request named by the subject's last token.
            let id = t[0].rsplit('.').next().and_then(|id| id.parse::<u64>().ok());
            let waiter = id.and_then(|id| sub.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id));
            if let Some(tx) = waiter {
                let buf = Bytes::from(buf);
                let headers = (hlen > 0).then(|| RawHeaders(buf.slice(..hlen)));
                let _ = tx.send((headers, buf.slice(hlen..)));
            }
            continue;
        }
        let sink = sub.subs.lock().unwrap_or_else(|e| e.into_inner()).get(&sid).cloned();
        if let Some(sink) = sink {
            let buf = Bytes::from(buf);
            let headers = (hlen > 0).then(|| RawHeaders(buf.slice(..hlen)));
            sink.push((headers, buf.slice(hlen..)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that greets, then never answers `CONNECT`, is skipped after [`HANDSHAKE`]: the
    /// connection goes on to the next server (here a minimal fake that answers the `PING`).
    #[tokio::test]
    async fn a_server_that_never_answers_connect_is_skipped() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = |l: &tokio::net::TcpListener| Addr {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
            tls: false,
            user: None,
        };
        let conf = Conf {
            addrs: vec![addr(&silent), addr(&fake)],
            cred: Cred::None,
            ca_file: None,
            name: "t".into(),
            probe_every: Duration::from_secs(1),
            probe_within: Duration::from_secs(2),
        };
        let greeted = Arc::new(AtomicU64::new(0));
        let g = greeted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = silent.accept().await {
                g.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"INFO {}\r\n").await;
                held.push(s);
            }
        });
        tokio::spawn(async move {
            while let Ok((s, _)) = fake.accept().await {
                let (r, mut w) = s.into_split();
                let _ = w.write_all(b"INFO {}\r\n").await;
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l == "PING" {
                        let _ = w.write_all(b"PONG\r\n").await;
                    }
                }
            }
        });
        let sub = RawSub::start(conf, None, || {});
        sub.wait_connected(HANDSHAKE * 3).await;
        assert!(sub.is_up(), "connected to the second server within {:?}", HANDSHAKE * 3);
        assert!(greeted.load(Ordering::SeqCst) >= 1, "the first server was tried first");
    }

    #[test]
    fn reads_creds_files_and_url_users() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.sig-_x\n------END NATS USER JWT------\n\n\
            ************************* IMPORTANT *************************\n\n\
            -----BEGIN USER NKEY SEED-----\nSUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM\n------END USER NKEY SEED------\n";
        let (jwt, seed) = parse_creds(creds).unwrap_or_default();
        assert_eq!(jwt, "eyJ0eXAi.eyJqdGki.sig-_x");
        assert_eq!(seed, "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM");
        assert!(parse_creds("-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n").is_none());
        assert!(parse_creds("").is_none());
        assert_eq!(percent_decode("p%40ss%3Aw%2Frd%"), "p@ss:w/rd%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        let urls: Vec<async_nats::ServerAddr> =
            ["tls://h:1", "nats://u%40x:p%2F@h2:2"].iter().filter_map(|u| u.parse().ok()).collect();
        assert_eq!(url_user(&urls), Some(("u@x".to_owned(), "p/".to_owned())));
        let addrs = Conf::addrs(&urls).unwrap_or_default();
        assert_eq!((addrs[0].tls, addrs[1].tls, addrs[1].port), (true, false, 2));
        // Servers told of in INFO: new ones added once, reached like their teller.
        let mut known = addrs.clone();
        let told = ["h2:2", "10.0.0.3:4222", "[::1]:4223", "junk", "h:99999"].map(String::from);
        learn(&mut known, &addrs[0], &told);
        learn(&mut known, &addrs[0], &told);
        let got: Vec<(&str, u16, bool)> = known.iter().map(|a| (a.host.as_str(), a.port, a.tls)).collect();
        assert_eq!(got, [("h", 1, true), ("h2", 2, false), ("10.0.0.3", 4222, true), ("::1", 4223, true)]);
    }
}
