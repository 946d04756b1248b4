//! CLI ⇄ daemon: a unix stream socket in the user's private state directory
//! (`$OMERTA_HOME/run/omertad-<network>.sock`), frames of a 4-byte big-endian length and JSON.
//! One request, one reply, per frame.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::net::HomeError;
use crate::wire::Requirements;

/// Largest frame read or written.
pub const MAX_FRAME: usize = 64 * 1024;

/// A request from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's summary.
    Status,
    /// Known peers.
    Peers,
    /// Probe a peer.
    Ping {
        /// Which.
        #[serde(rename = "peerId")]
        peer_id: String,
        /// Milliseconds to wait for its answer.
        #[serde(default)]
        timeout: Option<u64>,
    },
    /// Ask a provider for a VM.
    VmRequest {
        /// The provider.
        #[serde(rename = "peerId")]
        peer_id: String,
        /// The size.
        #[serde(default)]
        requirements: Requirements,
        /// Minutes without heartbeats before the provider reclaims it.
        #[serde(default, rename = "timeoutMinutes")]
        timeout_minutes: Option<u32>,
        /// Nothing is started on either side.
        #[serde(default, rename = "dryRun")]
        dry_run: bool,
    },
    /// The VMs this node rents and provides.
    VmList,
    /// Give a rented VM back.
    VmRelease {
        /// Which.
        #[serde(rename = "vmId")]
        vm_id: String,
    },
}

/// Why a CLI request got no result.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// No daemon listens.
    #[error("no omertad answers at {} (start it: omertad start --network ID)", .0.display())]
    NoDaemon(PathBuf),
    /// The socket could not be reached.
    #[error("{}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket's timeouts could not be set.
    #[error("{0}")]
    Socket(std::io::Error),
    /// The request could not be encoded.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// The request could not be sent.
    #[error("sending to omertad: {0}")]
    Send(std::io::Error),
    /// No answer within the timeout.
    #[error("omertad did not answer in time")]
    Timeout,
    /// The answer could not be read.
    #[error("reading omertad's answer: {0}")]
    Read(std::io::Error),
    /// The answer is not JSON, or not of the reply's type.
    #[error("omertad's answer is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// The daemon refused or failed: its message.
    #[error("{0}")]
    Daemon(String),
    /// The socket's directory.
    #[error(transparent)]
    Home(#[from] HomeError),
}

/// Writes one frame.
pub fn write_frame(s: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(v)?;
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::other("a frame over 64 KiB"));
    }
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("a frame over 64 KiB"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out)
}

/// Reads one frame.
pub fn read_frame(s: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {n} bytes (at most {MAX_FRAME})")));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// The socket of the daemon for `network`.
pub fn socket_path(home: &crate::net::Home, network: &str) -> Result<PathBuf, HomeError> {
    Ok(home.sub("run")?.join(format!("omertad-{network}.sock")))
}

/// Sends a request and waits for the reply (`timeout` bounds each read and write); an error
/// reply becomes [`IpcError::Daemon`] with its message.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Value, IpcError> {
    let mut s = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => IpcError::NoDaemon(path.into()),
        _ => IpcError::Connect { path: path.into(), source: e },
    })?;
    s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout))).map_err(IpcError::Socket)?;
    let v = serde_json::to_value(req).map_err(IpcError::Encode)?;
    write_frame(&mut s, &v).map_err(IpcError::Send)?;
    let body = read_frame(&mut s).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => IpcError::Timeout,
        _ => IpcError::Read(e),
    })?;
    let reply: Value = serde_json::from_slice(&body).map_err(IpcError::NotJson)?;
    match reply.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        _ => Err(IpcError::Daemon(reply.get("error").and_then(Value::as_str).unwrap_or("omertad failed").to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let req = serde_json::to_value(Request::Ping { peer_id: "0123456789abcdef".into(), timeout: Some(5) }).unwrap();
        write_frame(&mut a, &req).unwrap();
        let back: Request = serde_json::from_slice(&read_frame(&mut b).unwrap()).unwrap();
        assert_eq!(back, Request::Ping { peer_id: "0123456789abcdef".into(), timeout: Some(5) });
        a.write_all(&(64 * 1024 + 1u32).to_be_bytes()).unwrap();
        assert!(read_frame(&mut b).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"vm_destroy_everything"}"#).is_err());
    }
}
