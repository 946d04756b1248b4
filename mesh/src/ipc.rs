//! CLI ⇄ daemon: a unix stream socket in the user's private state directory
//! (`$OMERTA_HOME/run/omertad-<network>.sock`), frames of a 4-byte big-endian length and JSON.
//! One request, one reply, per frame; after the reply to a `vm_connect` that says `stream`,
//! the connection carries the bytes of a TCP connection to the VM both ways, unframed, until
//! either side closes (the streaming channel). Requests and replies are typed here: the daemon
//! serialises the reply types below, the CLI reads them back into the same types.
//! Replies travel as `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::net::HomeError;
use crate::wire::Requirements;

/// Largest request read or written.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest reply read or written (the peers of a full table: about 100 KiB).
pub const MAX_REPLY: usize = 1024 * 1024;

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
    /// Open a TCP connection to a port of a rented VM (see [`Connected`]).
    VmConnect {
        /// Which VM.
        #[serde(rename = "vmId")]
        vm_id: String,
        /// Its TCP port.
        port: u16,
    },
    /// A rented VM's tunnel.
    VmShow {
        /// Which.
        #[serde(rename = "vmId")]
        vm_id: String,
    },
    /// Stop the daemon (`omertad stop`): answered, then it stops as on SIGTERM. Rentals it
    /// provides keep running for the next start unless `release`, which ends each (its
    /// consumer told).
    Stop {
        /// End every rental on the way out.
        #[serde(default)]
        release: bool,
    },
}

/// `vm_connect`'s result: the way to the VM's port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum Connected {
    /// The VM accepted: this connection now carries its bytes both ways (a userspace tunnel).
    Stream,
    /// The tunnel is an interface of this host: connect to this address yourself.
    Direct {
        /// `VM_IP:PORT`.
        address: String,
    },
}

/// `vm_show`'s result: a rented VM's tunnel and how to log in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelView {
    /// The VM's ID.
    pub vm_id: String,
    /// Its provider's peer ID.
    pub provider: String,
    /// Its tunnel address.
    #[serde(rename = "vmIP")]
    pub vm_ip: String,
    /// Ours.
    #[serde(rename = "consumerIP")]
    pub consumer_ip: String,
    /// `kernel`, `wireguard-go`, `userspace` or `none`.
    pub mode: String,
    /// The interface (empty in userspace).
    pub interface: String,
    /// Our WireGuard port.
    pub listen_port: u16,
    /// The provider's UDP port for the VM (its engine's, at the provider's address).
    pub vm_port: Option<u16>,
    /// Where the VM's WireGuard is seen from (none before its first handshake).
    pub endpoint: Option<String>,
    /// The latest handshake, seconds since the epoch (0: none yet).
    pub latest_handshake: u64,
    /// WireGuard bytes received from the VM.
    pub rx_bytes: u64,
    /// WireGuard bytes sent to it.
    pub tx_bytes: u64,
    /// Connections open through a userspace tunnel.
    pub streams: Option<u64>,
    /// Packets of the VM a userspace tunnel's fence dropped, by reason.
    pub fenced: std::collections::BTreeMap<String, u64>,
    /// `active` or `failed: REASON`.
    pub state: String,
    /// Who logs in.
    pub ssh_user: String,
    /// With this key.
    pub ssh_identity: String,
    /// Checking the VM's host key against this file only.
    pub known_hosts: String,
}

/// `status`'s result: the daemon's summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The network's ID.
    pub network: String,
    /// Its name.
    pub network_name: String,
    /// This node's peer ID.
    pub peer_id: String,
    /// The daemon's UDP port.
    pub port: u16,
    /// Whether it rents VMs out.
    pub provider: bool,
    /// Whether it makes no VM and no tunnel.
    pub dry_run: bool,
    /// Peers known.
    pub peers: usize,
    /// VMs provided.
    pub providing: usize,
    /// VMs rented.
    pub renting: usize,
    /// Datagrams dropped since the start: those that did not open, and those admission
    /// refused.
    pub dropped_datagrams: u64,
    /// Admission's refusals since the start, by kind (`source_rate`, `peer_rate`,
    /// `duplicate`, `before_floor`, `other_path`, ...: `mesh::admit::Refusal`; and the provider's
    /// `endpoint_update`: `vm_endpoint_update`s refused).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
    /// The IPC socket.
    pub socket: String,
}

/// One of `peers`' result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerView {
    /// Its peer ID.
    pub peer_id: String,
    /// Where its datagrams come from.
    pub endpoint: String,
    /// Seconds since its last datagram.
    pub last_seen_seconds_ago: u64,
}

/// `ping`'s result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pong {
    /// The peer asked.
    pub peer_id: String,
    /// Where its answer came from.
    pub endpoint: String,
    /// The round trip, milliseconds to a tenth.
    pub latency_ms: f64,
}

/// `vm_request`'s result: the VM and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmGranted {
    /// The VM's ID.
    #[serde(rename = "vmId")]
    pub vm_id: String,
    /// Its tunnel address.
    #[serde(rename = "vmIP")]
    pub vm_ip: String,
    /// This node's tunnel address.
    #[serde(rename = "consumerIP")]
    pub consumer_ip: String,
    /// The WireGuard interface.
    pub interface: String,
    /// `kernel`, `wireguard-go` or `none (dry run)`.
    #[serde(rename = "tunnelKind")]
    pub tunnel_kind: String,
    /// The interface's listen port.
    #[serde(rename = "listenPort")]
    pub listen_port: u16,
    /// The way in: `omerta ssh VM_ID`, whatever the tunnel.
    #[serde(rename = "omertaSsh")]
    pub omerta_ssh: String,
    /// The raw SSH command line, where the tunnel is an interface of this host (else empty).
    #[serde(rename = "sshCommand")]
    pub ssh_command: String,
    /// The VM's host key fingerprint (pinned).
    #[serde(rename = "sshHostFingerprint")]
    pub ssh_host_fingerprint: String,
    /// The provider's peer ID.
    pub provider: String,
    /// Nothing was made.
    #[serde(rename = "dryRun")]
    pub dry_run: bool,
    /// Minutes without heartbeat answers before the provider reclaims it.
    #[serde(rename = "heartbeatTimeoutMinutes")]
    pub heartbeat_timeout_minutes: u64,
}

/// A VM this node rents, as `vm_list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RentedView {
    /// Its ID.
    #[serde(rename = "vmId")]
    pub vm_id: String,
    /// Its provider's peer ID.
    pub provider: String,
    /// Its tunnel address.
    #[serde(rename = "vmIP")]
    pub vm_ip: String,
    /// The WireGuard interface.
    pub interface: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Nothing was made.
    #[serde(rename = "dryRun")]
    pub dry_run: bool,
    /// Its host key fingerprint.
    #[serde(rename = "sshHostFingerprint")]
    pub ssh_host_fingerprint: String,
    /// `active` or `failed: REASON`.
    pub state: String,
    /// The latest WireGuard handshake, seconds since the epoch (0: none; `null`: no tunnel).
    #[serde(rename = "lastHandshake")]
    pub last_handshake: Option<u64>,
}

/// A provided VM's state, in `vm_list` and in the provider's state file (`"booting"`,
/// `"ready"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RentalState {
    /// Being started: written before the engine is asked, so that a daemon that dies midway
    /// leaves no VM its successor does not know of (never listed).
    Starting,
    /// The engine started it; its guest is not up yet.
    Booting,
    /// Its guest is up (a dry run's at once).
    Ready,
}

impl std::fmt::Display for RentalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RentalState::Starting => "starting",
            RentalState::Booting => "booting",
            RentalState::Ready => "ready",
        })
    }
}

/// A VM this node provides, as `vm_list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProvidedView {
    /// Its ID.
    #[serde(rename = "vmId")]
    pub vm_id: String,
    /// Its consumer's peer ID.
    pub consumer: String,
    /// Its tunnel address.
    #[serde(rename = "vmIP")]
    pub vm_ip: String,
    /// The engine's name for it.
    #[serde(rename = "engineName")]
    pub engine_name: String,
    /// The consumer's WireGuard endpoint (the VM's only destination).
    #[serde(rename = "consumerEndpoint")]
    pub consumer_endpoint: String,
    /// `booting` or `ready`.
    pub state: RentalState,
    /// Seconds since the epoch.
    pub started: u64,
    /// Nothing was started.
    #[serde(rename = "dryRun")]
    pub dry_run: bool,
    /// vCPUs.
    pub cpus: u32,
    /// Memory.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
}

/// `vm_list`'s result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmList {
    /// The VMs this node rents, by ID.
    pub renting: Vec<RentedView>,
    /// The VMs this node provides, by ID.
    pub providing: Vec<ProvidedView>,
}

/// `vm_release`'s result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Released {
    /// The VM.
    #[serde(rename = "vmId")]
    pub vm_id: String,
    /// Always true.
    pub released: bool,
}

/// A reply as it travels: `ok` and either `result` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// Whether the request was served.
    #[serde(default)]
    pub ok: bool,
    /// Its result, when served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A served request's reply.
    pub fn ok(result: &impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(v) => Self { ok: true, result: Some(v), error: None },
            Err(e) => Self::err(format!("encoding the reply: {e}")),
        }
    }

    /// A refused or failed request's reply.
    pub fn err(msg: impl Into<String>) -> Self {
        Self { ok: false, result: None, error: Some(msg.into()) }
    }

    /// As JSON (its keys in the order serde_json's map keeps them: sorted).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
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
pub fn write_frame(s: &mut UnixStream, v: &Value, max: usize) -> std::io::Result<()> {
    let body = serde_json::to_vec(v)?;
    if body.len() > max {
        return Err(std::io::Error::other(format!("a frame of {} bytes (at most {max})", body.len())));
    }
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("a frame over 4 GiB"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out)
}

/// Reads one frame.
pub fn read_frame(s: &mut UnixStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(std::io::Error::other(format!("a frame of {n} bytes (at most {max})")));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// The socket of the daemon for `network`.
pub fn socket_path(home: &crate::net::Home, network: &str) -> Result<PathBuf, HomeError> {
    Ok(home.sub("run")?.join(format!("omertad-{network}.sock")))
}

/// Sends `vm_connect` and reads its reply: the connection (carrying the VM's bytes when the
/// answer is [`Connected::Stream`]) and the answer. `timeout` bounds the wait for the answer
/// (the VM has 10 s to accept); none is left on the connection afterwards.
pub fn connect(path: &Path, req: &Request, timeout: Duration) -> Result<(UnixStream, Connected), IpcError> {
    let mut s = open(path, timeout)?;
    let answer = exchange(&mut s, req)?;
    s.set_read_timeout(None).and_then(|()| s.set_write_timeout(None)).map_err(IpcError::Socket)?;
    Ok((s, answer))
}

fn open(path: &Path, timeout: Duration) -> Result<UnixStream, IpcError> {
    let s = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => IpcError::NoDaemon(path.into()),
        _ => IpcError::Connect { path: path.into(), source: e },
    })?;
    s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout))).map_err(IpcError::Socket)?;
    Ok(s)
}

fn exchange<T: DeserializeOwned>(s: &mut UnixStream, req: &Request) -> Result<T, IpcError> {
    let v = serde_json::to_value(req).map_err(IpcError::Encode)?;
    write_frame(s, &v, MAX_FRAME).map_err(IpcError::Send)?;
    let body = read_frame(s, MAX_REPLY).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => IpcError::Timeout,
        _ => IpcError::Read(e),
    })?;
    let reply: Reply = serde_json::from_slice(&body).map_err(IpcError::NotJson)?;
    if !reply.ok {
        return Err(IpcError::Daemon(reply.error.unwrap_or_else(|| "omertad failed".into())));
    }
    serde_json::from_value(reply.result.unwrap_or(Value::Null)).map_err(IpcError::NotJson)
}

/// Sends a request and waits for the reply (`timeout` bounds each read and write); an error
/// reply becomes [`IpcError::Daemon`] with its message. The result is read as `T` (the reply
/// type of the request: [`Status`], `Vec<PeerView>`, [`Pong`], [`VmGranted`], [`VmList`],
/// [`Released`]).
pub fn call<T: DeserializeOwned>(path: &Path, req: &Request, timeout: Duration) -> Result<T, IpcError> {
    exchange(&mut open(path, timeout)?, req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let req = serde_json::to_value(Request::Ping { peer_id: "0123456789abcdef".into(), timeout: Some(5) }).unwrap();
        write_frame(&mut a, &req, MAX_FRAME).unwrap();
        let back: Request = serde_json::from_slice(&read_frame(&mut b, MAX_FRAME).unwrap()).unwrap();
        assert_eq!(back, Request::Ping { peer_id: "0123456789abcdef".into(), timeout: Some(5) });
        a.write_all(&(64 * 1024 + 1u32).to_be_bytes()).unwrap();
        assert!(read_frame(&mut b, MAX_FRAME).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"vm_destroy_everything"}"#).is_err());
    }

    /// The typed replies carry the keys the daemon's hand-built JSON carried, and print the
    /// same bytes (serde_json's map keeps keys sorted, as `json!` did).
    #[test]
    fn replies_keep_their_keys_and_bytes() {
        use serde_json::json;
        let granted = VmGranted {
            vm_id: "0123456789abcdef".into(),
            vm_ip: "10.60.1.2".into(),
            consumer_ip: "10.60.1.1".into(),
            interface: "wg01234567".into(),
            tunnel_kind: "kernel".into(),
            listen_port: 51900,
            omerta_ssh: "omerta ssh 0123456789abcdef".into(),
            ssh_command: "ssh x".into(),
            ssh_host_fingerprint: "SHA256:x".into(),
            provider: "fedcba9876543210".into(),
            dry_run: false,
            heartbeat_timeout_minutes: 10,
        };
        let old = json!({
            "vmId": "0123456789abcdef", "vmIP": "10.60.1.2", "consumerIP": "10.60.1.1",
            "interface": "wg01234567", "tunnelKind": "kernel", "listenPort": 51900, "sshCommand": "ssh x",
            "omertaSsh": "omerta ssh 0123456789abcdef",
            "sshHostFingerprint": "SHA256:x", "provider": "fedcba9876543210", "dryRun": false,
            "heartbeatTimeoutMinutes": 10,
        });
        let ok = |v: Value| json!({"ok": true, "result": v}).to_string();
        assert_eq!(Reply::ok(&granted).to_value().to_string(), ok(old));
        let rented = RentedView {
            vm_id: "0123456789abcdef".into(),
            provider: "fedcba9876543210".into(),
            vm_ip: "10.60.1.2".into(),
            interface: "wg01234567".into(),
            created: 7,
            dry_run: true,
            ssh_host_fingerprint: "SHA256:x".into(),
            state: "active".into(),
            last_handshake: None,
        };
        let provided = ProvidedView {
            vm_id: "0123456789abcdef".into(),
            consumer: "fedcba9876543210".into(),
            vm_ip: "10.60.1.2".into(),
            engine_name: "mesh-0123456789abcdef".into(),
            consumer_endpoint: "192.0.2.2:51900".into(),
            state: RentalState::Booting,
            started: 9,
            dry_run: false,
            cpus: 2,
            memory_mb: 2048,
        };
        let old = json!({
            "renting": [{"vmId": "0123456789abcdef", "provider": "fedcba9876543210", "vmIP": "10.60.1.2",
                "interface": "wg01234567", "created": 7, "dryRun": true, "sshHostFingerprint": "SHA256:x",
                "state": "active", "lastHandshake": null}],
            "providing": [{"vmId": "0123456789abcdef", "consumer": "fedcba9876543210", "vmIP": "10.60.1.2",
                "engineName": "mesh-0123456789abcdef", "consumerEndpoint": "192.0.2.2:51900", "state": "booting",
                "started": 9, "dryRun": false, "cpus": 2, "memoryMB": 2048}],
        });
        let list = VmList { renting: vec![rented], providing: vec![provided] };
        assert_eq!(Reply::ok(&list).to_value().to_string(), ok(old));
        let back: VmList = serde_json::from_value(Reply::ok(&list).to_value()["result"].clone()).unwrap();
        assert_eq!(back, list);
        assert_eq!(Reply::err("no").to_value().to_string(), json!({"ok": false, "error": "no"}).to_string());
        let pong = Pong { peer_id: "p".into(), endpoint: "192.0.2.1:9999".into(), latency_ms: 2.0 };
        let old = json!({"peerId": "p", "endpoint": "192.0.2.1:9999", "latencyMs": 2.0});
        assert_eq!(Reply::ok(&pong).to_value().to_string(), ok(old));
    }
}
