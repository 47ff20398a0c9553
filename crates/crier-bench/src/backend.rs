//! A minimal HTTP/1.1 backend on loopback for the hook scenarios (webhook batches, proxy calls):
//! keep-alive connections, requests read by `content-length`, one fixed answer per request
//! after an optional delay. Hand-written on tokio so the backend costs as little CPU as possible
//! next to the gateway it measures (no framework, no routing, no header map).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Called with each request's body; its answer is sent after `delay`.
pub type Handler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Serves `listener` until aborted: each request's body goes to `on_body`, and is answered
/// `answer` (a complete HTTP response) after `delay` (zero: at once).
pub async fn serve(listener: TcpListener, answer: Arc<Vec<u8>>, delay: Duration, on_body: Handler) {
    while let Ok((sock, _)) = listener.accept().await {
        let (answer, on_body) = (answer.clone(), on_body.clone());
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let _ = connection(sock, &answer, delay, &*on_body).await;
        });
    }
}

/// A `200 OK` response with a JSON body.
pub fn json_200(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// A `204 No Content` response.
pub fn no_content() -> Vec<u8> {
    b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
}

async fn connection(
    mut sock: TcpStream,
    answer: &[u8],
    delay: Duration,
    on_body: &(dyn Fn(&[u8]) + Send + Sync),
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if read_more(&mut sock, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        let len = content_length(&buf[..head_end]);
        while buf.len() < head_end + len {
            if read_more(&mut sock, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        on_body(&buf[head_end..head_end + len]);
        buf.drain(..head_end + len);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        sock.write_all(answer).await?;
    }
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = sock.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// `crier-bench proxy-backend`: a connect proxy answering every call with `answer` (JSON)
/// after `delay`; prints its port on stdout, serves until killed.
pub async fn run_proxy_backend(delay: Duration, answer: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    serve(listener, Arc::new(json_200(answer)), delay, Arc::new(|_: &[u8]| {})).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_found_in_any_case() {
        assert_eq!(content_length(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"), 12);
        assert_eq!(content_length(b"POST / HTTP/1.1\r\ncontent-length:3\r\n\r\n"), 3);
        assert_eq!(content_length(b"POST / HTTP/1.1\r\nhost: x\r\n\r\n"), 0);
    }
}
