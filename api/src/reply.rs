//! Replies: what each request's `result` holds, as types. The engine builds these and the
//! wire form is their JSON (keys in sorted order, as before they were typed); clients read
//! them back with [`Reply::decode`], never by string keys. docs/control-protocol.md lists
//! every field.
use std::collections::BTreeMap;

use engine::Endpoint;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::Request;

/// Where a VM is in its life, as every view names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Its worker is starting.
    Starting,
    /// Its worker runs the loop (no guest of the engine's, or one without readiness).
    Running,
    /// A guest the engine started, whose network runs, has not yet said it is ready.
    Booting,
    /// A guest the engine started has said it is ready.
    Ready,
    /// Stopped on request.
    Stopped,
    /// Its handle closed (the VMM went away).
    Exited,
    /// Stopped for a policy violation.
    Terminated,
    /// Its worker failed, or its guest did not become ready in time.
    Failed,
    /// Removed by this request (`vm remove`'s answer only).
    Removed,
    /// A guest whose VMM ended with its launcher (a reboot), its disk kept: no network until
    /// `vm resume` boots it again.
    Kept,
}

impl VmState {
    /// The name on the wire and in every view.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Booting => "booting",
            VmState::Ready => "ready",
            VmState::Stopped => "stopped",
            VmState::Exited => "exited",
            VmState::Terminated => "terminated",
            VmState::Failed => "failed",
            VmState::Removed => "removed",
            VmState::Kept => "kept",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A started guest's readiness, read from its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootState {
    /// Not ready yet.
    Booting,
    /// Said it is ready.
    Ready,
    /// Not ready in time, or its VMM ended first.
    Failed,
}

/// How a cloud image's VM takes its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Addressing {
    /// From the engine's DHCP.
    Dhcp,
    /// From its seed's `network-config`.
    Static,
}

/// `status`: the engine at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The engine's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// The data-plane backend (`uring` or `portable`).
    pub backend: String,
    /// VMs known.
    pub vms: usize,
    /// VMs by state name ([`VmState::name`]); states no VM is in are absent.
    pub states: BTreeMap<String, usize>,
}

/// A VM, as `vm show` and every `vm` command that changes one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Why it ended (terminated, exited, failed), else `None`.
    pub reason: Option<String>,
    /// The mode's name (`filtered`, `conntrack`, `sampled`, `direct`).
    pub mode: String,
    /// `sampled`'s rate, else `None`.
    pub sample_rate: Option<f64>,
    /// The strategy its worker runs, once it started.
    pub strategy: Option<String>,
    /// The backend its worker runs, once it started.
    pub backend: Option<String>,
    /// `file-handle` (the engine is its network) or `vmm-nat` (direct mode).
    pub attachment: String,
    /// Its handle as described (`-` in direct mode).
    pub handle: String,
    /// The VM's MAC.
    pub mac: String,
    /// The VM's address and prefix length (`ADDR/LEN`).
    pub ip: String,
    /// The gateway the engine answers as.
    pub gateway: String,
    /// The gateway's MAC.
    pub gateway_mac: String,
    /// The MTU.
    pub mtu: u16,
    /// The DHCP lease in seconds, if the engine serves DHCP.
    pub dhcp_lease: Option<u32>,
    /// The CPU its worker is pinned to.
    pub cpu: Option<usize>,
    /// Its allowlist.
    #[serde(with = "endpoints")]
    pub allow: Vec<Endpoint>,
    /// How many times its worker started.
    pub starts: u32,
    /// Its host UDP port (where its consumer's WireGuard reaches it), while its worker runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The guest the engine started for it (`vm start`), if any.
    pub guest: Option<Guest>,
    /// Direct mode: scans of the VMM's connections done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rogue_checks: Option<u64>,
    /// Direct mode: connections seen to anything but the consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rogue_connections: Option<Vec<String>>,
    /// Direct mode: connections that could not be judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rogue_blind: Option<Vec<String>>,
}

/// A guest the engine started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    /// Its VMM's process id.
    pub pid: u32,
    /// The kernel it booted.
    pub kernel: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// A cloud image's provisioning (public halves only).
    pub cloud: Option<CloudGuest>,
    /// Its console file.
    pub console: String,
    /// Its readiness.
    pub boot: BootState,
    /// Seconds from start to ready, to a tenth.
    pub ready_after_s: Option<f64>,
    /// Seconds it has to become ready.
    pub boot_timeout_s: u64,
    /// The console's last lines when it failed.
    pub console_tail: Option<Vec<String>>,
    /// Why the guest is paused, while it is: the host ran out of room for its disk (it goes
    /// on by itself when there is room again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// A cloud image VM's provisioning: public keys and addresses only (the private keys are in
/// its seed and nowhere else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudGuest {
    /// The image directory.
    pub image: String,
    /// How it takes its address.
    pub network: Addressing,
    /// The VM's WireGuard public key.
    pub wireguard_public_key: String,
    /// The VM's WireGuard port.
    pub wireguard_port: u16,
    /// The VM's tunnel address (`ADDR/LEN`).
    pub tunnel: String,
    /// The consumer's tunnel address.
    pub consumer_tunnel: String,
    /// The consumer's WireGuard public key.
    pub consumer_key: String,
    /// The consumer's login.
    pub ssh_user: String,
    /// The VM's SSH host key (`TYPE BASE64`).
    pub ssh_host_key: String,
    /// Its fingerprint (`SHA256:...`).
    pub ssh_host_fingerprint: String,
    /// The engine's endpoint-proof public key (X25519, base64) for a proof rental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_key: Option<String>,
}

/// `allow ...`: a VM's allowlist after the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    /// The VM.
    pub vm: String,
    /// Its endpoints.
    #[serde(with = "endpoints")]
    pub allow: Vec<Endpoint>,
}

/// `stats`: one VM's counters, named by the engine's counter vocabulary
/// (`engine::stats::COUNTERS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// The VM.
    pub vm: String,
    /// Every counter of the vocabulary by its name.
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
    /// Frames and datagrams dropped, all reasons.
    pub dropped: u64,
    /// Drops by reason (nonzero ones).
    pub drops: BTreeMap<String, u64>,
    /// The reason it was terminated, if it was.
    pub terminated: Option<String>,
}

impl VmStats {
    /// One counter by its vocabulary name (`engine::stats::COUNTERS`); 0 if unknown.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// Latency percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Frames measured.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// `latency`: one VM's per-frame time in the engine each way (`vm` is `*` for all merged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// The VM, or `*`.
    pub vm: String,
    /// Frames from the VM.
    pub vm_to_host: Percentiles,
    /// Datagrams to the VM.
    pub host_to_vm: Percentiles,
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the VM.
    FromVm,
    /// To the VM.
    ToVm,
}

impl Direction {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Direction::FromVm => "from_vm",
            Direction::ToVm => "to_vm",
        }
    }
}

/// `log`: one blocked frame (header fields only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The VM.
    pub vm: String,
    /// The drop reason's name.
    pub reason: String,
    /// Which way.
    pub direction: Direction,
    /// Header fields.
    pub headers: String,
}

/// `capture start`'s answer: what will be captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureStarted {
    /// The VM.
    pub vm: String,
    /// Frames.
    pub count: usize,
    /// Bytes kept of each (clamped by the engine).
    pub snaplen: usize,
    /// Both directions, forwarded frames too.
    pub all: bool,
}

/// `capture fetch`: the frames so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    /// The VM.
    pub vm: String,
    /// Whether the capture has ended.
    pub done: bool,
    /// The frames.
    pub frames: Vec<CapturedFrame>,
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedFrame {
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
    /// Its length on the wire.
    pub len: u32,
    /// The bytes kept, in hex.
    pub hex: String,
    /// Whether it went to the VM.
    pub to_vm: bool,
    /// Why it was dropped, if it was.
    pub dropped: Option<String>,
}

impl CapturedFrame {
    /// The bytes kept (hex decoded; a malformed pair is skipped).
    pub fn bytes(&self) -> Vec<u8> {
        let s = &self.hex;
        (0..s.len() / 2).filter_map(|i| s.get(2 * i..2 * i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
    }
}

/// `capture stop`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureStopped {
    /// The VM.
    pub vm: String,
}

/// A successful request's result; which variant answers which request is [`ReplyKind::of`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `status`.
    Status(Status),
    /// `vm list`.
    Vms(Vec<Vm>),
    /// `vm show|add|start|stop|restart|remove`.
    Vm(Box<Vm>),
    /// `allow ...`.
    Allow(Allowlist),
    /// `stats`.
    Stats(Vec<VmStats>),
    /// `latency`.
    Latency(Vec<Latency>),
    /// `log`.
    Log(Vec<Blocked>),
    /// `metrics`: the Prometheus text exposition.
    Metrics(String),
    /// `capture start`.
    CaptureStarted(CaptureStarted),
    /// `capture fetch`.
    Captured(Captured),
    /// `capture stop`.
    CaptureStopped(CaptureStopped),
}

/// Which shape of [`Reply`] a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// [`Reply::Status`].
    Status,
    /// [`Reply::Vms`].
    Vms,
    /// [`Reply::Vm`].
    Vm,
    /// [`Reply::Allow`].
    Allow,
    /// [`Reply::Stats`].
    Stats,
    /// [`Reply::Latency`].
    Latency,
    /// [`Reply::Log`].
    Log,
    /// [`Reply::Metrics`].
    Metrics,
    /// [`Reply::CaptureStarted`].
    CaptureStarted,
    /// [`Reply::Captured`].
    Captured,
    /// [`Reply::CaptureStopped`].
    CaptureStopped,
}

impl ReplyKind {
    /// The shape of the answer to `req`.
    pub fn of(req: &Request) -> Self {
        match req {
            Request::Status => ReplyKind::Status,
            Request::VmList => ReplyKind::Vms,
            Request::VmShow(_)
            | Request::VmAdd(_)
            | Request::VmStart(_)
            | Request::VmStartImage(_)
            | Request::VmStop(_)
            | Request::VmRestart(_)
            | Request::VmResume(_)
            | Request::VmRemove(_) => ReplyKind::Vm,
            Request::AllowList(_) | Request::AllowSet(..) | Request::AllowAdd(..) | Request::AllowRemove(..) => {
                ReplyKind::Allow
            }
            Request::Stats(_) => ReplyKind::Stats,
            Request::Latency(_) => ReplyKind::Latency,
            Request::Log(_) => ReplyKind::Log,
            Request::Metrics => ReplyKind::Metrics,
            Request::CaptureStart { .. } => ReplyKind::CaptureStarted,
            Request::CaptureFetch(_) => ReplyKind::Captured,
            Request::CaptureStop(_) => ReplyKind::CaptureStopped,
        }
    }
}

impl Reply {
    /// Reads the `result` of an answer to a request of `kind`.
    pub fn decode(kind: ReplyKind, v: Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value as from;
        Ok(match kind {
            ReplyKind::Status => Reply::Status(from(v)?),
            ReplyKind::Vms => Reply::Vms(from(v)?),
            ReplyKind::Vm => Reply::Vm(Box::new(from(v)?)),
            ReplyKind::Allow => Reply::Allow(from(v)?),
            ReplyKind::Stats => Reply::Stats(from(v)?),
            ReplyKind::Latency => Reply::Latency(from(v)?),
            ReplyKind::Log => Reply::Log(from(v)?),
            ReplyKind::Metrics => Reply::Metrics(from(v)?),
            ReplyKind::CaptureStarted => Reply::CaptureStarted(from(v)?),
            ReplyKind::Captured => Reply::Captured(from(v)?),
            ReplyKind::CaptureStopped => Reply::CaptureStopped(from(v)?),
        })
    }

    /// The wire form of the result (keys sorted, as the engine always wrote them).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Endpoints as `IP:PORT` strings on the wire.
mod endpoints {
    use engine::Endpoint;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(eps: &[Endpoint], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(eps.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| s.parse().map_err(|e| serde::de::Error::custom(format!("'{s}': {e}"))))
            .collect()
    }
}
