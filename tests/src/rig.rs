//! Rigs: an engine worker in the test process on a socketpair with a synthetic VM, and the
//! helpers that write its allowlist.
use std::net::Ipv4Addr;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use engine::worker::{self, Backend, Event, EventKind, VmWorker};
use engine::Endpoint;

use crate::{backend_name, Netns, SyntheticVm, VmEnd};

/// A running in-process engine worker with its synthetic VM.
#[derive(Debug)]
pub struct Rig {
    /// The worker.
    pub worker: Option<VmWorker>,
    /// The VM's end of the handle.
    pub vm: SyntheticVm,
    /// The worker's events.
    pub events: Receiver<Event>,
}

impl Rig {
    /// Starts a worker for `spec` (keys of `--vm` without `name` and `handle`) on a fresh
    /// socketpair (`stream` picks the stream framing), and checks it reports `backend`.
    pub fn start(ns: &Netns, spec: &str, backend: Backend, stream: bool) -> Self {
        Self::start_edited(ns, spec, backend, stream, |_| {})
    }

    /// [`Rig::start`] with the validated configuration changed by `edit` first (for what no
    /// `--vm` key sets, as a proof rental's key).
    pub fn start_edited(
        ns: &Netns,
        spec: &str,
        backend: Backend,
        stream: bool,
        edit: impl FnOnce(&mut engine::config::VmConfig),
    ) -> Self {
        let ty = if stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        let (ours, theirs): (OwnedFd, OwnedFd) = sys::socketpair(ty).expect("socketpair");
        let fd = theirs.into_raw_fd();
        let handle = if stream { format!("stream-fd:{fd}") } else { format!("fd:{fd}") };
        let mut cfg =
            control::config::vm_from_spec(&format!("name=t,handle={handle},{spec}")).expect("valid test config");
        edit(&mut cfg);
        let (tx, events) = crossbeam_channel::unbounded();
        let worker = spawn_worker(ns, &cfg, backend, tx).expect("start the worker");
        let end = if stream { VmEnd::Stream(UnixStream::from(ours)) } else { VmEnd::Dgram(UnixDatagram::from(ours)) };
        let rig = Self { worker: Some(worker), vm: SyntheticVm { end, id: cfg.identity }, events };
        match rig.events.recv_timeout(Duration::from_secs(5)) {
            Ok(Event { kind: EventKind::Started(name), .. }) => {
                assert_eq!(name, backend_name(backend), "the backend asked for is the one running")
            }
            other => panic!("worker did not start: {other:?}"),
        }
        rig
    }

    /// The worker.
    pub fn worker(&self) -> &VmWorker {
        self.worker.as_ref().expect("worker running")
    }

    /// Waits until the worker's published counters satisfy `pred` (up to 5 s).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&worker::Snapshot) -> bool) -> worker::Snapshot {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.worker().snapshot();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; counters: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for an event other than `Started` (up to 15 s: a bound for a loaded machine, where
    /// a guest booting beside the test may hold both cores).
    pub fn next_event(&self) -> EventKind {
        self.events.recv_timeout(Duration::from_secs(15)).map(|e| e.kind).expect("an event from the worker")
    }

    /// Stops the worker and returns its final counters.
    pub fn stop(&mut self) -> worker::Snapshot {
        self.worker.take().map(VmWorker::stop).unwrap_or_default()
    }
}

/// Starts an engine worker in this process, in the private namespace `ns` proves. The
/// tests start workers only through this (or [`Rig`]); `cli::the_harness_is_the_only_way_in`
/// checks that.
pub fn spawn_worker(
    _ns: &Netns,
    cfg: &engine::config::VmConfig,
    backend: Backend,
    events: crossbeam_channel::Sender<Event>,
) -> Result<VmWorker, worker::StartError> {
    worker::spawn(cfg, backend, events)
}

/// `consumer=...` for each endpoint.
pub fn allow(eps: &[Endpoint]) -> String {
    let list: Vec<String> = eps.iter().map(|e| format!("consumer={e}")).collect();
    list.join(",")
}

/// An endpoint.
pub fn ep(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint::new(Ipv4Addr::from(ip), port)
}
