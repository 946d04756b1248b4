//! The client side of the control socket.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::protocol::{self, Failure};

/// Largest reply accepted (a full capture of 1000 frames in hex fits).
pub const MAX_REPLY: usize = 8 << 20;

/// Why a request did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Nothing listens on the socket.
    NotRunning(String),
    /// The connection failed midway.
    Io(String),
    /// The reply made no sense.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(s) | ClientError::Io(s) | ClientError::Protocol(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ClientError {}

/// The control socket path: `$OMERTA_CONTROL`, else `/run/omerta/engine.sock` for root, else
/// `$XDG_RUNTIME_DIR/omerta/engine.sock`, else `/tmp/omerta-UID/engine.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("OMERTA_CONTROL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let (uid, _) = engine::io::effective_ids();
    if uid == 0 {
        return PathBuf::from("/run/omerta/engine.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(d) => PathBuf::from(d).join("omerta/engine.sock"),
        None => PathBuf::from(format!("/tmp/omerta-{uid}/engine.sock")),
    }
}

/// A connection to the engine.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ClientError::NotRunning(format!("the engine is not running (no answer at {}: {e})", path.display()))
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
        let reader = BufReader::new(stream.try_clone().map_err(|e| ClientError::Io(e.to_string()))?);
        Ok(Self { stream, reader })
    }

    /// Sends one request line and reads its reply.
    pub fn request(&mut self, line: &str) -> Result<Result<Value, Failure>, ClientError> {
        // A refusal (wrong uid, too many clients) is written before the engine reads anything
        // and closes; the write may then fail, but the reply is there to read.
        let sent = self.stream.write_all(format!("{line}\n").as_bytes());
        let mut reply = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY as u64)
            .read_line(&mut reply)
            .map_err(|e| ClientError::Io(format!("reading the reply: {e}")))?;

        if n == 0 {
            return Err(ClientError::Io(match sent {
                Err(e) => format!("sending the request: {e}"),
                Ok(()) => "the engine closed the connection without a reply".into(),
            }));
        }
        protocol::decode(reply.trim_end()).map_err(ClientError::Protocol)
    }
}

use std::io::Read as _;
