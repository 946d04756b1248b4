//! Network namespaces: the private namespace every sending test runs in and its proof
//! ([`Netns`], which every helper that spawns takes), its consumers' namespace, and `ip`
//! helpers for them.
use std::net::{Ipv4Addr, UdpSocket};

use omerta_perf::command::run;

use crate::{require, ForbiddenSinks, CONSUMER_NET};

/// The inode of a network namespace file.
fn netns_id(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The network namespace of the test runner (the process's main thread, which never leaves it).
pub fn runner_netns() -> Option<u64> {
    netns_id("/proc/self/ns/net")
}

/// The network namespace of a process.
pub fn netns_of(pid: u32) -> Option<u64> {
    netns_id(&format!("/proc/{pid}/ns/net"))
}

/// The calling thread's network namespace.
pub fn current_netns() -> Option<u64> {
    netns_id("/proc/thread-self/ns/net")
}

/// True when the calling thread is in a network namespace other than the runner's.
pub fn in_private_netns() -> bool {
    matches!((netns_id("/proc/thread-self/ns/net"), runner_netns()), (Some(a), Some(b)) if a != b)
}

/// Refuses (an `Err` naming `what`) outside a private network namespace.
pub fn check_private_netns(what: &str) -> Result<(), String> {
    if in_private_netns() {
        Ok(())
    } else {
        Err(format!(
            "harness: refusing to start {what} in the runner's network namespace: its traffic could leave \
             the machine; run the test inside omerta_it::private_netns"
        ))
    }
}

/// The consumers' namespace of a private namespace: the far end of a veth pair `oc0`
/// (192.0.2.253/30) ↔ `oc1` (192.0.2.254/30), which owns 198.51.100.0/24. Consumers live
/// there, not on the private namespace's own `lo`, because the engine refuses the provider
/// host's own addresses as consumers. Deleted on drop.
#[derive(Debug)]
struct ConsumerNs(String);

impl Drop for ConsumerNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn make_consumer_ns() -> Result<ConsumerNs, String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("omerta-cn{}-{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let run = |args: &[&str]| run(std::process::Command::new("ip").args(args)).map(drop);
    let _ = run(&["netns", "del", &name]);
    run(&["netns", "add", &name])?;
    let ns = ConsumerNs(name.clone());
    let net = format!("{}.0/24", CONSUMER_NET.map(|b| b.to_string()).join("."));
    run(&["link", "add", "oc0", "type", "veth", "peer", "name", "oc1", "netns", &name])?;
    run(&["addr", "add", "192.0.2.253/30", "dev", "oc0"])?;
    run(&["link", "set", "oc0", "up"])?;
    run(&["-n", &name, "addr", "add", "192.0.2.254/30", "dev", "oc1"])?;
    run(&["-n", &name, "link", "set", "oc1", "up"])?;
    run(&["-n", &name, "link", "set", "lo", "up"])?;
    // The whole consumer range is local there: any address of it can be bound.
    run(&["-n", &name, "route", "add", "local", &net, "dev", "lo"])?;
    run(&["route", "add", &net, "via", "192.0.2.254", "dev", "oc0"])?;
    Ok(ns)
}

/// Proof that the calling thread is inside a fresh private network namespace that holds only
/// `lo` and the veth pairs the test makes, with its consumers' namespace behind `oc0`.
///
/// Its only constructor enters such a namespace ([`private_netns`] and [`sealed`] make one and
/// hand it to their closure), and it cannot leave its thread (a namespace belongs to a thread):
/// it is neither `Send` nor `Sync`. Everything in the harness that spawns something that could
/// send (an engine, a worker, a guest, a consumer, a sink, a daemon) takes a `&Netns`, so a test
/// that forgets the namespace does not compile:
///
/// ```compile_fail
/// // No token, no engine.
/// let e = omerta_it::EngineProc::start("x", &[]);
/// ```
///
/// ```compile_fail
/// // The token stays on the namespace's thread.
/// fn send<T: Send>() {}
/// send::<omerta_it::Netns>();
/// ```
///
/// ```compile_fail
/// // Nor is it shared with another.
/// fn sync<T: Sync>() {}
/// sync::<omerta_it::Netns>();
/// ```
///
/// ```compile_fail
/// // And no one else makes one.
/// let ns = omerta_it::Netns { id: 0 };
/// ```
#[derive(Debug)]
pub struct Netns {
    id: u64,
    consumers: ConsumerNs,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Netns {
    /// Moves the calling thread into a new network namespace with only `lo` (up), checks that
    /// nothing is routed out of it, and makes its consumers' namespace.
    fn enter() -> Result<Self, String> {
        sys::unshare_network().map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        check_private_netns("a private network namespace")?;
        run(std::process::Command::new("ip").args(["link", "set", "lo", "up"]))?;
        // Proof that the namespace is sealed: no route to anywhere but loopback.
        let probe = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        if probe.send_to(b"x", "192.0.2.1:9").is_ok() {
            return Err("the new namespace has a route out".into());
        }
        let id = current_netns().ok_or("no namespace id")?;
        let consumers = make_consumer_ns()?;
        Ok(Self { id, consumers, _thread: std::marker::PhantomData })
    }

    /// The namespace's inode (as [`current_netns`] and [`netns_of`] read it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name (`ip netns`) of its consumers' namespace.
    pub fn consumers(&self) -> &str {
        &self.consumers.0
    }
}

/// A UDP socket bound to `ip:port` in the consumers' namespace of `ns` (an address of
/// 198.51.100.0/24, or one added with [`consumer_address`]).
pub fn consumer_socket(ns: &Netns, ip: Ipv4Addr, port: u16) -> UdpSocket {
    in_named_netns(ns.consumers(), move || UdpSocket::bind((ip, port)).expect("bind a consumer"))
}

/// Runs `f` on a thread in the consumers' namespace of `ns`: sockets it makes (a TCP listener
/// playing "the internet", say) stay there.
pub fn in_consumers_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_named_netns(ns.consumers(), f)
}

/// Runs `f` on a thread inside the named namespace `name` (`ip netns`), a namespace the test
/// made; sockets it makes stay there.
pub(crate) fn in_named_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("a namespace the test made");
        sys::enter_network(std::os::fd::AsFd::as_fd(&ns)).unwrap_or_else(|e| panic!("setns: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Makes `ip` a consumer address outside 198.51.100.0/24 (the real-guest tests' 203.0.113.2):
/// local in the consumers' namespace, routed there from the caller's.
pub fn consumer_address(ns: &Netns, ip: [u8; 4]) {
    let name = ns.consumers();
    let a = format!("{}/32", Ipv4Addr::from(ip));
    let _ = std::process::Command::new("ip").args(["-n", name, "route", "add", "local", &a, "dev", "lo"]).output();
    let _ = std::process::Command::new("ip").args(["route", "add", &a, "via", "192.0.2.254", "dev", "oc0"]).output();
}

/// Runs `f` in a private namespace (see [`private_netns`]) with sinks on the forbidden
/// destinations, and fails if any of them received anything.
pub fn sealed(f: impl FnOnce(&Netns) + Send + 'static) {
    private_netns(|ns| {
        let sinks = ForbiddenSinks::start(ns);
        f(ns);
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}");
    });
}

/// Runs `f` on a thread that lives in a new network namespace with only `lo` (up), and a
/// consumers' namespace behind a veth pair, handing it the proof ([`Netns`]). Sockets created
/// there, by the engine included, cannot reach anything beyond the namespaces the test made.
/// When no namespace can be made, `require` fails the test under `CI=true` (and it is skipped,
/// saying why, elsewhere): `None`.
pub fn private_netns<T: Send + 'static>(f: impl FnOnce(&Netns) -> T + Send + 'static) -> Option<T> {
    let t = std::thread::spawn(move || -> Result<T, String> {
        let ns = Netns::enter()?;
        Ok(f(&ns))
    });
    match t.join() {
        Ok(Ok(v)) => Some(v),
        Ok(Err(why)) => {
            require("a private network namespace (root, unshare)", Err(why));
            None
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Adds `ip`/32 to `lo` in the private namespace `ns` (the calling thread's).
pub fn add_local_address(_ns: &Netns, ip: [u8; 4]) {
    let addr = format!("{}/32", Ipv4Addr::from(ip));
    let st = std::process::Command::new("ip").args(["addr", "add", &addr, "dev", "lo"]).status().expect("ip");
    assert!(st.success(), "ip addr add {addr} dev lo");
}

/// Runs `ip args`, failing the test with its error.
pub fn ip(args: &[&str]) {
    if let Err(e) = run(std::process::Command::new("ip").args(args)) {
        panic!("{e}");
    }
}
