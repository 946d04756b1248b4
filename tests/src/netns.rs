//! Network namespaces: the private namespace every sending test runs in (the no-leak rule's
//! check, `assert_private_netns`), its consumers' namespace, and `ip` helpers for them.
use std::net::{Ipv4Addr, UdpSocket};

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

/// Panics outside a private network namespace.
pub fn assert_private_netns(what: &str) {
    if let Err(e) = check_private_netns(what) {
        panic!("{e}");
    }
}

/// The consumers' namespace of each private namespace (by its inode): the far end of a veth
/// pair `oc0` (192.0.2.253/30) ↔ `oc1` (192.0.2.254/30), which owns 198.51.100.0/24. Consumers
/// live there, not on the private namespace's own `lo`, because the engine refuses the
/// provider host's own addresses as consumers.
static CONSUMER_NS: std::sync::Mutex<Vec<(u64, String)>> = std::sync::Mutex::new(Vec::new());

/// A consumers' namespace, deleted on drop.
struct ConsumerNs(String);

impl Drop for ConsumerNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
        if let Ok(mut m) = CONSUMER_NS.lock() {
            m.retain(|(_, n)| *n != self.0);
        }
    }
}

fn make_consumer_ns() -> Result<ConsumerNs, String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("omerta-cn{}-{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
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
    let me = current_netns().ok_or("no namespace id")?;
    CONSUMER_NS.lock().map_err(|_| "poisoned")?.push((me, name));
    Ok(ns)
}

/// The name of the consumers' namespace of the caller's private namespace.
fn consumers_ns(what: &str) -> String {
    assert_private_netns(what);
    let me = current_netns().expect("namespace id");
    let m = CONSUMER_NS.lock().expect("consumer namespaces");
    let name = m.iter().find(|(n, _)| *n == me).map(|(_, n)| n.clone());
    name.expect("the caller's private namespace has a consumers' namespace")
}

/// A UDP socket bound to `ip:port` in the consumers' namespace of the caller's private
/// namespace (an address of 198.51.100.0/24, or one added with [`consumer_address`]).
pub fn consumer_socket(ip: Ipv4Addr, port: u16) -> UdpSocket {
    in_named_netns(&consumers_ns("a consumer"), move || UdpSocket::bind((ip, port)).expect("bind a consumer"))
}

/// Runs `f` on a thread in the consumers' namespace of the caller's private namespace:
/// sockets it makes (a TCP listener playing "the internet", say) stay there.
pub fn in_consumers_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_named_netns(&consumers_ns("something in the consumers' namespace"), f)
}

/// Runs `f` on a thread inside the named namespace `name` (`ip netns`), a namespace the test
/// made; sockets it makes stay there.
pub(crate) fn in_named_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("a namespace the test made");
        #[allow(unsafe_code)]
        // SAFETY: setns takes a descriptor we own and moves only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Makes `ip` a consumer address outside 198.51.100.0/24 (the real-guest tests' 203.0.113.2):
/// local in the consumers' namespace, routed there from the caller's.
pub fn consumer_address(ip: [u8; 4]) {
    let name = consumers_ns("a consumer address");
    let a = format!("{}/32", Ipv4Addr::from(ip));
    let _ = std::process::Command::new("ip").args(["-n", &name, "route", "add", "local", &a, "dev", "lo"]).output();
    let _ = std::process::Command::new("ip").args(["route", "add", &a, "via", "192.0.2.254", "dev", "oc0"]).output();
}

/// Runs `f` in a private namespace (see [`private_netns`]) with sinks on the forbidden
/// destinations, and fails if any of them received anything.
pub fn sealed(f: impl FnOnce() + Send + 'static) {
    private_netns(|| {
        let sinks = ForbiddenSinks::start();
        f();
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}");
    });
}

/// Runs `f` on a thread that lives in a new network namespace with only `lo` (up), and a
/// consumers' namespace behind a veth pair (see [`CONSUMER_NS`]). Sockets created there, by
/// the engine included, cannot reach anything beyond the namespaces the test made.
pub fn private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let t = std::thread::spawn(move || -> Result<T, String> {
        #[allow(unsafe_code)]
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread (and what
        // it creates from now on) into a new, empty network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let out = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).output();
        let out = out.map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip link set lo up: {}", String::from_utf8_lossy(&out.stderr)));
        }
        // Proof that the namespace is sealed: no route to anywhere but loopback.
        let probe = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        if probe.send_to(b"x", "192.0.2.1:9").is_ok() {
            return Err("the new namespace has a route out".into());
        }
        let _consumers = make_consumer_ns()?;
        Ok(f())
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

/// Adds `ip`/32 to `lo` in the current thread's network namespace.
pub fn add_local_address(ip: [u8; 4]) {
    let addr = format!("{}/32", Ipv4Addr::from(ip));
    let st = std::process::Command::new("ip").args(["addr", "add", &addr, "dev", "lo"]).status().expect("ip");
    assert!(st.success(), "ip addr add {addr} dev lo");
}

/// Runs `ip args`, failing the test with its error.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
