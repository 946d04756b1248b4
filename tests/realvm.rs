//! Real guests behind the engine: a Debian cloud kernel under QEMU (TCG here), its virtio NIC
//! on one end of the engine's socketpair. Everything (the engine's worker and host sockets,
//! the consumer, QEMU itself) runs inside a private network namespace the test creates, with
//! the consumer at 203.0.113.2 in its consumers' namespace, and nothing can leave the machine. Sinks on the forbidden
//! destinations (8.8.8.8, 192.168.1.1, ...) sit on that namespace's `lo`: every run behind the
//! engine checks that none of them received anything. At most two guests run at once; each has
//! a hard timeout; a failure message carries the guest's serial console.
//!
//! Over 500 lines on purpose: one file per area of the test plan (cases share one booted-guest
//! harness); every case is an independent `#[test]`.
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::worker::{Backend, EventKind, Snapshot};
use engine::{DropReason, Endpoint};
use omerta_it::{
    add_local_address, boot_guest, private_netns, ForbiddenSinks, GuestOpts, GuestRun, GuestSlot, CONSUMER_IP,
};

const TIMEOUT: Duration = Duration::from_secs(90);

fn consumer_ep() -> Endpoint {
    Endpoint::new(CONSUMER_IP.into(), 51820)
}

type Received = Arc<Mutex<Vec<String>>>;

/// The consumer of these tests, at 203.0.113.2:51820 in the current namespace, until `stop` is
/// set. It records every datagram and answers `echo:<msg>`, except:
/// - `initiate:N` starts a flow of its own: N datagrams `c2v-<i>` to the sender, one every
///   50 ms (a guest's `udp-echo` sends them back);
/// - `c2v-<i>` (those coming back) are recorded, not answered.
fn echo_consumer(ns: &omerta_it::Netns) -> (Arc<AtomicBool>, Received, std::thread::JoinHandle<()>) {
    // In the consumers' namespace: the engine refuses the host's own addresses as consumers.
    omerta_it::consumer_address(ns, CONSUMER_IP);
    let consumer = omerta_it::consumer_socket(ns, std::net::Ipv4Addr::from(CONSUMER_IP), 51820);
    consumer.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let (stop, received) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let echo = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut flow: Option<(std::net::SocketAddr, u32, u32, std::time::Instant)> = None;
            while !stop.load(Ordering::Relaxed) {
                if let Some((to, next, n, at)) = flow.as_mut() {
                    if *next < *n && at.elapsed() >= Duration::from_millis(50) {
                        let _ = consumer.send_to(format!("c2v-{next}").as_bytes(), *to);
                        *next += 1;
                        *at = std::time::Instant::now();
                    }
                }
                if let Ok((n, from)) = consumer.recv_from(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Some(count) = msg.strip_prefix("initiate:").and_then(|c| c.parse::<u32>().ok()) {
                        flow = Some((from, 0, count.min(1000), std::time::Instant::now()));
                    } else if !msg.starts_with("c2v-") {
                        let _ = consumer.send_to(format!("echo:{msg}").as_bytes(), from);
                    }
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

/// How to run a guest behind an in-process engine worker.
#[derive(Debug, Clone, Default)]
struct Run {
    /// `--vm` keys added to the VM's description.
    spec: String,
    /// The guest firewall at boot.
    firewall: bool,
    /// The stream framing (QEMU `-netdev stream`) instead of datagrams.
    stream: bool,
    /// The guest tries DHCP before its static address.
    dhcp: bool,
}

/// Boots a guest with `script` behind an engine worker (`spec` adds `--vm` keys), with a
/// consumer at 203.0.113.2:51820 that answers `echo:<msg>` to every datagram. A `Terminate`
/// kills the guest, as the control plane does.
fn behind_engine(tag: &str, spec: &str, firewall: bool, script: &str) -> Option<Outcome> {
    behind_engine_with(tag, Run { spec: spec.into(), firewall, ..Run::default() }, script)
}

/// [`behind_engine`] with every option. Fails the test if any forbidden sink received anything.
fn behind_engine_with(tag: &str, opts: Run, script: &str) -> Option<Outcome> {
    let (tag, script) = (tag.to_string(), script.to_string());
    private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let sinks = ForbiddenSinks::start(ns);
        let (stop, received, echo) = echo_consumer(ns);
        let ty = if opts.stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        let (vm_end, engine_end): (OwnedFd, OwnedFd) = sys::socketpair(ty).unwrap();
        let handle = if opts.stream { "stream-fd" } else { "fd" };
        let cfg = control::config::vm_from_spec(&format!(
            "name={tag},handle={handle}:{},consumer={}{}",
            engine_end.into_raw_fd(),
            consumer_ep(),
            opts.spec
        ))
        .expect("test VM config");
        let (tx, events) = crossbeam_channel::unbounded();
        let w = omerta_it::spawn_worker(ns, &cfg, Backend::Auto, tx).expect("engine worker");
        let guest = GuestOpts {
            script,
            consumer: consumer_ep(),
            firewall: opts.firewall,
            ipv6: false,
            dhcp: opts.dhcp,
            timeout: TIMEOUT,
        };
        let nic = if opts.stream { hv::Nic::StreamFd(vm_end) } else { hv::Nic::DgramFd(vm_end) };
        let (mut vm, _dir) = boot_guest(ns, &guest, nic, &tag)?;
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
        let run = GuestRun { exit, console: vm.console() };
        // A stream handle: the VMM's exit closed its end, and the worker says so once it has
        // read the end of the stream. On a loaded machine that can come after the VMM was seen
        // gone: wait for it (2 s at most) before the worker is stopped.
        if opts.stream {
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while !seen.iter().any(|k| matches!(k, EventKind::HandleClosed(_))) && std::time::Instant::now() < end {
                if let Ok(ev) = events.recv_timeout(Duration::from_millis(50)) {
                    seen.push(ev.kind);
                }
            }
        }
        // Until the consumer has seen the last datagram the worker forwarded.
        let forwarded = w.snapshot().counters.forwarded_udp;
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while (received.lock().unwrap().len() as u64) < forwarded && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let _ = echo.join();
        let stats = w.stop();
        seen.extend(events.try_iter().map(|e| e.kind));
        let received = received.lock().unwrap().clone();
        let o = Outcome { run, stats, events: seen, received };
        let leaks = sinks.leaks();
        o.expect(leaks.is_empty(), &format!("datagrams reached forbidden destinations: {leaks:?}"));
        Some(o)
    })
    .flatten()
}

fn c() -> String {
    consumer_ep().to_string()
}

/// seed: testFileHandleAttachmentCreation
#[test]
fn file_handle_attachment_creation() {
    // Through the product path: `vm start` in filtered mode gives QEMU one end of the engine's
    // socketpair as its NIC. What shows it: the VMM's own command line, the guest's NIC with
    // our MAC, and the frames of its round trip counted by the engine through that handle.
    let script = format!("cat /sys/class/net/eth0/address; omerta-guest udp-rr {} via-handle 5000; sleep 2", c());
    let out = started_guest("fh", "", &script, |e, _| {
        let running = e.wait_json("the guest", &["vm", "show", "g"], 30, |v| v["guest"]["pid"].as_u64().is_some());
        let cmdline = vmm_cmdline(&running);
        let status = vmm_status(&running);
        let vmm_pid = u32::try_from(running["guest"]["pid"].as_u64().unwrap_or(0)).unwrap_or(0);
        let own_ns =
            omerta_it::netns_of(vmm_pid).is_some() && omerta_it::netns_of(vmm_pid) != omerta_it::netns_of(e.pid());
        // The engine that started it had dropped root before anyone could ask (its launcher
        // started the VMM).
        let engine = std::fs::read_to_string(format!("/proc/{}/status", e.pid())).unwrap_or_default();
        let done = wait_show(e, 60, |v| !active(v));
        let stats = e.json(&["stats", "g"]);
        (cmdline, (status, own_ns, engine), console_of(&done), stats)
    });
    let Some(((cmdline, (status, own_ns, engine), console, stats), _)) = out else { return };
    assert!(own_ns, "the VMM runs in an empty network namespace of its own, not the engine's");
    if omerta_it::engine_user().is_some() {
        let uid = omerta_it::status_field(&engine, "Uid:");
        assert!(!uid.is_empty() && uid.split_whitespace().all(|u| u != "0"), "the engine runs as {uid}");
    }
    // The VMM runs as an unprivileged user (nobody here), with no capability and under QEMU's
    // own seccomp sandbox.
    let field = |key: &str| omerta_it::status_field(&status, key);
    assert!(field("Uid:").split_whitespace().all(|u| u != "0") && !field("Uid:").is_empty(), "VMM uid: {status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "the VMM holds no capability: {status}");
    assert_eq!(field("Seccomp:"), "2", "the VMM runs sandboxed: {status}");
    assert!(cmdline.contains("-sandbox on,"), "{cmdline}");
    assert!(
        cmdline.contains("-netdev dgram,id=n0,local.type=fd,local.str="),
        "the VMM's NIC is an inherited datagram socket: {cmdline}"
    );
    assert!(!cmdline.contains("user,"), "and no user-mode network: {cmdline}");
    assert!(console.contains("52:54:00:12:34:56"), "the guest's NIC has the VM's MAC:\n{console}");
    assert!(console.contains("REPLY:echo:via-handle"), "the round trip worked:\n{console}");
    let s = &stats[0];
    assert!(
        s["frames_from_vm"].as_u64() >= Some(2) && s["arp_replies"].as_u64() >= Some(1),
        "frames counted through the handle: {s}"
    );
    assert_eq!(s["forwarded_udp"], 1, "{s}");
}

/// seed: testVMSendsFrames
#[test]
fn vm_sends_frames() {
    let Some(o) = behind_engine("sends", "", false, &format!("omerta-guest udp-send {} hello-consumer 5", c())) else {
        return;
    };
    o.expect(o.run.saw("SENT 5"), "the guest sent");
    o.expect(o.received.iter().filter(|m| *m == "hello-consumer").count() == 5, "the consumer received all five");
    o.expect(o.stats.counters.forwarded_udp == 5, "the engine forwarded five");
}

/// seed: testVMReceivesFrames
#[test]
fn vm_receives_frames() {
    let Some(o) = behind_engine("receives", "", false, &format!("omerta-guest udp-rr {} question 5000", c())) else {
        return;
    };
    o.expect(o.run.saw("REPLY:echo:question"), "the consumer's reply reached the guest");
    o.expect(o.stats.counters.to_vm_frames >= 1, "the engine wrote it to the VM");
}

/// seed: testARPResolution
#[test]
fn arp_resolution() {
    let script = format!("omerta-guest udp-send {} x 1; ip neigh show dev eth0", c());
    let Some(o) = behind_engine("arp", "", false, &script) else { return };
    o.expect(o.run.saw("10.0.2.2 lladdr 52:55:0a:00:02:02"), "the guest resolved its gateway through the engine");
    o.expect(o.stats.counters.arp_replies >= 1, "the engine answered ARP");
}

/// seed: testDHCPOptional
#[test]
fn dhcp_optional() {
    // With the engine's DHCP off (`dhcp=no`), the guest asks for a lease first (briefly), gets
    // none, then uses its static address. In conntrack mode the attempts are dropped and
    // counted, not a violation.
    let script = format!("ip -4 addr show eth0; omerta-guest udp-rr {} static 5000", c());
    let run = Run { spec: ",mode=conntrack,dhcp=no".into(), dhcp: true, ..Run::default() };
    let Some(o) = behind_engine_with("dhcp", run, &script) else { return };
    o.expect(o.run.saw("OMERTA-DHCP none"), "the guest tried DHCP and got no lease");
    o.expect(o.run.saw("inet 10.0.2.15/24"), "then a static address");
    o.expect(o.run.saw("REPLY:echo:static"), "and it works");
    let c = &o.stats.counters;
    o.expect(c.drops_for(DropReason::DhcpOff) >= 1, "the DHCP discovers reached the engine and were dropped");
    o.expect(c.dhcp_offers == 0 && c.dhcp_acks == 0, "and none was answered");
    o.expect(
        c.terminations == 0 && !o.events.iter().any(|e| matches!(e, EventKind::Terminated(_))),
        "without terminating the VM",
    );
}

#[test]
fn dhcp_lease_and_renewal() {
    // busybox udhcpc, a real client: the guest drops its static address and takes what the
    // engine's DHCP gives (address, prefix, gateway, MTU), talks to the consumer with it,
    // and renews the lease at half of it (dhcp-lease=60: at 30 s), unicast to the gateway.
    // In conntrack mode, to show that DHCP is never a violation there.
    let script = format!(
        r#"ip addr flush dev eth0; ip route flush dev eth0
cat > /dhcp.sh <<'EOS'
#!/bin/sh
case "$1" in
bound|renew) ip addr replace $ip/$mask dev $interface; ip link set $interface mtu $mtu; ip route replace default via $router;;
esac
echo "DHCP-$1 ip=$ip mask=$mask router=$router mtu=$mtu lease=$lease"
EOS
chmod 755 /dhcp.sh
udhcpc -f -i eth0 -s /dhcp.sh -t 5 -T 2 -A 1 > /dhcp.log 2>&1 &
i=0; while ! grep -q DHCP-bound /dhcp.log && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
ip -4 addr show eth0; ip route
omerta-guest udp-rr {} via-dhcp 5000
i=0; while ! grep -q DHCP-renew /dhcp.log && [ $i -lt 45 ]; do sleep 1; i=$((i+1)); done
kill %1; cat /dhcp.log"#,
        c()
    );
    let run = Run { spec: ",mode=conntrack,dhcp-lease=60,mtu=1400".into(), ..Run::default() };
    let Some(o) = behind_engine_with("dhcp-lease", run, &script) else { return };
    o.expect(o.run.saw("DHCP-bound ip=10.0.2.15 mask=24 router=10.0.2.2 mtu=1400 lease=60"), "the guest's lease");
    o.expect(o.run.saw("inet 10.0.2.15/24"), "the address it configured from it");
    o.expect(o.run.saw("default via 10.0.2.2"), "and the gateway");
    o.expect(o.run.saw("REPLY:echo:via-dhcp"), "it reaches the consumer with that configuration");
    o.expect(o.run.saw("DHCP-renew ip=10.0.2.15"), "and renews the lease");
    let c = &o.stats.counters;
    o.expect(c.dhcp_offers >= 1 && c.dhcp_acks >= 2, &format!("offer {}, acks {}", c.dhcp_offers, c.dhcp_acks));
    o.expect(c.terminations == 0, "DHCP is no violation in conntrack mode");
}

/// seed: testVMToConsumerUDP
#[test]
fn vm_to_consumer_udp() {
    let Some(o) = behind_engine("udp", "", true, &format!("omerta-guest udp-rr {} wg-handshake 5000", c())) else {
        return;
    };
    o.expect(o.run.saw("REPLY:echo:wg-handshake"), "UDP to the consumer's port is delivered and answered");
    o.expect(o.received == vec!["wg-handshake".to_string()], "exactly the payload");
}

/// seed: testVMToConsumerPing
#[test]
fn vm_to_consumer_ping() {
    let script = format!("omerta-guest ping {} 3", std::net::Ipv4Addr::from(CONSUMER_IP));
    let Some(o) = behind_engine("ping", "", true, &script) else { return };
    o.expect(o.run.saw("PING-REPLIES 3"), "ICMP echo reaches the consumer and the replies come back");
    o.expect(o.stats.counters.forwarded_icmp == 3, "through the engine");
}

/// seed: testBidirectionalTraffic
#[test]
fn bidirectional_traffic() {
    // The consumer sends first: the guest announces itself once from its listening port (as
    // WireGuard's handshake does), then only answers. The consumer starts a flow of twenty
    // datagrams of its own; the guest's udp-echo sends each back.
    let script = format!("omerta-guest udp-echo 51820 20 8000 {} initiate:20", c());
    let Some(o) = behind_engine("bidir", "", false, &script) else { return };
    o.expect(o.run.saw("ECHOED 20"), "the guest answered all twenty datagrams the consumer started");
    let back = o.received.iter().filter(|m| m.starts_with("c2v-")).count();
    o.expect(back == 20, "and the consumer received every answer");
    o.expect(o.stats.counters.to_vm_frames >= 20 && o.stats.counters.forwarded_udp == 21, "both directions counted");
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

/// Conntrack mode through the product path (`vm start`, no guest firewall): a good round trip,
/// then one datagram to `bad` immediately followed by 300 to the consumer, as raw frames in
/// `sendmmsg` batches so that they reach the engine together, before the guest can be killed. Checks what the plan
/// says: the VM is terminated, its VMM is gone, and nothing after the violation is forwarded.
fn conntrack_violation(tag: &str, bad: &str) {
    let script =
        format!("omerta-guest udp-rr {c} before 5000\nomerta-guest raw-seq {c} after 300 0 {bad}\nsleep 30", c = c());
    // Whether any datagram after the violation reaches the engine before the kill lands is a
    // race with the guest's vCPU: usually some do; on a loaded machine the kill can win every
    // time. A boot where none did cannot show that they are dropped: it is retried, up to three
    // boots; if the kill won all three, the test says so and rests on what it did show (state,
    // VMM gone, nothing forwarded), while `dataplane::conntrack_terminates_end_to_end` shows
    // the drop of what follows a violation deterministically.
    for attempt in 1..=3 {
        let out = started_guest(&format!("{tag}{attempt}"), ",mode=conntrack,firewall=no", &script, |e, received| {
            let v = wait_show(e, 60, |v| !active(v));
            let pid = v["guest"]["pid"].as_u64().unwrap_or(0);
            let gone = wait_until(10, || !std::path::Path::new(&format!("/proc/{pid}")).exists());
            let stats = e.json(&["stats", "g"]);
            (v.clone(), gone, stats, received.lock().unwrap().clone(), console_of(&v))
        });
        let Some(((v, gone, stats, received, console), log)) = out else { return };
        assert_eq!(v["state"], "terminated", "{v}\n{console}");
        assert_eq!(v["reason"], "not_allowed", "{v}");
        assert!(gone, "the VMM process was killed");
        assert!(log.contains("terminated for a policy violation"), "{log}");
        assert_eq!(
            received,
            vec!["before".to_string()],
            "the consumer got the round trip and nothing after the violation"
        );
        let s = &stats[0];
        assert_eq!(s["forwarded_udp"], 1, "{s}");
        if s["drops"]["terminated"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        eprintln!("attempt {attempt}: the guest was killed before a datagram after its violation reached the engine");
    }
    eprintln!("NOTE: in three boots the kill outran every datagram sent after the violation");
}

/// Polls `f` every 50 ms for up to `secs`.
fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// seed: testConntrackTerminatesOnInternetAccess
#[test]
fn conntrack_terminates_on_internet_access() {
    conntrack_violation("ct-inet", "8.8.8.8:53");
}

/// seed: testConntrackTerminatesOnLANAccess
#[test]
fn conntrack_terminates_on_lan_access() {
    conntrack_violation("ct-lan", "192.168.1.1:80");
}

/// seed: testVMIptablesActive
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

/// seed: testVMIptablesSurvivesReboot
#[test]
fn vm_iptables_survives_reboot() {
    // The real one: a Debian cloud VM started by the engine (`vm start --image`) reboots with
    // `sudo systemctl reboot` inside the same QEMU process, and its firewall (policy DROP, up
    // before the network) and WireGuard come back. The last stage of the cloud image's
    // end-to-end run (tests/cloud.rs), which checks everything else on the same two boots: SSH
    // through wireguard-go with the host key pinned, DHCP and network-config, root's bypass
    // attempts, logged at both, no plaintext on the wire, no private key anywhere.
    crate::cloud::end_to_end();
}

/// seed: testVMWithoutIptables
#[test]
fn vm_without_iptables() {
    // Root in the guest switches its firewall off at runtime; the engine still stops
    // everything, and the sinks on 8.8.8.8 and 192.168.1.1 (checked by the harness) get nothing.
    let script = format!(
        "iptables -P OUTPUT ACCEPT\niptables -F OUTPUT\niptables -S OUTPUT\n\
         omerta-guest udp-send 8.8.8.8:53 leak? 3\nomerta-guest udp-send 192.168.1.1:80 leak? 3\n\
         omerta-guest udp-rr {} ok 5000",
        c()
    );
    let Some(o) = behind_engine("nofw", "", true, &script) else { return };
    o.expect(o.run.saw("OMERTA-FW on"), "the guest booted with its firewall");
    o.expect(o.run.saw("-P OUTPUT ACCEPT") && !o.run.saw("-A OUTPUT"), "then root disabled it");
    o.expect(o.run.console.matches("SENT 3").count() == 2, "the datagrams left the guest");
    o.expect(o.stats.counters.drops_for(DropReason::NotAllowed) == 6, "the engine blocked and counted all six");
    o.expect(o.run.saw("REPLY:echo:ok"), "and the consumer still works");
}

/// seed: testLayeredBlocking
#[test]
fn layered_blocking() {
    // One attempt on 8.8.8.8:53, both layers: the plain send is dropped by the guest firewall
    // and logged by its LOG rule on the console; the same datagram sent again below the
    // firewall (a raw frame, as root in the guest can) is dropped by the engine and logged in
    // the engine's log and `omertactl log`. Through the product path (`vm start`).
    let script = format!(
        "dmesg -n 7\nomerta-guest udp-send 8.8.8.8:53 plain 1\nomerta-guest raw-udp 8.8.8.8:53 raw\nsleep 1\nomerta-guest udp-rr {} ok 5000",
        c()
    );
    let out = started_guest("layered", "", &script, |e, _| {
        let v = wait_show(e, 60, |v| v["state"] == "exited");
        (console_of(&v), e.json(&["log", "g"]), e.json(&["stats", "g"]))
    });
    let Some(((console, events, stats), log)) = out else { return };
    assert!(console.contains("OMERTA-FW log on"), "the guest firewall has its LOG rule:\n{console}");
    assert!(console.contains("SENT 0"), "the guest firewall refused the plain send:\n{console}");
    let fw_line = console.lines().find(|l| l.contains("OMERTA-FW-DROP") && l.contains("DST=8.8.8.8"));
    let fw_line = fw_line.unwrap_or_else(|| panic!("no guest firewall log line for 8.8.8.8:\n{console}"));
    assert!(fw_line.contains("PROTO=UDP") && fw_line.contains("DPT=53"), "{fw_line}");
    assert!(console.contains("RAW-SENT"), "the raw frame went out below the firewall:\n{console}");
    let engine_line = log.lines().find(|l| l.contains("dropped not_allowed") && l.contains("-> 8.8.8.8:53"));
    assert!(engine_line.is_some(), "the engine logged the same destination:\n{log}");
    let events = events.to_string();
    assert!(events.contains("8.8.8.8:53") && events.contains("not_allowed"), "and omertactl log shows it: {events}");
    assert_eq!(stats[0]["drops"]["not_allowed"], 1, "the engine dropped exactly the raw one: {stats}");
    assert!(console.contains("REPLY:echo:ok"), "the consumer still works:\n{console}");
}

/// An engine process (with its control socket) in a private namespace with the consumer and
/// the forbidden sinks, and a guest started through `omertactl vm start` running `script`.
/// `check` runs there too. Returns what `check` returned and the engine's log; fails the test
/// if a forbidden sink received anything or the engine did not stop cleanly.
fn started_guest<T: Send + 'static>(
    tag: &str,
    spec: &str,
    script: &str,
    check: impl FnOnce(&omerta_it::EngineProc, &Received) -> T + Send + 'static,
) -> Option<(T, String)> {
    let (tag, spec, script) = (tag.to_string(), spec.to_string(), script.to_string());
    private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        let sinks = ForbiddenSinks::start(ns);
        let (stop, received, echo) = echo_consumer(ns);
        let e = omerta_it::EngineProc::start(ns, &tag, &[]);
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, &script, &initrd);
        let spec = format!("name=g,consumer={}{spec}", consumer_ep());
        let (code, _, err) = e.vm_start(&spec, &kernel, &initrd);
        assert_eq!(code, 0, "vm start: {err}");
        let out = check(&e, &received);
        stop.store(true, Ordering::Relaxed);
        let _ = echo.join();
        let (code, log) = e.stop();
        assert_eq!(code, Some(0), "the engine stops cleanly: {log}");
        // The accelerator and why, said at info level (TCG on this machine kind: /dev/kvm is
        // nested or absent).
        assert!(
            log.lines().any(|l| l.contains(" INFO guests run on ") && l.contains(" with ") && l.ends_with(')')),
            "the accelerator choice is logged with its reason: {log}"
        );
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}\n{log}");
        Some((out, log))
    })
    .flatten()
}

/// The status of the guest's VMM (the one the engine started), from /proc, once it has set
/// up its sandbox (QEMU does that early in its start; at most 10 s).
fn vmm_status(show: &serde_json::Value) -> String {
    let pid = show["guest"]["pid"].as_u64().unwrap_or(0);
    let read = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for _ in 0..200 {
        let s = read();
        if s.contains("Seccomp:\t2") || s.is_empty() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    read()
}

/// The guest's QEMU command line (the VMM the engine started), from /proc.
fn vmm_cmdline(show: &serde_json::Value) -> String {
    let pid = show["guest"]["pid"].as_u64().unwrap_or(0);
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Polls `vm show g` until `pred` holds (up to `secs`), returning the last answer.
/// Whether a VM's network still runs: starting or running, or for a started guest booting or
/// ready.
fn active(v: &serde_json::Value) -> bool {
    ["starting", "running", "booting", "ready"].iter().any(|s| v["state"] == *s)
}

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

/// seed: testVMRestart
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
    let Some(((before, after, restarted, pid_before, console), _)) = out else { return };
    assert_eq!(before.len(), 1, "one instance before the restart: {before:?}\n{console}");
    assert_eq!(restarted["starts"], 2);
    assert_ne!(restarted["guest"]["pid"].as_u64(), pid_before, "a new guest process");
    assert_eq!(after.len(), 2, "the new instance works: {after:?}\n{console}");
}

/// Issue 26 (b), on the fast guest: with a launcher that outlives its engines, an engine
/// stopped (SIGTERM) or killed (SIGKILL) and started again takes its guest over from its
/// record: the same VMM and boot, the consumer hears it again, and the restored filter still
/// drops what the guest (firewall off) sends elsewhere; nothing leaks at any moment. Stopping
/// the launcher ends the guest.
#[test]
fn an_engine_restart_keeps_its_guest() {
    let script = format!(
        "b=$(cut -c1-8 /proc/sys/kernel/random/boot_id); i=0; while [ $i -lt 400 ]; do omerta-guest udp-rr {} alive-$b 300; omerta-guest udp-send 8.8.8.8:53 leak 1; sleep 0.2; i=$((i+1)); done",
        consumer_ep()
    );
    let out = private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        let sinks = ForbiddenSinks::start(ns);
        let (stop, received, echo) = echo_consumer(ns);
        let state = std::env::temp_dir().join(format!("omerta-restart-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut launcher = omerta_it::LauncherProc::start(ns, "restart", &state);
        let mut e = omerta_it::EngineProc::start(ns, "restart", &launcher.engine_args());
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, &script, &initrd);
        let spec = format!("name=g,consumer={},firewall=no", consumer_ep());
        let (code, _, err) = e.vm_start(&spec, &kernel, &initrd);
        assert_eq!(code, 0, "vm start: {err}");
        let heard =
            |r: &Received| r.lock().unwrap().iter().filter(|m| m.starts_with("alive-")).cloned().collect::<Vec<_>>();
        assert!(
            wait_until(90, || !heard(&received).is_empty()),
            "the guest never spoke: {}",
            console_of(&e.json(&["vm", "show", "g"]))
        );
        let boot = heard(&received)[0].clone();
        let pid = e.json(&["vm", "show", "g"])["guest"]["pid"].as_u64();
        let record = state.join("engine/g.json");
        let record_mode =
            std::fs::metadata(&record).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        let mut rounds = Vec::new();
        for signal in ["TERM", "KILL"] {
            e.restart(signal);
            let n = heard(&received).len();
            let again = wait_until(30, || heard(&received).len() > n + 2);
            let (c, out, err) = e.ctl(&["--json", "vm", "show", "g"]);
            assert_eq!(c, 0, "after SIG{signal}: vm show g: {err}\n{}\n{}", e.stderr(), launcher.log());
            let show: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            // The restored filter drops the guest's other datagrams, counted.
            let dropped =
                wait_until(10, || e.json(&["stats", "g"])[0]["drops"]["not_allowed"].as_u64().unwrap_or(0) > 0);
            rounds.push((signal, again, show["guest"]["pid"].as_u64(), show["state"].clone(), dropped));
        }
        let same_boot = heard(&received).iter().all(|m| *m == boot);
        stop.store(true, Ordering::Relaxed);
        let _ = echo.join();
        let code = e.end("TERM");
        // The engine has stopped and its guest still runs: the launcher holds it.
        let alive = |p: Option<u64>| p.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        let kept_after_stop = alive(pid);
        // Started again, then its launcher stopped: the guest ends, and the engine, whose
        // fence went with the launcher, stops by itself (exit status 1).
        e.restart("TERM");
        launcher.stop();
        let gone = wait_until(10, || !alive(pid));
        let engine_stopped = wait_until(10, || e.stderr().contains("is gone, and the kernel fence with it: stopping"));
        let (last_code, log) = e.stop();
        let leaks = sinks.leaks();
        let _ = std::fs::remove_dir_all(&state);
        let ends = (code, kept_after_stop, gone, engine_stopped, last_code);
        Some((rounds, pid, same_boot, record_mode, ends, log, leaks, launcher.log()))
    })
    .flatten();
    let Some((rounds, pid, same_boot, record_mode, ends, log, leaks, launcher_log)) = out else { return };
    let (code, kept, gone, engine_stopped, last_code) = ends;
    assert_eq!(record_mode.ok(), Some(0o600), "the guest's record is the engine's alone: {log}");
    for (signal, again, pid_after, state, dropped) in rounds {
        assert!(again, "after SIG{signal}: the consumer hears the guest again\n{log}\n{launcher_log}");
        assert_eq!(pid_after, pid, "after SIG{signal}: the same VMM");
        assert!(state == "running" || state == "booting" || state == "ready", "after SIG{signal}: {state}");
        assert!(dropped, "after SIG{signal}: the restored filter drops the guest's other datagrams");
    }
    assert!(same_boot, "one boot of the guest throughout");
    assert!(log.contains("vm g: restored"), "{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(kept, "an engine stopped with a launcher of its own leaves its guest running");
    assert!(gone, "stopping the launcher ends the guest: {launcher_log}");
    assert!(
        engine_stopped && last_code == Some(1),
        "an engine whose launcher went stops, failed: {last_code:?}\n{log}"
    );
    assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}\n{log}");
}

#[test]
fn a_started_guest_is_killed_on_a_violation() {
    let script =
        format!("omerta-guest udp-rr {} hello 5000; omerta-guest udp-send 8.8.8.8:53 dns 1; sleep 30", consumer_ep());
    // Without the guest firewall, which would stop the violation before the engine sees it.
    let out = started_guest("kill", ",mode=conntrack,firewall=no", &script, |e, _| {
        let v = wait_show(e, 60, |v| v["state"] == "terminated");
        let pid = v["guest"]["pid"].as_u64().unwrap_or(0);
        (v, !wait_until(10, || !std::path::Path::new(&format!("/proc/{pid}")).exists()))
    });
    let Some(((v, alive), _)) = out else { return };
    assert_eq!(v["state"], "terminated", "{v}\n{}", console_of(&v));
    assert_eq!(v["reason"], "not_allowed");
    assert!(!alive, "the guest process was killed");
}

#[test]
fn a_guest_that_exits_is_noticed() {
    let out = started_guest("exit", "", "echo short-lived", |e, _| wait_show(e, 60, |v| v["state"] == "exited"));
    let Some((v, _)) = out else { return };
    assert_eq!(v["state"], "exited", "{v}");
    assert!(v["reason"].as_str().unwrap_or("").contains("guest exited"), "{v}");
}

/// The guest's side of a WireGuard tunnel to the consumer (kernel WireGuard, tunnel address
/// 10.99.0.2, keepalive every second), up and tested with three pings to 10.99.0.1.
fn wg_tunnel_script(g_priv: &str, c_pub: &str) -> String {
    format!(
        "echo {g_priv} > /tmp/key\n\
         ip link add wg0 type wireguard || exit 3\n\
         wg set wg0 private-key /tmp/key listen-port 51820 peer {c_pub} allowed-ips 10.99.0.0/24 endpoint {ep} persistent-keepalive 1 || exit 4\n\
         ip addr add 10.99.0.2/24 dev wg0\n\
         ip link set wg0 up\n\
         omerta-guest ping 10.99.0.1 3\n",
        ep = consumer_ep()
    )
}

/// An engine worker for a WireGuard guest named `tag`, allowing the consumer; the VMM's end of
/// its socketpair.
fn wg_worker(
    ns: &omerta_it::Netns,
    tag: &str,
) -> (engine::worker::VmWorker, crossbeam_channel::Receiver<engine::worker::Event>, OwnedFd) {
    let (vm_end, engine_end): (OwnedFd, OwnedFd) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
    let spec = format!("name={tag},handle=fd:{},consumer={}", engine_end.into_raw_fd(), consumer_ep());
    let cfg = control::config::vm_from_spec(&spec).expect("test VM config");
    let (tx, events) = crossbeam_channel::unbounded();
    (omerta_it::spawn_worker(ns, &cfg, Backend::Auto, tx).expect("engine worker"), events, vm_end)
}

/// A guest with kernel WireGuard behind the engine, the consumer in its own namespace
/// (omerta-consumer, boringtun). Returns the outcome and what the consumer printed.
fn wireguard_run(tag: &str, extra_script: &str) -> Option<(Outcome, String)> {
    let (tag, extra) = (tag.to_string(), extra_script.to_string());
    private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let (g_priv, g_pub) = omerta_tools::wg_keypair([0x11; 32]);
        let (c_priv, c_pub) = omerta_tools::wg_keypair([0x22; 32]);
        let sinks = ForbiddenSinks::start(ns);
        let consumer = omerta_it::WgConsumer::start(ns, &tag, &c_priv, &c_pub, &g_pub, "10.99.0.1", 80);
        let (w, events, vm_end) = wg_worker(ns, &tag);
        let script = format!(
            "{}echo HANDSHAKES $(wg show wg0 latest-handshakes | cut -f2)\n{extra}",
            wg_tunnel_script(&g_priv, &c_pub)
        );
        let opts =
            GuestOpts { script, consumer: consumer_ep(), firewall: true, ipv6: false, dhcp: false, timeout: TIMEOUT };
        let (mut vm, _dir) = boot_guest(ns, &opts, hv::Nic::DgramFd(vm_end), &tag)?;
        let exit = vm.wait();
        let run = GuestRun { exit, console: vm.console() };
        let stats = w.stop();
        let out = consumer.finish();
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}");
        let events = events.try_iter().map(|e| e.kind).collect();
        Some((Outcome { run, stats, events, received: Vec::new() }, out))
    })
    .flatten()
}

#[test]
fn provider_network_flap_with_wireguard() {
    // A real WireGuard tunnel through the engine; then the provider's link to the consumer goes
    // down for longer than WireGuard waits for an answer (15 s; it then retries its handshake
    // every 5 s), and comes back with another
    // address. The tunnel recovers both ways and WireGuard has made a new handshake, which
    // the consumer answered at the provider's new address.
    let out = private_netns(|ns| {
        let _slot = GuestSlot::take();
        let (g_priv, g_pub) = omerta_tools::wg_keypair([0x31; 32]);
        let (c_priv, c_pub) = omerta_tools::wg_keypair([0x42; 32]);
        let sinks = ForbiddenSinks::start(ns);
        let consumer = omerta_it::WgConsumer::start(ns, "wg-flap", &c_priv, &c_pub, &g_pub, "10.99.0.1", 85);
        let (w, _events, vm_end) = wg_worker(ns, "wg-flap");
        let script = format!(
            "{}echo HANDSHAKE1 $(wg show wg0 latest-handshakes | cut -f2)\n\
             echo FLAP-READY\n\
             i=0; while omerta-guest ping 10.99.0.1 1 | grep -q 'REPLIES 1' && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done\n\
             echo OUTAGE-SEEN\n\
             i=0; until omerta-guest ping 10.99.0.1 1 | grep -q 'REPLIES 1' || [ $i -ge 60 ]; do i=$((i+1)); done\n\
             echo TUNNEL-BACK\n\
             sleep 8\n\
             echo HANDSHAKE2 $(wg show wg0 latest-handshakes | cut -f2)\n\
             echo FINAL; omerta-guest ping 10.99.0.1 3",
            wg_tunnel_script(&g_priv, &c_pub)
        );
        let opts =
            GuestOpts { script, consumer: consumer_ep(), firewall: true, ipv6: false, dhcp: false, timeout: TIMEOUT };
        let (mut vm, _dir) = boot_guest(ns, &opts, hv::Nic::DgramFd(vm_end), "wg-flap")?;
        let ready = wait_until(60, || vm.console().contains("FLAP-READY") || vm.try_wait().is_some());
        let errors_before = w.snapshot().counters.host_send_errors;
        omerta_it::ip(&["link", "set", "vc0", "down"]);
        std::thread::sleep(Duration::from_secs(20)); // the outage itself
        let errors_during = w.snapshot().counters.host_send_errors - errors_before;
        omerta_it::ip(&["addr", "del", "203.0.113.1/24", "dev", "vc0"]);
        omerta_it::ip(&["addr", "add", "203.0.113.9/24", "dev", "vc0"]);
        omerta_it::ip(&["link", "set", "vc0", "up"]);
        let exit = vm.wait();
        let run = GuestRun { exit, console: vm.console() };
        let stats = w.stop();
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}");
        Some((ready, errors_during, run, stats, consumer.finish()))
    })
    .flatten();
    let Some((ready, errors_during, run, stats, consumer)) = out else { return };
    let why =
        format!("--- engine: {:?}\n--- consumer:\n{consumer}\n--- guest console:\n{}", stats.counters, run.console);
    let field = |key: &str| -> u64 {
        run.console.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    assert!(ready, "the tunnel came up before the flap\n{why}");
    assert!(
        run.console.contains("OUTAGE-SEEN") && run.console.contains("TUNNEL-BACK"),
        "the guest saw the outage and the tunnel back\n{why}"
    );
    assert!(errors_during > 0, "sends failed while the link was down\n{why}");
    let (first, second) = (field("HANDSHAKE1 "), field("HANDSHAKE2 "));
    assert!(
        first > 1_000_000_000 && second > first,
        "WireGuard made a new handshake after the flap ({first} -> {second})\n{why}"
    );
    assert!(consumer.contains("HANDSHAKE from 203.0.113.9:"), "the consumer answered it at the new address\n{why}");
    let last = run.console.split("FINAL").nth(1).unwrap_or_default();
    let replies: u32 =
        last.lines().find_map(|l| l.strip_prefix("PING-REPLIES ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(replies >= 2, "pings through the tunnel are answered again\n{why}");
}

/// seed: testWireGuardHandshake
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

/// seed: testEncryptedDataTransfer
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

/// Runs `scripts/NAME` as a user runs it (as root, from the checkout): everything it printed;
/// fails the test if it failed. `None` when not root.
fn demo(name: &str) -> Option<String> {
    if !omerta_it::require(
        "root for make run",
        if sys::effective_ids().0 == 0 { Ok(()) } else { Err("not root".into()) },
    ) {
        return None;
    }
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out =
        std::process::Command::new(top.join("scripts").join(name)).current_dir(&top).output().expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed:\n{text}");
    Some(text)
}

#[test]
fn make_run_demo_works() {
    // The README's first command (scripts/demo.sh is what `make run` does): a Debian cloud VM,
    // SSH through wireguard-go with the host key pinned, root's escapes blocked and counted.
    // One more cloud boot (about two minutes): the demo must keep working as a user sees it.
    let _slot = GuestSlot::take();
    let Some(text) = demo("demo.sh") else { return };
    for want in [
        "the VM is ready",
        "hello from demo as omerta",
        "scope global dynamic",
        "latest handshake",
        "firewall: -P OUTPUT ACCEPT",
        "ping 8.8.8.8: answers: 0",
        "not_allowed len=46 udp 10.0.2.15:",
        "-> 8.8.8.8:53",
        "-> 192.168.1.1:80",
        "done in",
    ] {
        assert!(text.contains(want), "make run did not show '{want}':\n{text}");
    }
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("== the engine dropped ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 6, "the engine counted each attempt (4 UDP, TCP, ping): {dropped}\n{text}");
}

#[test]
fn make_run_small_demo_works() {
    // `make run-small`: the test guest over WireGuard to omerta-consumer, in seconds.
    let _slot = GuestSlot::take();
    let Some(text) = demo("demo-small.sh") else { return };
    for want in [
        "REPLY:tunnel-echo:hello-from-the-vm-3",
        "HANDSHAKE from",
        "CIPHERTEXT-CLEAN",
        "SENT 0",
        "not_allowed            3",
        "udp 10.0.2.15:40000 -> 8.8.8.8:53",
        "done: the guest reached its consumer over WireGuard",
    ] {
        assert!(text.contains(want), "make run-small did not show '{want}':\n{text}");
    }
}

/// What a direct-mode run saw: the final `vm show` (and more, see `direct_run`), what each
/// listener accepted, the guest's console.
struct DirectRun {
    v: serde_json::Value,
    lan: u32,
    local: u32,
    internet: u32,
    /// Connections to the address the provider gained after the VM started.
    late: u32,
    console: String,
}

/// An address the provider's namespace gains while a direct-mode guest runs (198.18.0.0/15,
/// the benchmarking range: not private, so only the host-address fence keeps it out).
const LATE_ADDRESS: [u8; 4] = [198, 18, 0, 9];

/// A guest started in direct mode (QEMU's user NAT, no engine in the path) in a private
/// namespace holding three TCP listeners: a "provider LAN" host at 10.250.0.3:8080, a provider
/// service on all its addresses, port 8081 (loopback included, which QEMU's NAT maps to
/// 10.0.2.2:8081), and
/// "the internet", 198.51.100.30:8080, in the consumers' namespace.
fn direct_run(tag: &str, firewall: bool, script: &str) -> Option<DirectRun> {
    direct_run_with(tag, firewall, script, false)
}

/// [`direct_run`]; with `late`, the provider's namespace gains [`LATE_ADDRESS`] (with a
/// listener on port 8082) right after the guest starts.
fn direct_run_with(tag: &str, firewall: bool, script: &str, late: bool) -> Option<DirectRun> {
    let (tag, script) = (tag.to_string(), script.to_string());
    private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        omerta_it::consumer_address(ns, CONSUMER_IP);
        add_local_address(ns, [10, 250, 0, 3]);
        let lan = std::net::TcpListener::bind("10.250.0.3:8080").expect("lan listener");
        // On every address of the provider's namespace: its loopback and its own addresses.
        let local = std::net::TcpListener::bind("0.0.0.0:8081").expect("provider listener");
        let internet = omerta_it::in_consumers_ns(ns, || {
            std::net::TcpListener::bind("198.51.100.30:8080").expect("internet listener")
        });
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
        let (lan_n, local_n, internet_n) = (count(lan), count(local), count(internet));
        let e = omerta_it::EngineProc::start(ns, &tag, &[]);
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, &script, &initrd);
        let spec = format!(
            "name=g,mode=direct,rogue-interval=1,consumer={}{}",
            consumer_ep(),
            if firewall { "" } else { ",firewall=no" }
        );
        let (code, _, err) = e.vm_start(&spec, &kernel, &initrd);
        assert_eq!(code, 0, "vm start: {err}");
        let late_n = late.then(|| {
            add_local_address(ns, LATE_ADDRESS);
            count(std::net::TcpListener::bind((std::net::Ipv4Addr::from(LATE_ADDRESS), 8082)).expect("late listener"))
        });
        let first = e.json(&["vm", "show", "g"]);
        let cmdline = vmm_cmdline(&first);
        let vmm_ns = omerta_it::netns_of(u32::try_from(first["guest"]["pid"].as_u64().unwrap_or(0)).unwrap_or(0));
        let own_ns = vmm_ns.is_some() && vmm_ns != omerta_it::netns_of(e.pid()) && vmm_ns != omerta_it::runner_netns();
        let v = wait_show(&e, 60, |v| !active(v));
        let console = console_of(&v);
        let (_, log) = e.stop();
        if std::env::var_os("OMERTA_TEST_LOG").is_some() {
            eprintln!("{log}");
        }
        done.store(true, Ordering::Relaxed);
        Some(DirectRun {
            v: serde_json::json!({"first": first, "last": v, "cmdline": cmdline, "own_netns": own_ns}),
            lan: lan_n.join().unwrap_or(0),
            local: local_n.join().unwrap_or(0),
            internet: internet_n.join().unwrap_or(0),
            late: late_n.map_or(0, |h| h.join().unwrap_or(0)),
            console,
        })
    })
    .flatten()
}

/// seed: testDirectModeCreatesNATAttachment
#[test]
fn direct_mode_creates_nat_attachment() {
    // What the VMM really got: QEMU's user-mode network on its command line, no engine handle,
    // and a network namespace of its own (not the engine's, whose loopback is the provider's).
    let Some(DirectRun { v, console, .. }) = direct_run("d-att", true, "ip -4 addr show eth0; ip route") else {
        return;
    };
    let cmdline = v["cmdline"].as_str().unwrap_or_default();
    assert!(cmdline.contains("-netdev user,id=n0"), "the VMM's NIC is its own user-mode NAT: {cmdline}");
    assert!(!cmdline.contains("dgram,") && !cmdline.contains("stream,"), "no engine handle: {cmdline}");
    assert_eq!(v["own_netns"], true, "the VMM runs in a network namespace of its own: {v}");
    assert!(console.contains("inet 10.0.2.15/24"), "the guest is on QEMU's user network:\n{console}");
}

/// seed: testDirectModeIptablesBlocks
#[test]
fn direct_mode_iptables_blocks() {
    let script =
        "omerta-guest udp-send 10.250.0.3:9000 x 3\nomerta-guest tcp-hold 10.250.0.3:8080 1\nomerta-guest dns 10.0.2.3";
    let Some(DirectRun { v, lan, console, .. }) = direct_run("d-fw", true, script) else { return };
    assert!(console.contains("SENT 0") && console.contains("TCP-FAILED"), "the guest firewall blocks:\n{console}");
    assert_eq!(lan, 0, "nothing reached the LAN host");
    assert_eq!(v["last"]["rogue_connections"], serde_json::json!([]), "nothing for the detector to see");
}

/// seed: testDirectModeBypassable
#[test]
fn direct_mode_bypassable() {
    // Direct mode's barrier is the guest's own firewall: a guest that drops it gets out to the
    // internet. The rogue-connection detector reports the connection; it cannot prevent it.
    // The provider's LAN stays fenced off (the VM has no allow-private=yes).
    let script = "iptables -P OUTPUT ACCEPT\niptables -F OUTPUT\nomerta-guest udp-send 198.51.100.30:9000 x 3\n\
                  omerta-guest tcp-hold 10.250.0.3:8080 1\nomerta-guest tcp-hold 198.51.100.30:8080 4";
    let Some(DirectRun { v, lan, internet, console, .. }) = direct_run("d-bypass", true, script) else { return };
    assert!(console.contains("TCP-CONNECTED"), "with its firewall dropped the guest connects:\n{console}");
    assert_eq!(internet, 1, "the internet host accepted the VM's connection: traffic leaks in direct mode");
    assert_eq!(lan, 0, "the provider's LAN is fenced off even so");
    let rogue = v["last"]["rogue_connections"].to_string();
    assert!(rogue.contains("-> 198.51.100.30:8080"), "the detector reported it: {v}");
    // The guest's UDP left through the NAT's unconnected socket: the detector cannot see where
    // to, and says so instead of staying silent.
    let blind = v["last"]["rogue_blind"].to_string();
    assert!(blind.contains("udp ") && blind.contains("cannot be seen"), "the detector names its blind spot: {v}");
}

/// seed: testDirectModeLocalhostBlocked
#[test]
fn direct_mode_localhost_blocked() {
    // QEMU's NAT maps 10.0.2.2 to the loopback of the namespace the VMM runs in. With the guest
    // firewall off, the provider's loopback service (127.0.0.1:8081 here) stays unreachable,
    // because the VMM runs in a namespace of its own; so do the provider's LAN (10.250.0.3) and
    // its own addresses (192.0.2.253, its end of the consumers' link), fenced in the VMM's
    // namespace; the "internet" (198.51.100.30) is reachable, as direct mode allows by design.
    let script = "omerta-guest tcp-hold 10.0.2.2:8081 1\nomerta-guest tcp-hold 10.250.0.3:8080 1\n\
                  omerta-guest tcp-hold 192.0.2.253:8081 1\nomerta-guest tcp-hold 198.51.100.30:8080 1";
    let Some(DirectRun { lan, local, internet, console, .. }) = direct_run("d-local", false, script) else { return };
    assert!(console.contains("TCP-FAILED"), "the provider's localhost is not reachable:\n{console}");
    assert_eq!(local, 0, "nothing reached the provider's loopback service");
    assert_eq!(lan, 0, "nothing reached the provider's LAN");
    assert!(console.contains("TCP-CONNECTED"), "the guest firewall was off: the internet answered:\n{console}");
    assert_eq!(internet, 1);
}

#[test]
fn direct_mode_fences_an_address_the_host_gains_later() {
    // The provider gains an address while a direct-mode guest (firewall off) runs: within the
    // engine's 2 s address check, the VMM's namespace rejects it too; the internet stays
    // reachable.
    let late = std::net::Ipv4Addr::from(LATE_ADDRESS);
    let script = format!("sleep 8\nomerta-guest tcp-hold {late}:8082 1\nomerta-guest tcp-hold 198.51.100.30:8080 1");
    let Some(DirectRun { late, internet, console, .. }) = direct_run_with("d-late", false, &script, true) else {
        return;
    };
    assert!(console.contains("TCP-CONNECTED"), "the guest's firewall was off: the internet answered:\n{console}");
    assert_eq!(internet, 1);
    assert_eq!(late, 0, "nothing reached the provider's new address:\n{console}");
}

#[test]
fn stream_framing_with_a_real_guest() {
    // QEMU's -netdev stream: frames carry a u32 length prefix on a stream socket.
    let script = format!("for i in 1 2 3; do omerta-guest udp-rr {} framed-$i 5000; done", c());
    let Some(o) = behind_engine_with("stream", Run { firewall: true, stream: true, ..Run::default() }, &script) else {
        return;
    };
    o.expect(o.run.saw("REPLY:echo:framed-3"), "round trips over the stream framing");
    o.expect(o.stats.counters.forwarded_udp == 3 && o.stats.counters.arp_replies >= 1, "through the engine");
    // Only a stream handle reports the VMM's exit as an end of stream: proof of the framing.
    o.expect(o.events.iter().any(|e| matches!(e, EventKind::HandleClosed(_))), "the guest's exit closed the stream");
}

#[test]
fn each_vmm_runs_as_a_uid_of_its_own() {
    // With --vmm-uid-base, two guests' VMMs run as two different uids of the range (and
    // neither as root): one VMM taken over by its guest cannot signal, trace or read the other.
    let out = private_netns(|ns| {
        let _slot = GuestSlot::take();
        let (kernel, base) = omerta_it::guest_image()?;
        let e = omerta_it::EngineProc::start(ns, "uids", &["--vmm-uid-base".to_string(), "61000".to_string()]);
        let initrd = e.dir.join("initrd");
        omerta_it::write_test_initrd(&base, "sleep 5", &initrd);
        let mut uids = Vec::new();
        for name in ["a", "b"] {
            let spec = format!("name={name},consumer={}", consumer_ep());
            let (code, _, err) = e.vm_start(&spec, &kernel, &initrd);
            assert_eq!(code, 0, "vm start {name}: {err}\n{}", e.stderr());
            let v = e.wait_json("the guest", &["vm", "show", name], 30, |v| v["guest"]["pid"].as_u64().is_some());
            let status = vmm_status(&v);
            uids.push(omerta_it::status_field(&status, "Uid:"));
        }
        // Each guest said it was ready (its init prints the readiness line on its console).
        let ready = e.wait_json("guest a ready", &["vm", "show", "a"], 60, |v| v["state"] == "ready" || !active(v));
        assert_eq!(
            (ready["state"].as_str(), ready["guest"]["boot"].as_str()),
            (Some("ready"), Some("ready")),
            "{ready}"
        );
        assert!(ready["guest"]["ready_after_s"].as_f64().is_some(), "{ready}");
        // One that is not ready within its boot timeout fails, and its VMM is ended.
        let spec = format!("name=c,consumer={},boot-timeout=1", consumer_ep());
        let (code, out, err) = e.vm_start(&spec, &kernel, &initrd);
        assert_eq!(code, 0, "vm start c: {err}\n{}", e.stderr());
        assert!(out.contains("\"state\":\"booting\""), "vm start returns at once, booting: {out}");
        let failed = e.wait_json("guest c failed", &["vm", "show", "c"], 30, |v| v["state"] == "failed");
        assert!(failed["reason"].as_str().unwrap_or("").contains("not ready within 1 s"), "{failed}");
        assert!(failed["guest"]["console_tail"].is_array(), "{failed}");
        let c_pid = failed["guest"]["pid"].as_u64().unwrap_or(0);
        assert!(!std::path::Path::new(&format!("/proc/{c_pid}")).exists(), "the failed guest's VMM is gone");
        assert_eq!(e.json(&["vm", "remove", "c"])["state"], "removed");
        // `vm remove` ends the first guest's VMM and deletes its console; its name and its uid
        // are free again, for the next guest.
        let a = e.json(&["vm", "show", "a"]);
        let (pid, console) =
            (a["guest"]["pid"].as_u64().unwrap_or(0), a["guest"]["console"].as_str().unwrap_or("").to_string());
        assert!(std::path::Path::new(&console).exists(), "a's console: {a}");
        let removed = e.json(&["vm", "remove", "a"]);
        assert_eq!(removed["state"], "removed", "{removed}");
        let gone = std::path::Path::new(&format!("/proc/{pid}")).exists();
        let list = e.json(&["vm", "list"]);
        let names: Vec<&str> = list.as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
        let console_left = std::path::Path::new(&console).exists();
        let spec = format!("name=a,consumer={}", consumer_ep());
        let (code, _, err) = e.vm_start(&spec, &kernel, &initrd);
        assert_eq!(code, 0, "vm start a again: {err}");
        let again = e.wait_json("the guest", &["vm", "show", "a"], 30, |v| v["guest"]["pid"].as_u64().is_some());
        let uid_again = omerta_it::status_field(&vmm_status(&again), "Uid:");
        let (code, log) = e.stop();
        assert_eq!(code, Some(0), "the engine stops cleanly: {log}");
        Some((uids, gone, names.join(" "), console_left, uid_again))
    })
    .flatten();
    let Some((uids, vmm_left, names, console_left, uid_again)) = out else { return };
    assert_eq!(uids[0], "61000\t61000\t61000\t61000", "the first VMM's uid: {uids:?}");
    assert_eq!(uids[1], "61001\t61001\t61001\t61001", "the second VMM's, another one: {uids:?}");
    assert!(!vmm_left, "the removed guest's VMM is gone");
    assert!(!console_left, "and its console");
    assert_eq!(names, "b", "only b is left");
    assert_eq!(uid_again, uids[0], "a new guest takes the freed uid");
}

/// seed: mesh: VM request
#[test]
fn mesh_vm_request() {
    // The plan's cross-machine run (tests/mesh.rs, shared by the three mesh_* cases): the
    // consumer's `omerta vm request --wait` reaches the provider's omertad, which boots the
    // Debian cloud image through the engine; "VM Created Successfully!", the VM listed and
    // ready at the provider; released, a crashed provider's VM removed by its successor, a
    // stopping provider's VM stopped.
    let Some(r) = crate::mesh::real_run() else { return };
    let ctx = || format!("request: {:?}\nprovider:\n{}\nconsumer:\n{}", r.request, r.provider_log, r.consumer_log);
    assert_eq!(r.request.0, 0, "{}", ctx());
    assert!(r.request.1.starts_with("VM Created Successfully!"), "{}", ctx());
    assert!(r.request.2.contains("SSH answers on"), "{}", ctx());
    eprintln!("mesh: VM {} ready for SSH {:.0} s after the request", r.vm, r.request_s);
    assert_eq!(r.provider_list["providing"][0]["vmId"], r.vm.as_str(), "{}", r.provider_list);
    assert_eq!(r.provider_list["providing"][0]["state"], "ready", "{}", r.provider_list);
    assert_eq!(r.engine_vm["mode"], "filtered", "{}", r.engine_vm);
    assert_eq!(r.engine_vm["allow"][0].as_str().map(|a| a.starts_with("203.0.113.2:")), Some(true), "{}", r.engine_vm);
    assert_eq!((r.release.0, r.release.1.trim()), (0, format!("VM {} released", r.vm).as_str()), "{:?}", r.release);
    assert_eq!(r.engine_after_release, serde_json::json!([]), "the released VM stays in the engine");
    // Stopped with SIGTERM, the provider leaves its VM running; started again, it adopts
    // it; `omertad stop --release` ends it.
    assert_eq!(r.stop_code, Some(0));
    assert_eq!(r.engine_after_restart.as_array().map(Vec::len), Some(1), "{}", r.engine_after_restart);
    assert!(r.vm2_adopted, "{}", ctx());
    assert_eq!(r.release_stop.1, Some(0), "{:?}", r.release_stop);
    assert_eq!(r.engine_after_stop, serde_json::json!([]), "a released provider's VM stays");
}

/// Issue 26 (h): a host that runs out of room for a guest's disk pauses the guest, never
/// fails it: the launcher says so, the engine shows it, the consumer is told; with room again
/// the guest goes on by itself and its write completes.
#[test]
fn mesh_a_full_host_pauses_and_resumes_the_guest() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let p = &r.pause;
    assert!(p.filled, "{p:?}");
    assert_eq!(p.engine.as_deref(), Some("the provider's disk is full"), "{p:?}");
    assert!(p.launcher_said, "{p:?}");
    assert_eq!(p.consumer, "paused: the provider's disk is full", "{p:?}\n{}", r.consumer_log);
    assert!(p.wrote && p.resumed_said, "{p:?}");
    assert_eq!(p.consumer_after, "active", "{p:?}");
}

/// Issue 26 (a): the provider's daemon killed and started again adopts the VM it provides:
/// the same VMM and guest (its boot ID), the file written in it still there.
#[test]
fn mesh_provider_restart_keeps_the_vm() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let a = &r.adopt;
    let lines = |o: &crate::mesh::Out| o.1.lines().map(str::to_string).collect::<Vec<_>>();
    let (before, after) = (lines(&a.before), lines(&a.after));
    assert_eq!(before.len(), 2, "{:?}", a.before);
    assert!(a.said.contains(&format!("rental adopted: VM {}", r.vm)), "{}", r.provider_log);
    assert!(a.pid_before.is_some() && a.pid_before == a.pid_after, "VMM pid {:?} then {:?}", a.pid_before, a.pid_after);
    assert_eq!(after, before, "the mark and the boot ID, before and after the restart: {:?}", a.after);
    assert_eq!(a.listed[0]["vmId"], r.vm.as_str(), "{}", a.listed);
}

/// Issue 26 (b): the provider's engine stopped (SIGTERM), then killed (SIGKILL), and started
/// again each time, its launcher a service of its own: the same VMM and boot, the mark there,
/// and an SSH session opened before the restarts still answers after each.
#[test]
fn mesh_engine_restart_keeps_the_vm() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let b = &r.engine_restart;
    assert!(b.session_before, "the session answered before the restarts");
    assert_eq!(b.rounds.len(), 2, "{:?}", b.rounds);
    for (signal, back, pid) in &b.rounds {
        assert!(back, "after SIG{signal}: the SSH session opened before answers\n{}", r.provider_log);
        assert_eq!(*pid, r.adopt.pid_after, "after SIG{signal}: the same VMM");
    }
    assert!(b.restored_said, "the engine said it restored the VM");
    let lines = |o: &crate::mesh::Out| o.1.lines().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(lines(&b.after), lines(&r.adopt.before), "the mark and the boot ID: {:?}", b.after);
}

/// Issue 26 (d): the provider's host goes down (launcher, engine and daemon killed, runtime
/// directories emptied) and comes back: its daemon boots the rental again from its kept
/// disk, and the consumer reaches it with no command: the mark is there, the boot is new.
#[test]
fn mesh_a_reboot_boots_the_rental_again_from_its_disk() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let b = &r.reboot;
    assert!(b.vmm_died, "the VMM died with its launcher");
    let before: Vec<&str> = r.adopt.before.1.lines().collect();
    let after: Vec<&str> = b.after.1.lines().collect();
    assert_eq!(b.after.0, 0, "ssh after the reboot: {:?}\n{}\n{}", b.after, r.provider_log, b.engine_log);
    assert_eq!(after.first(), before.first(), "the mark, from the kept disk: {:?}", b.after);
    assert_ne!(after.get(1), before.get(1), "a new boot: {:?}", b.after);
    assert!(b.resumed_said, "{}", r.provider_log);
    assert!(b.engine_state == "ready" || b.engine_state == "booting", "{}\n{}", b.engine_state, b.engine_log);
    assert!(b.engine_log.contains("resumed: its guest boots again from its disk"), "{}", b.engine_log);
    // A rental whose lease ran out while its provider was down: kept over the reboot, then
    // ended by the daemon, its disk deleted.
    assert!(b.expired_kept, "the second rental's disk outlived the reboot");
    assert_eq!(b.expired_engine_before, "kept", "the engine held it kept");
    assert!(b.expired_said, "{}", r.provider_log);
    assert_eq!(b.expired_dirs, 0, "its disk is deleted");
}

/// Issue 26 (c): the consumer's daemon killed, then stopped, and started again brings its
/// tunnel back with the kept keys: `omerta ssh VM` works with no other command.
#[test]
fn mesh_consumer_restart_brings_the_tunnel_back() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let mark = r.adopt.before.1.lines().next().unwrap_or("(none)");
    assert_eq!(r.consumer_restarts.len(), 2, "{:?}", r.consumer_restarts);
    for (signal, out) in &r.consumer_restarts {
        assert_eq!((out.0, out.1.trim()), (0, mark), "after SIG{signal}: {out:?}\n{}", r.consumer_log);
    }
    // The last start's log: the lease kept, its interface made again.
    let again = ["kernel", "wireguard-go"].iter().any(|k| r.consumer_log.contains(&format!("tunnel {k} made again")));
    assert!(again && r.consumer_log.contains(&format!("VM {} from", r.vm)), "{}", r.consumer_log);
}

/// A rental's disk (issue 26): the size granted, "no space" inside the guest and never more
/// than the grant on the host, a rental the state directory cannot hold refused with its
/// reason, nothing of it left once released.
#[test]
fn mesh_rental_disk() {
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let d = &r.disk;
    assert_eq!(d.dirs_running, 1, "one VMM directory while the VM runs: {d:?}");
    // 2560 MB granted; ext4 keeps a little for itself.
    assert!((2400..=2560).contains(&d.df_mb), "the guest's / is {} MB, 2560 granted", d.df_mb);
    assert!(d.fill.2.contains("No space left on device"), "the guest's dd: {:?}", d.fill);
    assert!(d.fill.1.contains("FILLED"), "{:?}", d.fill);
    // Filled: the file took about its grant, and never more.
    assert!(d.grant > 0 && d.allocated <= d.grant, "disk.qcow2 takes {} bytes, grant {}", d.allocated, d.grant);
    assert!(d.allocated >= 512 << 20, "the guest's writes reached the host file: {} bytes", d.allocated);
    assert_ne!(d.too_large.0, 0, "{:?}", d.too_large);
    let said = format!("{}{}", d.too_large.1, d.too_large.2);
    assert!(said.contains("the provider cannot hold this disk") && said.contains("no overcommit"), "{said}");
    assert_eq!(d.dirs_after_refusal, 1, "a refused rental makes no directory");
    assert_eq!(d.dirs_after_release, 0, "released: its disk, seed and console are gone");
}

/// seed: mesh: WireGuard tunnel
#[test]
fn mesh_wireguard_tunnel() {
    // `wg show` on the consumer: a recent handshake with the VM and traffic both ways; the
    // interface goes with a release and with the consumer daemon's stop.
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    let age = mesh::now_s().saturating_sub(r.handshake);
    assert!(r.handshake > 0 && age < 900, "handshake at {} ({age} s ago)", r.handshake);
    assert!(r.transfer.0 > 0 && r.transfer.1 > 0, "transfer {:?}", r.transfer);
    assert!(!r.links_after_release.contains(&r.interface), "{} stays after the release", r.interface);
    assert!(!r.links_after_consumer_stop.contains(": wg"), "{}", r.links_after_consumer_stop);
}

/// seed: mesh: SSH access
#[test]
fn mesh_ssh_access() {
    // The printed SSH command logs in through the tunnel (host key pinned); root in the VM
    // drops its firewall and tries the internet, the LAN and the provider host: nothing
    // arrives, the engine counts each; a connection to the consumer through the tunnel is
    // refused by the consumer's fence.
    let Some(r) = crate::mesh::real_run() else { return };
    assert_eq!(r.request.0, 0, "{:?}", r.request);
    assert_eq!(r.login.0, 0, "ssh: {:?}", r.login);
    assert!(r.login.1.starts_with("omerta\n"), "{:?}", r.login);
    // omerta ssh and vm show work the same where the tunnel is an interface (root's modes).
    assert_eq!((r.omerta_ssh.0, r.omerta_ssh.1.trim()), (0, "omerta"), "omerta ssh: {:?}", r.omerta_ssh);
    assert!(["kernel", "wireguard-go"].contains(&r.show["mode"].as_str().unwrap_or("")), "{}", r.show);
    assert!(
        r.show["latestHandshake"].as_u64().unwrap_or(0) > 0 && r.show["rxBytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        r.show
    );
    assert!(r.escape.1.contains("ESCAPES-SENT"), "{:?}", r.escape);
    // Nor can it open anything on the consumer's side of the tunnel.
    assert!(
        r.escape.1.contains("TUNNEL-FENCED") && r.into_consumer == 0,
        "{:?} ({} accepted)",
        r.escape,
        r.into_consumer
    );
    assert!(r.leaks.is_empty(), "reached: {:?}", r.leaks);
    assert!(r.drops.1 >= r.drops.0 + 10, "engine drops not_allowed {:?}", r.drops);
}
