//! The messages between the engine and its launcher: one JSON record per `SOCK_SEQPACKET`
//! datagram, numbered ([`Envelope`]), descriptors beside it as `SCM_RIGHTS`. Types only: no
//! socket, no check (the launcher checks every value again, `server.rs`).
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fence::FenceRule;

/// The largest request or reply.
pub(super) const MAX_MESSAGE: usize = 64 * 1024;

/// The most of a VMM's console kept on the host: the launcher frees what comes before its
/// last this many bytes every second, readers skip to them.
pub(super) const CONSOLE_MAX: u64 = 1 << 20;

/// The most VMMs one `held` answer lists (the engine asks again from the last one).
pub(super) const HELD_PAGE: usize = 128;

/// How long the engine waits for an answer (a `stop` takes its grace period on top).
pub(super) const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// A VMM to start: everything the engine may ask for, and the one description of a start
/// on the wire. It names no path and no uid: the kernel, the initrd, the NIC and a cloud
/// image's base travel as open descriptors beside it, and the launcher chooses the VMM's
/// user (the one configured at the fork, or `uid_slot` of its range). The launcher checks
/// every field again and only then makes an [`hv::VmSpec`] of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// The VM's name (consoles are named after it).
    pub name: String,
    /// The kernel command line.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The NIC's MAC address.
    pub mac: String,
    /// Its place in the `--vmm-uid-base` range, if one is set.
    pub uid_slot: Option<u32>,
    /// A cloud image: its NoCloud seed (the launcher makes the seed volume and an overlay
    /// over the base image, which is sent with the request).
    pub image: Option<Box<hv::cloud::Seed>>,
    /// A cloud image's disk size in MB (2^20 bytes; at least the image's; `None`: the
    /// image's own).
    #[serde(default)]
    pub disk_mb: Option<u32>,
}

/// How the NIC reaches the VMM, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum NicKind {
    /// The engine's datagram socketpair: the VMM's end, then the engine's (which a launcher
    /// that outlives its engines keeps, unread, to hand to the next one: `attach`).
    Dgram,
    /// Direct mode: the VMM's user-mode NAT in this namespace of the launcher's.
    Direct { net: u64 },
}

impl StartSpec {
    /// The descriptors a start sends, in this order: the NIC's two ends (a datagram NIC
    /// only: the VMM's, the engine's), the kernel, the initrd, the base image (a cloud image
    /// only).
    pub(super) fn descriptors(&self, nic: NicKind) -> usize {
        2 * usize::from(nic == NicKind::Dgram) + 2 + usize::from(self.image.is_some())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Request {
    /// The first request of an engine that connects to a launcher serving engines.
    Hello,
    /// The VMMs the launcher holds, numbered above `after` (at most [`HELD_PAGE`]).
    Held {
        after: u64,
    },
    /// A VMM started for an engine before this one: its console and the engine's NIC end.
    Attach {
        id: u64,
    },
    /// A kept VMM (its directory outlived its launcher) booted again, as it was described at
    /// its start, from its disk; descriptors: the NIC's two ends, the kernel, the initrd, the
    /// base image.
    Boot {
        id: u64,
    },
    Own,
    DirectNet {
        name: String,
        lan: bool,
    },
    Refence {
        net: u64,
        name: String,
        host: Vec<Ipv4Addr>,
    },
    DropNet {
        net: u64,
    },
    Start {
        spec: StartSpec,
        nic: NicKind,
    },
    Status {
        id: u64,
    },
    Stop {
        id: u64,
        grace_ms: u64,
    },
    Kill {
        id: u64,
    },
    Release {
        id: u64,
    },
    Remove {
        id: u64,
    },
    Sockets {
        id: u64,
    },
    FenceUp,
    FenceSet {
        vm: String,
        rule: FenceRule,
        endpoints: Vec<SocketAddrV4>,
    },
    Finish,
}

impl Request {
    /// How many descriptors travel with it.
    pub(super) fn descriptors(&self) -> usize {
        match self {
            Request::Start { spec, nic } => spec.descriptors(*nic),
            Request::Boot { .. } => 5,
            _ => 0,
        }
    }
}

/// How a VMM ended, on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Ended {
    Exited { code: Option<i32> },
    TimedOut,
    Killed,
}

impl From<hv::Exit> for Ended {
    fn from(e: hv::Exit) -> Self {
        match e {
            hv::Exit::Exited(code) => Ended::Exited { code },
            hv::Exit::TimedOut => Ended::TimedOut,
            hv::Exit::Killed => Ended::Killed,
        }
    }
}

impl From<Ended> for hv::Exit {
    fn from(e: Ended) -> Self {
        match e {
            Ended::Exited { code } => hv::Exit::Exited(code),
            Ended::TimedOut => hv::Exit::TimedOut,
            Ended::Killed => hv::Exit::Killed,
        }
    }
}

/// A VMM the launcher holds (`held`), on the wire and as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVm {
    /// The launcher's number for it.
    pub id: u64,
    /// The VM's name.
    pub name: String,
    /// The VMM's pid (0 for a kept guest).
    pub pid: u32,
    /// Whether it still runs.
    pub running: bool,
    /// Whether the launcher keeps its NIC's engine end (it can be attached).
    pub attachable: bool,
    /// Its directory's id (`STATE/launcher/vms/<dir>`), which outlives the launcher.
    #[serde(default)]
    pub dir: String,
    /// No VMM runs: its directory was kept by a launcher before this one (`boot` starts it).
    #[serde(default)]
    pub kept: bool,
}

/// One socket of a VMM, on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Socket {
    pub(super) proto: String,
    pub(super) local: SocketAddr,
    pub(super) remote: Option<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Reply {
    Done,
    /// How the launcher was set up: an engine with other users or another fence refuses it.
    Hello {
        version: String,
        fence: Option<u32>,
        vmm_uid: Option<u32>,
        vmm_uid_base: Option<u32>,
        durable: bool,
        /// Its state directory (the engine's records are in the same one).
        state_dir: Option<PathBuf>,
    },
    Held {
        list: Vec<HeldVm>,
    },
    /// Beside it: the console (read-only) and the engine's end of the NIC.
    Attached {
        pid: u32,
        console: PathBuf,
        #[serde(default)]
        dir: String,
    },
    Net {
        net: u64,
        path: PathBuf,
    },
    Started {
        id: u64,
        pid: u32,
        console: PathBuf,
        /// Its directory's id.
        #[serde(default)]
        dir: String,
    },
    /// `paused`: why the guest is paused (a host out of room), while it is.
    Status {
        wait_status: Option<i32>,
        #[serde(default)]
        paused: Option<String>,
    },
    Ended {
        ended: Ended,
    },
    Sockets {
        list: Vec<Socket>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Envelope<T> {
    pub(super) seq: u64,
    pub(super) body: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_reads_back_as_itself_with_its_descriptor_count() {
        let spec = StartSpec {
            name: "vm0".into(),
            cmdline: "console=ttyS0".into(),
            memory_mib: 256,
            cpus: 2,
            mac: "52:54:00:12:34:56".into(),
            uid_slot: Some(3),
            image: None,
            disk_mb: None,
        };
        for (nic, fds) in [(NicKind::Dgram, 4), (NicKind::Direct { net: 7 }, 2)] {
            let req = Request::Start { spec: spec.clone(), nic };
            let text = serde_json::to_string(&Envelope { seq: 1, body: &req }).unwrap();
            let back: Envelope<Request> = serde_json::from_str(&text).unwrap();
            let Request::Start { spec: s, nic: n } = &back.body else { panic!("{text}") };
            assert_eq!((s.name.as_str(), s.uid_slot, *n), ("vm0", Some(3), nic), "{text}");
            assert_eq!(back.body.descriptors(), fds, "{text}");
        }
        // A field the launcher does not know (a path, a uid) is refused, not ignored.
        let smuggled = r#"{"seq":1,"body":{"op":"start","nic":"dgram","spec":{"name":"vm0","cmdline":"","memory_mib":64,"cpus":1,"mac":"52:54:00:12:34:56","uid_slot":null,"image":null,"uid":0}}}"#;
        assert!(serde_json::from_str::<Envelope<Request>>(smuggled).is_err());
        assert!(serde_json::from_str::<Envelope<Request>>(&smuggled.replace(r#","uid":0"#, "")).is_ok());
    }
}
