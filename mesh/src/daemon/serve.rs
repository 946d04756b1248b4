//! The IPC listener: a thread per CLI connection (at most [`MAX_CLIENTS`]), one request and
//! one typed reply each ([`crate::ipc`]), 10 s read and write timeouts. A `vm_connect`
//! through a userspace tunnel hands its connection to the tunnel's thread once the VM accepted
//! (each tunnel counts its connections against the daemon's limit): it then carries the VM's
//! bytes, with no timeout.
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{spawn, Daemon, MAX_CLIENTS};
use crate::ipc::{self, Connected, PeerView, Pong, Reply, Request, Status, VmList};
use crate::tunnel::Route;

/// `vm_connect`s waiting for their VM to accept, at once (they hold no client slot: a VM that
/// never answers cannot make the daemon busy for every other command).
const MAX_DIALS: usize = 64;

/// One of a bounded number of places, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place among `max` counted by `count`, if one is free.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        if count.fetch_add(1, Ordering::SeqCst) >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts CLI connections until the daemon stops.
pub(super) fn accept_loop(d: &Arc<Daemon>, listener: UnixListener) {
    let clients = Arc::new(AtomicUsize::new(0));
    let dials = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if d.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        let Some(slot) = Slot::take(&clients, MAX_CLIENTS) else {
            let _ = ipc::write_frame(
                &mut conn,
                &Reply::err("omertad is busy: too many clients").to_value(),
                ipc::MAX_REPLY,
            );
            continue;
        };
        let (d, dials) = (d.clone(), dials.clone());
        let spawned = spawn("mesh-client", move || serve(&d, conn, slot, &dials));
        if let Err(e) = spawned {
            // The connection and its slot went with the thread that was not made.
            ::engine::warn!("a CLI connection dropped: cannot start a thread: {e}");
        }
    }
}

fn serve(d: &Daemon, mut conn: UnixStream, slot: Slot, dials: &Arc<AtomicUsize>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let reply = match ipc::read_frame(&mut conn, ipc::MAX_FRAME) {
        Ok(body) => match serde_json::from_slice::<Request>(&body) {
            Ok(Request::VmConnect { vm_id, port }) => {
                // Waiting for a VM holds a dial slot, not a client slot.
                drop(slot);
                let Some(_dial) = Slot::take(dials, MAX_DIALS) else {
                    let why = format!("omertad is busy: {MAX_DIALS} connections to VMs are being opened");
                    let _ = ipc::write_frame(&mut conn, &Reply::err(why).to_value(), ipc::MAX_REPLY);
                    return;
                };
                return connect(d, conn, &vm_id, port);
            }
            Ok(req) => handle(d, req),
            Err(e) => Reply::err(format!("not a request: {}", e.to_string().chars().take(120).collect::<String>())),
        },
        Err(e) => Reply::err(format!("reading the request: {e}")),
    };
    let _ = ipc::write_frame(&mut conn, &reply.to_value(), ipc::MAX_REPLY);
    drop(slot);
}

/// Answers `vm_connect`: an address to dial where the tunnel is an interface; else a
/// connection through the userspace tunnel, and then `conn` is the tunnel thread's.
fn connect(d: &Daemon, mut conn: UnixStream, vm_id: &str, port: u16) {
    let tunnel = match d.consumer.route(vm_id) {
        Ok(Route::User(t)) => t,
        Ok(Route::Direct(ip)) => {
            let answer = Connected::Direct { address: format!("{ip}:{port}") };
            let _ = ipc::write_frame(&mut conn, &Reply::ok(&answer).to_value(), ipc::MAX_REPLY);
            return;
        }
        Err(e) => {
            let _ = ipc::write_frame(&mut conn, &Reply::err(e.to_string()).to_value(), ipc::MAX_REPLY);
            return;
        }
    };
    match tunnel.open(port) {
        Ok(id) => {
            let answer = Reply::ok(&Connected::Stream).to_value();
            let unbounded = conn.set_read_timeout(None).and_then(|()| conn.set_write_timeout(None));
            if unbounded.is_ok() && ipc::write_frame(&mut conn, &answer, ipc::MAX_REPLY).is_ok() {
                tunnel.attach(id, conn);
            } else {
                tunnel.abort(id);
            }
        }
        Err(e) => {
            let _ = ipc::write_frame(&mut conn, &Reply::err(format!("VM {vm_id}: {e}")).to_value(), ipc::MAX_REPLY);
        }
    }
}

/// A role's answer as a reply.
fn reply<T: serde::Serialize>(r: Result<T, super::ConsumerError>) -> Reply {
    match r {
        Ok(v) => Reply::ok(&v),
        Err(e) => Reply::err(e.to_string()),
    }
}

fn handle(d: &Daemon, req: Request) -> Reply {
    match req {
        Request::Status => Reply::ok(&status(d)),
        Request::Peers => Reply::ok(&peers(d)),
        Request::Ping { peer_id, timeout } => {
            let wait = Duration::from_millis(timeout.unwrap_or(3000).clamp(100, 30_000));
            reply(d.consumer.ping(&peer_id, wait).map(|(from, rtt)| {
                let ms = rtt.as_secs_f64() * 1000.0;
                Pong { peer_id: peer_id.clone(), endpoint: from.to_string(), latency_ms: (ms * 10.0).round() / 10.0 }
            }))
        }
        Request::VmRequest { peer_id, requirements, timeout_minutes, dry_run } => {
            reply(d.consumer.request_vm(&peer_id, requirements, timeout_minutes, dry_run))
        }
        Request::VmList => Reply::ok(&VmList { renting: d.consumer.list(), providing: d.provider.list() }),
        Request::VmRelease { vm_id } => reply(d.consumer.release(&vm_id)),
        Request::VmShow { vm_id } => reply(d.consumer.show(&vm_id)),
        Request::VmConnect { .. } => Reply::err("vm_connect is answered on its own connection"),
        Request::Stop { release } => match d.stop_on_request(release) {
            Ok(()) => Reply::ok(&serde_json::json!({ "stopping": true, "release": release })),
            Err(e) => Reply::err(format!("cannot stop: {e}")),
        },
    }
}

fn status(d: &Daemon) -> Status {
    let (unopened, refused) = d.link.drops();
    Status {
        network: d.link.network_id().into(),
        network_name: d.link.network_name().into(),
        peer_id: d.link.my_id().into(),
        port: d.opts.port,
        provider: d.opts.provider,
        dry_run: d.opts.dry_run,
        peers: d.link.peer_count(),
        providing: d.provider.count(),
        renting: d.consumer.count(),
        dropped_datagrams: unopened + refused.iter().map(|(_, n)| n).sum::<u64>(),
        refused: {
            let mut m: std::collections::BTreeMap<String, u64> =
                refused.into_iter().map(|(why, n)| (why.name().to_string(), n)).collect();
            let updates = d.provider.endpoint_updates_refused.load(Ordering::Relaxed);
            if updates > 0 {
                m.insert("endpoint_update".into(), updates);
            }
            m
        },
        socket: d.socket_path.display().to_string(),
    }
}

fn peers(d: &Daemon) -> Vec<PeerView> {
    let mut v: Vec<PeerView> = d
        .link
        .peers()
        .into_iter()
        .map(|(peer_id, ep, ago)| PeerView { peer_id, endpoint: ep.to_string(), last_seen_seconds_ago: ago })
        .collect();
    v.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    v
}
