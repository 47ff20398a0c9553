//! A child process under test (e.g. the `crier` binary): stdout and stderr captured as they are
//! written (for assertions on banners and logs), SIGTERM on request, killed when dropped.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::wait::{poll, poll_within};

/// A running child process with captured output.
pub struct Process {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Spawns `cmd` (stdin null, stdout and stderr captured) and waits up to `timeout` for a
    /// stdout line starting with `ready`: returns the process and the rest of that line.
    /// `Err(what happened)` — exit status and everything printed — if it exits or stays silent.
    pub async fn start(mut cmd: Command, ready: &str, timeout: Duration) -> Result<(Process, String), String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot spawn {:?}: {e}", cmd.get_program()))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let (stdout2, ready) = (stdout.clone(), ready.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(&ready) {
                    let _ = tx.send(rest.to_owned());
                }
                lock(&stdout2).push_str(&(line + "\n"));
            }
        });
        let err = child.stderr.take().ok_or("no stderr pipe")?;
        let stderr2 = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                lock(&stderr2).push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(timeout)).await.map_err(|e| e.to_string())?;
        let mut p = Process { child, stdout, stderr };
        match line {
            Ok(rest) => Ok((p, rest)),
            Err(_) => {
                let _ = p.child.kill();
                let status = p.child.wait().map_err(|e| e.to_string())?;
                // The process is gone, so its stderr ends and the reader finishes promptly: wait
                // for it, or the error could miss the end of the stderr (the stdout reader ending
                // first is what ended the wait for the ready line). Seen as a flaky
                // `proxy.rs::bad_proxy_settings_are_configuration_errors` with an empty stderr.
                let _ = stderr_reader.join();
                Err(format!(
                    "exited {status:?} without printing its ready line\nstdout:\n{}\nstderr:\n{}",
                    p.stdout(),
                    p.logs()
                ))
            }
        }
    }

    /// Everything written to stderr so far (the logs).
    pub fn logs(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    /// Waits until the logs contain a line for which `line` returns true and returns that line;
    /// fails the test naming `what` (and showing the logs) when [`crate::WAIT`] passes first.
    pub async fn wait_log(&self, what: impl Display, mut line: impl FnMut(&str) -> bool) -> String {
        poll(what, async || {
            let logs = self.logs();
            logs.lines().find(|l| line(l)).map(str::to_owned).ok_or_else(|| format!("the logs:\n{logs}"))
        })
        .await
    }

    /// Waits until stdout contains `needle`; returns all of stdout (fails after [`crate::WAIT`]).
    pub async fn wait_stdout(&self, needle: &str) -> String {
        poll(format!("{needle:?} on stdout"), async || {
            let s = self.stdout();
            if s.contains(needle) { Ok(s) } else { Err(format!("stdout:\n{s}")) }
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Waits (up to [`crate::WAIT`]) for the process to exit; its exit code (`None` when killed
    /// by a signal). Fails the test if it is still running at the deadline.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let child = &mut self.child;
        poll_within("the process to exit", crate::WAIT, async || match child.try_wait() {
            Ok(Some(status)) => Ok(status.code()),
            Ok(None) => Err("still running".to_owned()),
            Err(e) => Err(e.to_string()),
        })
        .await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value of one series (`name{labels}` exactly as rendered) in a Prometheus text
/// exposition, or 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}
