//! Real guests behind the engine: a Debian cloud kernel under QEMU (TCG here), its virtio NIC
//! on one end of the engine's socketpair. Everything (the engine's worker and host sockets,
//! the consumer, QEMU itself) runs inside a private network namespace the test creates, where
//! the consumer lives at 10.250.0.2 and nothing can leave the machine. At most two guests run
//! at once; each has a hard timeout; a failure message carries the guest's serial console.
use std::net::UdpSocket;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::config::VmConfig;
use engine::worker::{self, Backend, EventKind, Snapshot};
use engine::{DropReason, Endpoint};
use omerta_it::{add_local_address, boot_guest, private_netns, GuestOpts, GuestRun, GuestSlot, CONSUMER_IP};

const TIMEOUT: Duration = Duration::from_secs(90);

fn consumer_ep() -> Endpoint {
    Endpoint::new(CONSUMER_IP.into(), 51820)
}

/// The consumer of these tests, at 10.250.0.2:51820 in the current namespace: it answers
/// `echo:<msg>` to every datagram and records what it received, until `stop` is set.
#[allow(clippy::type_complexity)]
fn echo_consumer() -> (Arc<AtomicBool>, Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    add_local_address(CONSUMER_IP);
    let consumer = UdpSocket::bind((std::net::Ipv4Addr::from(CONSUMER_IP), 51820)).expect("consumer");
    consumer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let (stop, received) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let echo = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = consumer.recv_from(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let _ = consumer.send_to(format!("echo:{msg}").as_bytes(), from);
                    received.lock().unwrap().push(msg);
                }
            }
        })
    };
    (stop, received, echo)
}

/// What a run behind the engine produced.
#[derive(Debug)]
struct Outcome {
    run: GuestRun,
    stats: Snapshot,
    events: Vec<EventKind>,
    received: Vec<String>,
}

impl Outcome {
    fn expect(&self, ok: bool, what: &str) {
        assert!(
            ok,
            "{what}\n--- engine: {:?}\n--- events: {:?}\n--- consumer got: {:?}\n--- guest console:\n{}",
            self.stats.counters, self.events, self.received, self.run.console
        );
    }
}

/// Boots a guest with `script` behind an engine worker (`spec` adds `--vm` keys), with a
/// consumer at 10.250.0.2:51820 that answers `echo:<msg>` to every datagram. A `Terminate`
/// kills the guest, as the control plane does.
fn behind_engine(tag: &str, spec: &str, firewall: bool, script: &str) -> Option<Outcome> {
    behind_engine_framed(tag, spec, firewall, script, false)
}

/// [`behind_engine`] with a choice of framing: `stream` puts the guest's NIC on a stream
/// socketpair (QEMU `-netdev stream`, u32 length prefixes) instead of a datagram one.
fn behind_engine_framed(tag: &str, spec: &str, firewall: bool, script: &str, stream: bool) -> Option<Outcome> {
    let (tag, spec, script) = (tag.to_string(), spec.to_string(), script.to_string());
    private_netns(move || {
        let _slot = GuestSlot::take();
        let (stop, received, echo) = echo_consumer();
        let ty = if stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        let (vm_end, engine_end): (OwnedFd, OwnedFd) = engine::io::socketpair(ty).unwrap();
        let handle = if stream { "stream-fd" } else { "fd" };
        let cfg = VmConfig::from_spec(&format!(
            "name={tag},handle={handle}:{},consumer={}{spec}",
            engine_end.into_raw_fd(),
            consumer_ep()
        ))
        .expect("test VM config");
        let (tx, events) = crossbeam_channel::unbounded();
        let w = worker::spawn(&cfg, Backend::Auto, tx).expect("engine worker");
        let opts = GuestOpts { script, consumer: consumer_ep(), firewall, ipv6: false, timeout: TIMEOUT };
        let nic = if stream { hv::Nic::StreamFd(vm_end) } else { hv::Nic::DgramFd(vm_end) };
        let (mut vm, _dir) = boot_guest(&opts, nic, &tag)?;
        let mut seen = Vec::new();
        let exit = loop {
            if let Ok(ev) = events.recv_timeout(Duration::from_millis(50)) {
                let terminate = matches!(ev.kind, EventKind::Terminated(_));
                seen.push(ev.kind);
                if terminate {
                    break vm.kill();
                }
            }
            if vm.try_wait().is_some() {
                break vm.wait();
            }
        };
        std::thread::sleep(Duration::from_millis(200));
        let run = GuestRun { exit, console: vm.console() };
        stop.store(true, Ordering::Relaxed);
        let _ = echo.join();
        let stats = w.stop();
        seen.extend(events.try_iter().map(|e| e.kind));
        let received = received.lock().unwrap().clone();
        Some(Outcome { run, stats, events: seen, received })
    })
    .flatten()
}

fn c() -> String {
    consumer_ep().to_string()
}

#[test]
fn file_handle_attachment_creation() {
    let Some(o) = behind_engine("fh", "", false, "cat /sys/class/net/eth0/address; ip -4 addr show eth0") else {
        return;
    };
    o.expect(o.run.rc() == Some(0), "the guest ran its script");
    o.expect(o.run.saw("52:54:00:12:34:56"), "its NIC is the one attached to the engine's socket");
    o.expect(o.run.saw("10.0.2.15/24"), "with its static address");
}

#[test]
fn vm_sends_frames() {
    let Some(o) = behind_engine("sends", "", false, &format!("omerta-guest udp-send {} hello-consumer 5", c())) else {
        return;
    };
    o.expect(o.run.saw("SENT 5"), "the guest sent");
    o.expect(o.received.iter().filter(|m| *m == "hello-consumer").count() == 5, "the consumer received all five");
    o.expect(o.stats.counters.forwarded_udp == 5, "the engine forwarded five");
}

#[test]
fn vm_receives_frames() {
    let Some(o) = behind_engine("receives", "", false, &format!("omerta-guest udp-rr {} question 5000", c())) else {
        return;
    };
    o.expect(o.run.saw("REPLY:echo:question"), "the consumer's reply reached the guest");
    o.expect(o.stats.counters.to_vm_frames >= 1, "the engine wrote it to the VM");
}

#[test]
fn arp_resolution() {
    let script = format!("omerta-guest udp-send {} x 1; ip neigh show dev eth0", c());
    let Some(o) = behind_engine("arp", "", false, &script) else { return };
    o.expect(o.run.saw("10.0.2.2 lladdr 52:55:0a:00:02:02"), "the guest resolved its gateway through the engine");
    o.expect(o.stats.counters.arp_replies >= 1, "the engine answered ARP");
}

#[test]
fn dhcp_optional() {
    let script = format!("ip -4 addr show eth0; omerta-guest udp-rr {} static 5000", c());
    let Some(o) = behind_engine("dhcp", "", false, &script) else { return };
    o.expect(o.run.saw("inet 10.0.2.15/24"), "a static address, set without DHCP");
    o.expect(o.run.saw("REPLY:echo:static"), "and it works");
    o.expect(o.stats.counters.drops_for(DropReason::Ipv4Broadcast) == 0, "the guest sent no DHCP broadcast");
}

#[test]
fn vm_to_consumer_udp() {
    let Some(o) = behind_engine("udp", "", true, &format!("omerta-guest udp-rr {} wg-handshake 5000", c())) else {
        return;
    };
    o.expect(o.run.saw("REPLY:echo:wg-handshake"), "UDP to the consumer's port is delivered and answered");
    o.expect(o.received == vec!["wg-handshake".to_string()], "exactly the payload");
}

#[test]
fn vm_to_consumer_ping() {
    let script = format!("omerta-guest ping {} 3", std::net::Ipv4Addr::from(CONSUMER_IP));
    let Some(o) = behind_engine("ping", "", true, &script) else { return };
    o.expect(o.run.saw("PING-REPLIES 3"), "ICMP echo reaches the consumer and the replies come back");
    o.expect(o.stats.counters.forwarded_icmp == 3, "through the engine");
}

#[test]
fn bidirectional_traffic() {
    let script =
        format!("i=0; while [ $i -lt 20 ]; do omerta-guest udp-rr {} m$i 3000 || exit 1; i=$((i+1)); done", c());
    let Some(o) = behind_engine("bidir", "", false, &script) else { return };
    o.expect(o.run.rc() == Some(0), "twenty round trips");
    o.expect(o.run.saw("REPLY:echo:m19"), "the last one answered");
    o.expect(o.stats.counters.forwarded_udp == 20 && o.stats.counters.to_vm_frames >= 20, "both directions counted");
}

#[test]
fn filtered_mode_isolation_from_a_real_guest() {
    // Internet, provider LAN, the provider host (the gateway address and this namespace's own
    // other address), another VM, a port scan and DNS: all dropped and counted, and the
    // consumer still reachable afterwards.
    let script = format!(
        "omerta-guest udp-send 8.8.8.8:53 internet 3\n\
         omerta-guest udp-send 192.168.1.1:80 lan 3\n\
         omerta-guest udp-send 10.0.2.2:22 host 3\n\
         omerta-guest udp-send 10.250.0.3:51820 host2 3\n\
         omerta-guest udp-send 10.0.2.16:51820 othervm 3\n\
         omerta-guest ping 8.8.8.8 1\n\
         omerta-guest scan {ip} 1 200\n\
         omerta-guest dns 8.8.8.8\n\
         omerta-guest udp-rr {c} still-works 5000",
        ip = std::net::Ipv4Addr::from(CONSUMER_IP),
        c = c()
    );
    let Some(o) = behind_engine("isolation", "", false, &script) else { return };
    o.expect(o.run.saw("PING-REPLIES 0"), "no ping answer from the internet");
    o.expect(o.run.saw("SCAN-ANSWERS 0"), "the port scan finds nothing");
    o.expect(o.run.saw("DNS-NO-ANSWER"), "DNS is blocked");
    o.expect(o.run.saw("REPLY:echo:still-works"), "the consumer is still reachable");
    o.expect(o.received == vec!["still-works".to_string()], "the consumer saw nothing but its own traffic");
    let c = &o.stats.counters;
    // Another VM's address is on the guest's own subnet: the guest asks ARP for it, the engine
    // does not answer, and the datagrams never even leave the guest.
    o.expect(c.drops_for(DropReason::ArpUnknownTarget) >= 1, "another VM is unreachable even at layer 2");
    // 4 destinations x 3 datagrams, a ping, 200 scan probes, a DNS query.
    let attempts = 12 + 1 + 200 + 1;
    o.expect(c.drops_for(DropReason::NotAllowed) >= attempts, "every other attempt counted as not_allowed");
    o.expect(c.drops_for(DropReason::ProtocolNotAllowed) >= 200, "the TCP half of the scan counted too");
    o.expect(c.forwarded_udp == 1 && c.forwarded_icmp == 0, "only the consumer's datagram was forwarded");
}

#[test]
fn conntrack_terminates_on_internet_access() {
    let script = format!(
        "omerta-guest udp-rr {c} before 5000\nomerta-guest udp-send 8.8.8.8:53 dns 1\nsleep 2\nomerta-guest udp-rr {c} after 2000",
        c = c()
    );
    let Some(o) = behind_engine("ct-inet", ",mode=conntrack", false, &script) else { return };
    o.expect(o.run.saw("REPLY:echo:before"), "good traffic flows first");
    o.expect(o.events.contains(&EventKind::Terminated(DropReason::NotAllowed)), "the violation terminates the VM");
    o.expect(o.run.exit == hv::Exit::Killed, "and the guest is killed");
    o.expect(!o.received.iter().any(|m| m == "after"), "nothing is forwarded after the violation");
}

#[test]
fn conntrack_terminates_on_lan_access() {
    let script =
        format!("omerta-guest udp-rr {c} before 5000\nomerta-guest udp-send 192.168.1.1:80 lan 1\nsleep 2", c = c());
    let Some(o) = behind_engine("ct-lan", ",mode=conntrack", false, &script) else { return };
    o.expect(o.events.contains(&EventKind::Terminated(DropReason::NotAllowed)), "reaching the LAN terminates the VM");
    o.expect(o.run.exit == hv::Exit::Killed, "and the guest is killed");
}

#[test]
fn vm_iptables_active() {
    let Some(o) = behind_engine("fw", "", true, "iptables -S OUTPUT") else { return };
    o.expect(o.run.saw("-P OUTPUT DROP"), "the guest's OUTPUT policy is DROP");
    o.expect(
        o.run.saw(&format!(
            "-A OUTPUT -d {}/32 -p udp -m udp --dport 51820 -j ACCEPT",
            std::net::Ipv4Addr::from(CONSUMER_IP)
        )),
        "except the consumer",
    );
}

#[test]
fn vm_iptables_survives_reboot() {
    // The firewall is applied by /init at every boot: boot the same image twice.
    for round in 0..2 {
        let Some(o) = behind_engine(
            &format!("fw-reboot{round}"),
            "",
            true,
            "iptables -S OUTPUT; omerta-guest udp-send 8.8.8.8:53 x 1",
        ) else {
            return;
        };
        o.expect(o.run.saw("-P OUTPUT DROP"), "the policy is in place after this boot");
        o.expect(o.run.saw("SENT 0"), "and it refuses the send");
        o.expect(o.stats.counters.drops_for(DropReason::NotAllowed) == 0, "so the engine never saw it");
    }
}

#[test]
fn vm_without_iptables() {
    let script =
        format!("iptables -S OUTPUT\nomerta-guest udp-send 8.8.8.8:53 leak? 3\nomerta-guest udp-rr {} ok 5000", c());
    let Some(o) = behind_engine("nofw", "", false, &script) else { return };
    o.expect(o.run.saw("-P OUTPUT ACCEPT"), "no guest firewall");
    o.expect(o.run.saw("SENT 3"), "the datagrams leave the guest");
    o.expect(o.stats.counters.drops_for(DropReason::NotAllowed) == 3, "the engine still blocks them");
    o.expect(o.run.saw("REPLY:echo:ok"), "and the consumer still works");
}

#[test]
fn layered_blocking() {
    // With the firewall on, a plain send is stopped and logged in the guest; a raw frame sent
    // below the firewall (AF_PACKET, as root in the guest can) is stopped and logged by the
    // engine. Both layers block, each logs what reached it.
    let script = "dmesg -n 7\nomerta-guest udp-send 8.8.8.8:53 plain 1\nomerta-guest raw-udp 8.8.8.8:53 raw\nsleep 1\nomerta-guest udp-rr 10.250.0.2:51820 ok 5000";
    let Some(o) = behind_engine("layered", "", true, script) else { return };
    o.expect(o.run.saw("SENT 0"), "the guest firewall refused the plain send");
    o.expect(o.run.saw("RAW-SENT"), "the raw frame went out below the firewall");
    o.expect(o.stats.counters.drops_for(DropReason::NotAllowed) == 1, "the engine dropped exactly the raw one");
    o.expect(o.run.saw("REPLY:echo:ok"), "the consumer still works");
}

/// An engine process (with its control socket) in a private namespace with the consumer, and a
/// guest started through `omertactl vm start` running `script`. `check` runs there too.
fn started_guest<T: Send + 'static>(
    tag: &str,
    spec: &str,
    script: &str,
    check: impl FnOnce(&omerta_it::EngineProc, &Arc<Mutex<Vec<String>>>) -> T + Send + 'static,
) -> Option<T> {
    let (tag, spec, script) = (tag.to_string(), spec.to_string(), script.to_string());
    private_netns(move || {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        let (stop, received, echo) = echo_consumer();
        let e = omerta_it::EngineProc::start(&tag, &[]);
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, &script, &initrd);
        let spec = format!("name=g,consumer={}{spec}", consumer_ep());
        let (code, _, err) =
            e.ctl(&["vm", "start", &spec, "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
        assert_eq!(code, 0, "vm start: {err}");
        let out = check(&e, &received);
        stop.store(true, Ordering::Relaxed);
        let _ = echo.join();
        let (code, log) = e.stop();
        assert_eq!(code, Some(0), "the engine stops cleanly: {log}");
        Some(out)
    })
    .flatten()
}

/// Polls `vm show g` until `pred` holds (up to `secs`), returning the last answer.
fn wait_show(e: &omerta_it::EngineProc, secs: u64, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = e.json(&["vm", "show", "g"]);
        if pred(&v) || std::time::Instant::now() >= end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn console_of(v: &serde_json::Value) -> String {
    v["guest"]["console"].as_str().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default()
}

#[test]
fn vm_restart() {
    // A guest that keeps talking, tagged with its boot id; after `vm restart` a new instance
    // (a new boot id) reaches the consumer through the new handle.
    let script = format!(
        "b=$(cut -c1-8 /proc/sys/kernel/random/boot_id); i=0; while [ $i -lt 60 ]; do omerta-guest udp-rr {} alive-$b 1000; sleep 0.5; i=$((i+1)); done",
        consumer_ep()
    );
    let out = started_guest("restart", "", &script, |e, received| {
        let first = wait_show(e, 60, |_| !received.lock().unwrap().is_empty());
        let boots = |r: &Arc<Mutex<Vec<String>>>| {
            let mut v: Vec<String> = r.lock().unwrap().iter().cloned().collect();
            v.sort();
            v.dedup();
            v
        };
        let before = boots(received);
        let pid_before = first["guest"]["pid"].as_u64();
        let restarted = e.json(&["vm", "restart", "g"]);
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while boots(received).len() <= before.len() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
        let after = boots(received);
        (before, after, restarted, pid_before, console_of(&e.json(&["vm", "show", "g"])))
    });
    let Some((before, after, restarted, pid_before, console)) = out else { return };
    assert_eq!(before.len(), 1, "one instance before the restart: {before:?}\n{console}");
    assert_eq!(restarted["starts"], 2);
    assert_ne!(restarted["guest"]["pid"].as_u64(), pid_before, "a new guest process");
    assert_eq!(after.len(), 2, "the new instance works: {after:?}\n{console}");
}

#[test]
fn a_started_guest_is_killed_on_a_violation() {
    let script =
        format!("omerta-guest udp-rr {} hello 5000; omerta-guest udp-send 8.8.8.8:53 dns 1; sleep 30", consumer_ep());
    // Without the guest firewall, which would stop the violation before the engine sees it.
    let out = started_guest("kill", ",mode=conntrack,firewall=no", &script, |e, _| {
        let v = wait_show(e, 60, |v| v["state"] == "terminated");
        let pid = v["guest"]["pid"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(300));
        (v, std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
    let Some((v, alive)) = out else { return };
    assert_eq!(v["state"], "terminated", "{v}\n{}", console_of(&v));
    assert_eq!(v["reason"], "not_allowed");
    assert!(!alive, "the guest process was killed");
}

#[test]
fn a_guest_that_exits_is_noticed() {
    let out = started_guest("exit", "", "echo short-lived", |e, _| wait_show(e, 60, |v| v["state"] == "exited"));
    let Some(v) = out else { return };
    assert_eq!(v["state"], "exited", "{v}");
    assert!(v["reason"].as_str().unwrap_or("").contains("guest exited"), "{v}");
}

/// A guest with kernel WireGuard behind the engine, the consumer in its own namespace
/// (omerta-consumer, boringtun). Returns the outcome and what the consumer printed.
fn wireguard_run(tag: &str, extra_script: &str) -> Option<(Outcome, String)> {
    let (tag, extra) = (tag.to_string(), extra_script.to_string());
    private_netns(move || {
        let _slot = GuestSlot::take();
        let (g_priv, g_pub) = omerta_tools::wg_keypair([0x11; 32]);
        let (c_priv, c_pub) = omerta_tools::wg_keypair([0x22; 32]);
        let consumer = omerta_it::WgConsumer::start(&tag, &c_priv, &c_pub, &g_pub, "10.99.0.1", 80);
        let (vm_end, engine_end): (OwnedFd, OwnedFd) = engine::io::socketpair(libc::SOCK_DGRAM).unwrap();
        let cfg = VmConfig::from_spec(&format!("name={tag},handle=fd:{},consumer={}", engine_end.into_raw_fd(), consumer_ep()))
            .expect("test VM config");
        let (tx, events) = crossbeam_channel::unbounded();
        let w = worker::spawn(&cfg, Backend::Auto, tx).expect("engine worker");
        let script = format!(
            "echo {g_priv} > /tmp/key\n\
             ip link add wg0 type wireguard || exit 3\n\
             wg set wg0 private-key /tmp/key listen-port 51820 peer {c_pub} allowed-ips 10.99.0.0/24 endpoint {ep} persistent-keepalive 1 || exit 4\n\
             ip addr add 10.99.0.2/24 dev wg0\n\
             ip link set wg0 up\n\
             omerta-guest ping 10.99.0.1 3\n\
             echo HANDSHAKES $(wg show wg0 latest-handshakes | cut -f2)\n\
             {extra}",
            ep = consumer_ep()
        );
        let opts = GuestOpts { script, consumer: consumer_ep(), firewall: true, ipv6: false, timeout: TIMEOUT };
        let (mut vm, _dir) = boot_guest(&opts, hv::Nic::DgramFd(vm_end), &tag)?;
        let exit = vm.wait();
        let run = GuestRun { exit, console: vm.console() };
        let stats = w.stop();
        let out = consumer.finish();
        let events = events.try_iter().map(|e| e.kind).collect();
        Some((Outcome { run, stats, events, received: Vec::new() }, out))
    })
    .flatten()
}

#[test]
fn wireguard_handshake() {
    let Some((o, consumer)) = wireguard_run("wg-hs", "") else { return };
    o.expect(consumer.contains("HANDSHAKE from"), &format!("the consumer completed a handshake:\n{consumer}"));
    // The first ping may be lost while the handshake completes; the others are answered.
    let replies: u32 = o
        .run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("PING-REPLIES "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    o.expect(replies >= 2, "pings inside the tunnel are answered");
    let when: u64 = o
        .run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("HANDSHAKES "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    o.expect(when > 1_000_000_000, "the guest's wg shows the time of a completed handshake");
    o.expect(
        o.stats.counters.forwarded_udp >= 3 && o.stats.counters.dropped() == 0,
        "all through the engine, nothing dropped",
    );
}

#[test]
fn encrypted_data_transfer() {
    let extra = "for i in 1 2 3; do omerta-guest udp-rr 10.99.0.1:7 secret-data-$i 3000; done";
    let Some((o, consumer)) = wireguard_run("wg-data", extra) else { return };
    for i in 1..=3 {
        o.expect(
            o.run.saw(&format!("REPLY:tunnel-echo:secret-data-{i}")),
            "data went through the tunnel and came back",
        );
        o.expect(
            consumer.contains(&format!("TUNNEL-UDP secret-data-{i}")),
            &format!("the consumer decrypted it:\n{consumer}"),
        );
    }
    o.expect(
        consumer.matches("CIPHERTEXT-CLEAN").count() >= 3 && !consumer.contains("PLAINTEXT-SEEN"),
        &format!("nothing crossed the engine in clear:\n{consumer}"),
    );
}

#[test]
fn make_run_demo_works() {
    // The README's first command, as a user runs it (scripts/demo.sh is what `make run` does).
    if !omerta_it::require(
        "root for make run",
        if engine::io::effective_ids().0 == 0 { Ok(()) } else { Err("not root".into()) },
    ) {
        return;
    }
    let _slot = GuestSlot::take();
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(top.join("scripts/demo.sh")).current_dir(&top).output().expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "make run failed:\n{text}");
    for want in [
        "REPLY:tunnel-echo:hello-from-the-vm-3",
        "HANDSHAKE from",
        "CIPHERTEXT-CLEAN",
        "SENT 0",
        "not_allowed            3",
        "udp 10.0.2.15:40000 -> 8.8.8.8:53",
        "done: the guest reached its consumer over WireGuard",
    ] {
        assert!(text.contains(want), "make run did not show '{want}':\n{text}");
    }
}

/// A guest started in direct mode (QEMU's user NAT, no engine in the path) in a private
/// namespace holding the consumer (10.250.0.2) and two other listeners: a "provider LAN" host
/// at 10.250.0.3:8080 and a service on the provider's loopback, 127.0.0.1:8081 (which QEMU's
/// NAT maps to 10.0.2.2:8081). Returns the final `vm show` and what each listener accepted.
fn direct_run(tag: &str, firewall: bool, script: &str) -> Option<(serde_json::Value, u32, u32, String)> {
    let (tag, script) = (tag.to_string(), script.to_string());
    private_netns(move || {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        add_local_address(CONSUMER_IP);
        add_local_address([10, 250, 0, 3]);
        let lan = std::net::TcpListener::bind("10.250.0.3:8080").expect("lan listener");
        let local = std::net::TcpListener::bind("127.0.0.1:8081").expect("loopback listener");
        let done = Arc::new(AtomicBool::new(false));
        let count = |l: std::net::TcpListener| {
            l.set_nonblocking(true).unwrap();
            let done = done.clone();
            // Bounded: until the guest is done, or 90 s.
            std::thread::spawn(move || {
                let (mut n, mut held) = (0, Vec::new());
                let end = std::time::Instant::now() + Duration::from_secs(90);
                while !done.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                    match l.accept() {
                        Ok((c, _)) => {
                            n += 1;
                            held.push(c);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                n
            })
        };
        let (lan_n, local_n) = (count(lan), count(local));
        let e = omerta_it::EngineProc::start(&tag, &[]);
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, &script, &initrd);
        let spec = format!(
            "name=g,mode=direct,rogue-interval=1,consumer={}{}",
            consumer_ep(),
            if firewall { "" } else { ",firewall=no" }
        );
        let (code, _, err) =
            e.ctl(&["vm", "start", &spec, "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
        assert_eq!(code, 0, "vm start: {err}");
        let first = e.json(&["vm", "show", "g"]);
        let v = wait_show(&e, 60, |v| v["state"] != "running");
        let console = console_of(&v);
        let _ = e.stop();
        done.store(true, Ordering::Relaxed);
        Some((
            serde_json::json!({"first": first, "last": v}),
            lan_n.join().unwrap_or(0),
            local_n.join().unwrap_or(0),
            console,
        ))
    })
    .flatten()
}

#[test]
fn direct_mode_creates_nat_attachment() {
    let Some((v, _, _, console)) = direct_run("d-att", true, "ip -4 addr show eth0; ip route") else { return };
    let first = &v["first"];
    assert_eq!(first["mode"], "direct");
    assert_eq!(first["attachment"], "vmm-nat", "the VMM's own NAT, no engine handle");
    assert_eq!(first["handle"], "-");
    assert!(console.contains("inet 10.0.2.15/24"), "the guest is on QEMU's user network:\n{console}");
}

#[test]
fn direct_mode_iptables_blocks() {
    let script =
        "omerta-guest udp-send 10.250.0.3:9000 x 3\nomerta-guest tcp-hold 10.250.0.3:8080 1\nomerta-guest dns 10.0.2.3";
    let Some((v, lan, _, console)) = direct_run("d-fw", true, script) else { return };
    assert!(console.contains("SENT 0") && console.contains("TCP-FAILED"), "the guest firewall blocks:\n{console}");
    assert_eq!(lan, 0, "nothing reached the LAN host");
    assert_eq!(v["last"]["rogue_connections"], serde_json::json!([]), "nothing for the detector to see");
}

#[test]
fn direct_mode_bypassable() {
    // Direct mode's barrier is the guest's own firewall: a guest that drops it gets out. The
    // rogue-connection detector reports the connection; it cannot prevent it.
    let script = "iptables -P OUTPUT ACCEPT\niptables -F OUTPUT\nomerta-guest tcp-hold 10.250.0.3:8080 4";
    let Some((v, lan, _, console)) = direct_run("d-bypass", true, script) else { return };
    assert!(console.contains("TCP-CONNECTED"), "with its firewall dropped the guest connects:\n{console}");
    assert_eq!(lan, 1, "the LAN host accepted the VM's connection: traffic leaks in direct mode");
    let rogue = v["last"]["rogue_connections"].to_string();
    assert!(rogue.contains("-> 10.250.0.3:8080"), "the detector reported it: {v}");
}

#[test]
fn direct_mode_localhost_blocked() {
    // QEMU's NAT maps 10.0.2.2 to the provider's own loopback: the guest firewall must block it.
    let script = "omerta-guest tcp-hold 10.0.2.2:8081 1";
    let Some((_, _, local, console)) = direct_run("d-local", true, script) else { return };
    assert!(console.contains("TCP-FAILED"), "the provider's localhost is blocked by the guest firewall:\n{console}");
    assert_eq!(local, 0, "nothing reached the provider's loopback service");
}

#[test]
fn stream_framing_with_a_real_guest() {
    // QEMU's -netdev stream: frames carry a u32 length prefix on a stream socket.
    let script = format!("for i in 1 2 3; do omerta-guest udp-rr {} framed-$i 5000; done", c());
    let Some(o) = behind_engine_framed("stream", "", true, &script, true) else { return };
    o.expect(o.run.saw("REPLY:echo:framed-3"), "round trips over the stream framing");
    o.expect(o.stats.counters.forwarded_udp == 3 && o.stats.counters.arp_replies >= 1, "through the engine");
    // Only a stream handle reports the VMM's exit as an end of stream: proof of the framing.
    o.expect(o.events.iter().any(|e| matches!(e, EventKind::HandleClosed(_))), "the guest's exit closed the stream");
}
