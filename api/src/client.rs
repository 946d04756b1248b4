//! The blocking client of the control socket: [`Client::call`] sends a [`Request`] and reads
//! its typed [`Reply`].
use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::error::{ClientError, Failure};
use crate::reply::{Allowlist, Reply, ReplyKind, Status, Vm, VmStats};
use crate::request::Request;
use crate::wire;

/// Largest reply accepted (a full capture of 1000 frames in hex fits).
pub const MAX_REPLY: usize = 8 << 20;

/// How long a reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// The control socket path: `$OMERTA_CONTROL`, else `/run/omerta/engine.sock` for root, else
/// `$XDG_RUNTIME_DIR/omerta/engine.sock`, else `/tmp/omerta-UID/engine.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("OMERTA_CONTROL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let (uid, _) = sys::effective_ids();
    if uid == 0 {
        return PathBuf::from("/run/omerta/engine.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(d) => PathBuf::from(d).join("omerta/engine.sock"),
        None => PathBuf::from(format!("/tmp/omerta-{uid}/engine.sock")),
    }
}

/// A connection to the engine; requests on it are answered in order.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::NotRunning { path: path.display().to_string(), source })?;
        let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
        let reader =
            BufReader::new(stream.try_clone().map_err(|source| ClientError::Io { what: "the socket", source })?);
        Ok(Self { stream, reader })
    }

    /// Sends `req` and reads its answer: the typed result, or why there is none (the engine's
    /// refusal is [`ClientError::Failed`]). A request that would not read back as itself
    /// (a name with a space, say) is [`ClientError::Unsendable`], never sent.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let line = req.line().map_err(ClientError::Unsendable)?;
        let result = self.raw(&line)??;
        Reply::decode(ReplyKind::of(req), result).map_err(|e| {
            ClientError::Protocol(format!("the engine's answer to '{}' does not fit: {e}", first_words(&line)))
        })
    }

    /// Sends one line as it is and reads its answer untyped: for tests of the wire form and of
    /// malformed requests. Everything else uses [`Client::call`].
    pub fn raw(&mut self, line: &str) -> Result<Result<Value, Failure>, ClientError> {
        // A refusal (wrong uid, too many clients) is written before the engine reads anything
        // and closes; the write may then fail, but the reply is there to read.
        let sent = self.stream.write_all(format!("{line}\n").as_bytes());
        let mut reply = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY as u64)
            .read_line(&mut reply)
            .map_err(|source| ClientError::Io { what: "reading the reply", source })?;
        if n == 0 {
            return Err(match sent {
                Err(source) => ClientError::Io { what: "sending the request", source },
                Ok(()) => ClientError::Closed,
            });
        }
        wire::decode(reply.trim_end()).map_err(ClientError::Protocol)
    }

    /// `status`.
    pub fn status(&mut self) -> Result<Status, ClientError> {
        match self.call(&Request::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(mismatch(&other)),
        }
    }

    /// Any request answered with a VM (`vm show`, `vm add`, `vm start`, ...).
    pub fn vm(&mut self, req: &Request) -> Result<Vm, ClientError> {
        match self.call(req)? {
            Reply::Vm(v) => Ok(*v),
            other => Err(mismatch(&other)),
        }
    }

    /// `vm list`.
    pub fn vms(&mut self) -> Result<Vec<Vm>, ClientError> {
        match self.call(&Request::VmList)? {
            Reply::Vms(v) => Ok(v),
            other => Err(mismatch(&other)),
        }
    }

    /// Any `allow` request.
    pub fn allow(&mut self, req: &Request) -> Result<Allowlist, ClientError> {
        match self.call(req)? {
            Reply::Allow(a) => Ok(a),
            other => Err(mismatch(&other)),
        }
    }

    /// `stats [NAME]`.
    pub fn stats(&mut self, name: Option<&str>) -> Result<Vec<VmStats>, ClientError> {
        match self.call(&Request::Stats(name.map(str::to_string)))? {
            Reply::Stats(s) => Ok(s),
            other => Err(mismatch(&other)),
        }
    }
}

/// One call on a fresh connection.
pub fn call(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    Client::connect(path)?.call(req)
}

fn mismatch(r: &Reply) -> ClientError {
    let shape = match r {
        Reply::Status(_) => "a status",
        Reply::Vms(_) => "a VM list",
        Reply::Vm(_) => "a VM",
        Reply::Allow(_) => "an allowlist",
        Reply::Stats(_) => "counters",
        Reply::Latency(_) => "latencies",
        Reply::Log(_) => "a log",
        Reply::Metrics(_) => "metrics",
        Reply::CaptureStarted(_) | Reply::Captured(_) | Reply::CaptureStopped(_) => "a capture",
    };
    ClientError::Protocol(format!("the request asked for another answer than {shape}"))
}

fn first_words(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}
