//! Redis Sentinel: which Redis is the master right now.
//!
//! Asked in the listed order: `SENTINEL GET-MASTER-ADDR-BY-NAME <master>` on each Sentinel
//! until one names an address, then `ROLE` on that address must answer `master` (during a
//! failover a Sentinel can still name the old master; a demoted one answers `slave`). The
//! master is reached with the Sentinel URLs' scheme (`rediss://` → TLS, verified against the
//! address the Sentinel gave), username/password and database number.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, Value};

use crate::error::Fault;
use crate::scripts::bulk;
use crate::tls::Tls;

/// Why no master was found.
#[derive(Debug)]
pub(crate) struct NoMaster {
    /// Every Sentinel that answered said it knows no master of that name (a setting problem,
    /// not an outage).
    pub unknown_name: bool,
    pub why: String,
}

pub(crate) struct Sentinels {
    pub sentinels: Vec<ConnectionInfo>,
    pub master: String,
}

impl Sentinels {
    /// The current master, verified by `ROLE`.
    pub(crate) async fn master(&self, tls: &Tls, timeout: Duration) -> Result<ConnectionInfo, NoMaster> {
        let mut problems = Vec::new();
        let (mut answered, mut unknown) = (0usize, 0usize);
        for sentinel in &self.sentinels {
            let addr = sentinel.addr().to_string();
            let mut con = match connect(tls, sentinel.clone(), timeout).await {
                Ok(con) => con,
                Err(e) => {
                    problems.push(format!("sentinel {addr}: {e}"));
                    continue;
                }
            };
            let mut ask = redis::cmd("SENTINEL");
            ask.arg("GET-MASTER-ADDR-BY-NAME").arg(&self.master);
            let reply = match tokio::time::timeout(timeout, ask.query_async::<Value>(&mut con)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    problems.push(format!("sentinel {addr}: {e}"));
                    continue;
                }
                Err(_) => {
                    problems.push(format!("sentinel {addr}: no answer within {timeout:?}"));
                    continue;
                }
            };
            answered += 1;
            let Some((host, port)) = host_port(&reply) else {
                unknown += 1;
                problems.push(format!("sentinel {addr} knows no master named `{}`", self.master));
                continue;
            };
            let info = self.master_info(sentinel, host.clone(), port);
            match role(tls, info.clone(), timeout).await {
                Ok(role) if role == "master" => return Ok(info),
                Ok(role) => problems.push(format!("sentinel {addr} names {host}:{port}, which is a {role} now")),
                Err(e) => problems.push(format!("sentinel {addr} names {host}:{port}, unreachable: {e}")),
            }
        }
        Err(NoMaster { unknown_name: answered > 0 && unknown == answered, why: problems.join("; ") })
    }

    /// The master's connection info: the Sentinel's scheme, credentials and database.
    fn master_info(&self, sentinel: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
        let addr = match sentinel.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
            _ => ConnectionAddr::Tcp(host, port),
        };
        sentinel.clone().set_addr(addr)
    }
}

async fn connect(tls: &Tls, info: ConnectionInfo, timeout: Duration) -> Result<MultiplexedConnection, Fault> {
    let client = tls.client(info)?;
    let config = AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
    match tokio::time::timeout(timeout, client.get_multiplexed_async_connection_with_config(&config)).await {
        Ok(Ok(con)) => Ok(con),
        Ok(Err(e)) => Err(Fault::Connection(e.to_string())),
        Err(_) => Err(Fault::Timeout { what: "no connection", after: timeout }),
    }
}

/// `ROLE`'s first element: `master`, `slave` or `sentinel`.
pub(crate) async fn role(tls: &Tls, info: ConnectionInfo, timeout: Duration) -> Result<String, Fault> {
    let mut con = connect(tls, info, timeout).await?;
    match tokio::time::timeout(timeout, redis::cmd("ROLE").query_async::<Value>(&mut con)).await {
        Ok(Ok(v)) => role_of(&v).ok_or_else(|| Fault::Reply(format!("unexpected ROLE reply {v:?}"))),
        Ok(Err(e)) => Err(Fault::Connection(e.to_string())),
        Err(_) => Err(Fault::Timeout { what: "no answer", after: timeout }),
    }
}

pub(crate) fn role_of(v: &Value) -> Option<String> {
    let Value::Array(items) = v else { return None };
    let role = bulk(items.first()?)?;
    String::from_utf8(role.to_vec()).ok()
}

fn host_port(v: &Value) -> Option<(String, u16)> {
    let Value::Array(items) = v else { return None };
    let host = String::from_utf8(bulk(items.first()?)?.to_vec()).ok()?;
    let port = std::str::from_utf8(bulk(items.get(1)?)?).ok()?.parse().ok()?;
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let v = Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), Value::BulkString(b"6380".to_vec())]);
        assert_eq!(host_port(&v), Some(("127.0.0.1".to_owned(), 6380)));
        assert_eq!(host_port(&Value::Nil), None);
        let v = Value::Array(vec![Value::BulkString(b"master".to_vec()), Value::Int(0), Value::Array(vec![])]);
        assert_eq!(role_of(&v).as_deref(), Some("master"));
    }
}
