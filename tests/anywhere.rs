//! Renting from anywhere (issue 25): a consumer daemon and CLI running as `nobody` (no
//! capability, no TUN), behind NAT with nothing forwarded, rent the Debian cloud VM and log in
//! through the userspace tunnel: `omerta ssh`, `omerta vm forward`, `omerta vm show`, the VM
//! trying to reach the consumer's side; then the NAT becomes symmetric, then double, each time
//! from a new outside address, while an SSH session goes on. One boot for all of it.
use std::process::{Command, Stdio};

use omerta_it::{private_netns, Nat, NatPath, VethPeer};
use serde_json::Value;

use crate::mesh::Out;

/// What the run saw, for the asserts.
#[derive(Debug, Default)]
struct Seen {
    request: Out,
    daemon_log: String,
    vm: String,
    id: Out,
    status7: Option<i32>,
    forward: (String, String),
    escape: Out,
    into_consumer: usize,
    show: Value,
    engine: Value,
    release: Out,
    /// The SSH session open across the NAT changes.
    session: Out,
    /// A login after each change: (which NAT, its outcome).
    after: Vec<(Nat, Out)>,
    /// The VM's allowlist at the end, and where the provider sees the consumer then.
    allow: Value,
    public_ip: String,
    provider_log: String,
    /// The VM's allowlist after a forged proof and another member's endpoint update.
    forged_allow: Value,
    provider_status: Value,
}

fn run(ns: &omerta_it::Netns, image: &std::path::Path) -> Seen {
    let _slot = omerta_it::GuestSlot::take();
    let mut seen = Seen::default();
    // The consumer behind an endpoint-independent NAT (its own address 192.168.77.2).
    let mut nat = NatPath::new(ns, "mu", Nat::EndpointIndependent);
    let peer = &nat.consumer;
    // The consumer runs as nobody with no --tunnel: a daemon that cannot make interfaces takes
    // the userspace tunnel itself.
    let Rented { e, p, c, net, pid, request, vm } = rent(ns, image, peer, "user", true);
    seen.daemon_log = c.log();
    seen.request = request;
    seen.vm = vm.unwrap_or_default();
    if seen.vm.is_empty() {
        seen.daemon_log = format!("consumer:\n{}\nprovider:\n{}", c.log(), p.log());
        return seen;
    }
    let vm = seen.vm.clone();
    seen.id = c.omerta(&["ssh", &vm, "--", "id", "-un"]);
    seen.status7 = Some(c.omerta(&["ssh", &vm, "--", "exit", "7"]).0);

    // A file through `vm forward` (to the VM's SSH server, carried by OpenSSH).
    // Not under `timeout`: the pid is omerta's own, for the kill below.
    let mut fwd = c.command_as(&omerta_it::mesh_bins().1, false);
    fwd.args(["vm", "forward", &vm, "127.0.0.1:2201:22"]).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut forward = fwd.spawn().expect("omerta vm forward");
    let mut line = String::new();
    if let Some(o) = forward.stdout.take() {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(o).read_line(&mut line);
    }
    let file = std::env::temp_dir().join(format!("omerta-fwd-{}", std::process::id()));
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data).expect("a file to carry");
    let local_sum = sha256(&file);
    let show = c.json(&["vm", "show", &vm]);
    let vm_ip = show["vmIP"].as_str().unwrap_or_default().to_string();
    let mut scp = c.command(std::path::Path::new("ssh"));
    scp.args(["-p", "2201", "-i", show["sshIdentity"].as_str().unwrap_or_default()]);
    scp.args(["-o", &format!("UserKnownHostsFile={}", show["knownHosts"].as_str().unwrap_or_default())]);
    scp.args(["-o", &format!("HostKeyAlias={vm_ip}"), "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]);
    scp.args([
        "-o",
        "IdentitiesOnly=yes",
        "-F",
        "/dev/null",
        "omerta@127.0.0.1",
        "cat > /tmp/carried; sha256sum /tmp/carried",
    ]);
    scp.stdin(std::fs::File::open(&file).expect("the file"));
    let remote = omerta_perf::command::output(&mut scp).unwrap_or_else(|e| panic!("{e}"));
    seen.forward = (local_sum, remote.1.split_whitespace().next().unwrap_or(&remote.2).to_string());
    let _ = forward.kill();
    let _ = forward.wait();
    let _ = std::fs::remove_file(&file);

    // Root in the VM drops its firewall and tries our side of the tunnel: a TCP service of
    // the consumer's machine on every address, UDP, ping.
    let service = peer.run(|| std::net::TcpListener::bind("0.0.0.0:2222").expect("a consumer service"));
    service.set_nonblocking(true).expect("nonblocking");
    let ours = show["consumerIP"].as_str().unwrap_or_default().to_string();
    let script = format!(
        "sudo bash -c 'iptables -P INPUT ACCEPT; iptables -P OUTPUT ACCEPT; iptables -F; \
         timeout 5 bash -c \"echo in > /dev/tcp/{ours}/2222\" && echo TUNNEL-OPEN || echo TUNNEL-FENCED; \
         for i in 1 2 3; do echo hi > /dev/udp/{ours}/5353; done; \
         ping -c 2 -W 1 {ours} >/dev/null 2>&1 && echo PING-ANSWERED || echo PING-UNANSWERED; echo TRIED'"
    );
    seen.escape = c.omerta(&["ssh", &vm, "--", &script]);
    while service.accept().is_ok() {
        seen.into_consumer += 1;
    }
    seen.show = c.json(&["vm", "show", &vm]);

    // Another member, who read both proof keys in the mesh's messages but holds neither
    // secret, sends the VM's port a proof of its own making: refused, counted, nothing moves.
    let port = seen.show["vmPort"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
    let forger = std::net::UdpSocket::bind("203.0.113.1:0").expect("the forger's socket");
    let guess = engine::proof::derive(&mesh::random::<32>().expect("random"), &[1; 32], &[2; 32]);
    let _ = forger.send_to(&engine::proof::seal(&guess, engine::log::unix_ms()), ("203.0.113.1", port));
    // And a vm_endpoint_update for it (the mesh's way for interface tunnels): refused, counted.
    let update =
        mesh::wire::Message::VmEndpointUpdate { vm_id: vm.clone(), consumer_endpoint: "203.0.113.1:4444".into() };
    let _ = crate::mesh::as_member(&crate::mesh::network_key(&p.home, &net), &pid, update);
    seen.provider_status = p.json(&["status"]);
    seen.forged_allow = e.json(&["allow", "list", &format!("mesh-{vm}")]);

    // An SSH session that prints for 30 s while the consumer's NAT changes under it twice.
    std::thread::scope(|s| {
        let session = s.spawn(|| {
            c.omerta(&["ssh", &vm, "--", "for i in $(seq 1 60); do echo tick $i; sleep 0.5; done; echo session-done"])
        });
        for kind in [Nat::Symmetric, Nat::Double] {
            std::thread::sleep(std::time::Duration::from_secs(6));
            nat.switch(kind);
            seen.after.push((kind, c.omerta(&["ssh", &vm, "--", "id", "-un"])));
        }
        seen.session = session.join().unwrap_or_default();
    });
    seen.public_ip = nat.public_ip();
    let name = format!("mesh-{vm}");
    seen.allow = e.json(&["allow", "list", &name]);
    seen.engine = e.json(&["stats", &name])[0].clone();
    seen.provider_log = p.log();
    seen.release = c.omerta(&["vm", "release", &vm]);
    drop(e);
    seen
}

/// A provider (its engine and daemon; VMs on ports of one range, as an operator behind a
/// firewall or NAT forwards it) and a consumer in `consumer`'s namespace (as nobody or root),
/// and the VM it asked for with `--wait` (its ID when the request succeeded).
struct Rented {
    e: omerta_it::EngineProc,
    p: crate::mesh::Node,
    c: crate::mesh::Node,
    net: String,
    pid: String,
    request: Out,
    vm: Option<String>,
}

fn rent(ns: &omerta_it::Netns, image: &std::path::Path, consumer: &VethPeer, tag: &str, nobody: bool) -> Rented {
    let e = omerta_it::EngineProc::start(ns, &format!("m{tag}"), &["--image-dir".into(), image.display().to_string()]);
    let (control, img) = (e.control.display().to_string(), image.display().to_string());
    let provider = ["--engine-socket", &control, "--image", &img, "--port-range", "47000-47009"];
    let (p, c, net, pid) = crate::mesh::pair_as(ns, consumer, tag, (false, nobody), &provider, &["--no-provider"]);
    let request = c.omerta(&["vm", "request", "--peer", &pid, "--cpus", "1", "--memory", "1024", "--wait"]);
    let vm = request.1.lines().find_map(|l| l.trim().strip_prefix("VM ID:")).map(|v| v.trim().to_string());
    let vm = vm.filter(|v| request.0 == 0 && !v.is_empty());
    Rented { e, p, c, net, pid, request, vm }
}

/// The SHA-256 of `file`, as `sha256sum` prints it.
fn sha256(file: &std::path::Path) -> String {
    let o = Command::new("sha256sum").arg(file).output();
    let o = o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    o.split_whitespace().next().unwrap_or_default().to_string()
}

fn the_run() -> Option<&'static Seen> {
    static RUN: std::sync::OnceLock<Option<Seen>> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let (base, _, _) = omerta_it::cloud_image()?;
        let image = base.parent().expect("image dir").to_path_buf();
        private_netns(move |ns| run(ns, &image))
    })
    .as_ref()
}

#[test]
fn a_consumer_without_root_behind_nat_rents_and_logs_in_through_a_userspace_tunnel() {
    let Some(s) = the_run() else { return };
    assert!(s.daemon_log.contains("tunnels userspace"), "the daemon says which tunnels it makes:\n{}", s.daemon_log);
    assert_eq!(s.request.0, 0, "vm request --wait as nobody: {:?}\n{}", s.request, s.daemon_log);
    assert!(s.request.1.contains(&format!("omerta ssh {}", s.vm)), "the way in is printed: {}", s.request.1);
    assert_eq!((s.id.0, s.id.1.trim()), (0, "omerta"), "omerta ssh VM -- id -un: {:?}", s.id);
    assert_eq!(s.status7, Some(7), "omerta ssh gives the remote command's exit status");
    let show = &s.show;
    assert_eq!(show["mode"], "userspace", "{show}");
    assert!(show["latestHandshake"].as_u64().unwrap_or(0) > 0, "vm show: a handshake: {show}");
    assert!(show["rxBytes"].as_u64().unwrap_or(0) > 10_000, "vm show: bytes from the VM: {show}");
    assert!(show["txBytes"].as_u64().unwrap_or(0) > 4_000_000, "vm show: bytes to it (the forwarded file): {show}");
    // The VM's WireGuard reaches us from its engine's port, one of the provider's range.
    let port = show["vmPort"].as_u64().unwrap_or(0);
    assert!((47000..=47009).contains(&port), "vm show: the provider's port for the VM: {show}");
    assert_eq!(show["endpoint"], format!("203.0.113.1:{port}").as_str(), "{show}");
    // The guest named its consumer at the alias on its link; the engine carried it both ways.
    let e = &s.engine;
    assert!(e["alias_out"].as_u64().unwrap_or(0) > 100 && e["alias_in"].as_u64().unwrap_or(0) > 100, "{e}");
    // Its endpoint was learned from its proofs, not from the request (a private address).
    assert!(s.provider_log.contains("the endpoint its proofs name"), "{}", s.provider_log);
    assert!(e["proofs_accepted"].as_u64().unwrap_or(0) >= 1, "{e}");
}

#[test]
fn a_consumer_behind_nat_keeps_its_session_when_the_nat_changes() {
    let Some(s) = the_run() else { return };
    assert_eq!(s.request.0, 0, "vm request: {:?}", s.request);
    for (kind, out) in &s.after {
        assert_eq!((out.0, out.1.trim()), (0, "omerta"), "omerta ssh VM -- id -un behind a {kind:?} NAT: {out:?}");
    }
    assert_eq!(s.after.len(), 2);
    let (code, out, err) = &s.session;
    assert!(out.contains("tick 60") && out.contains("session-done"), "the session went on: {out} {err}");
    assert_eq!(*code, 0, "{err}");
    // The VM's one endpoint is where the provider sees the consumer now, its port the
    // (translated) tunnel's; each new outside address was learned from a proof.
    let allow = s.allow.to_string();
    assert!(allow.contains(&format!("{}:", s.public_ip)) && allow.matches(':').count() >= 1, "{allow}");
    let e = &s.engine;
    assert!(e["endpoint_proved"].as_u64().unwrap_or(0) >= 3, "a move per NAT change: {e}");
    // The forged proof: refused and counted, the list was the consumer's then.
    assert_eq!(e["drops"]["proof_bad_mac"].as_u64().unwrap_or(0), 1, "{e}");
    let refused = &s.provider_status["refused"];
    assert!(refused["endpoint_update"].as_u64().unwrap_or(0) >= 1, "{}", s.provider_status);
    let forged = s.forged_allow.to_string();
    assert!(forged.contains("203.0.113.2:") && !forged.contains("203.0.113.1:"), "{forged}");
}

/// A root consumer (it could make interfaces) behind two NATs in a row rents a VM: its
/// interface could not prove its endpoint, so the daemon says so and uses a userspace tunnel.
#[derive(Debug, Default)]
struct RootSeen {
    request: Out,
    log: String,
    id: Out,
    show: Value,
}

fn root_run(ns: &omerta_it::Netns, image: &std::path::Path) -> RootSeen {
    let _slot = omerta_it::GuestSlot::take();
    let mut seen = RootSeen::default();
    let nat = NatPath::new(ns, "mr", Nat::Double);
    let Rented { e, p, c, request, vm, .. } = rent(ns, image, &nat.consumer, "root", false);
    seen.request = request;
    if let Some(vm) = vm {
        seen.id = c.omerta(&["ssh", &vm, "--", "id", "-un"]);
        seen.show = c.json(&["vm", "show", &vm]);
        let _ = c.omerta(&["vm", "release", &vm]);
    }
    seen.log = format!("consumer:\n{}\nprovider:\n{}", c.log(), p.log());
    drop(e);
    seen
}

#[test]
fn a_root_consumer_behind_two_nats_rents_through_a_userspace_tunnel() {
    let Some((base, _, _)) = omerta_it::cloud_image() else { return };
    let image = base.parent().expect("image dir").to_path_buf();
    let Some(s) = private_netns(move |ns| root_run(ns, &image)) else { return };
    assert_eq!(s.request.0, 0, "vm request --wait as root behind two NATs: {:?}\n{}", s.request, s.log);
    assert!(s.log.contains("cannot prove its endpoint from its port"), "the fallback is said:\n{}", s.log);
    assert_eq!((s.id.0, s.id.1.trim()), (0, "omerta"), "omerta ssh VM -- id -un: {:?}", s.id);
    assert_eq!(s.show["mode"], "userspace", "{}", s.show);
}

#[test]
fn vm_forward_carries_a_file_intact() {
    let Some(s) = the_run() else { return };
    assert_eq!(s.request.0, 0, "vm request: {:?}", s.request);
    let (local, remote) = &s.forward;
    assert!(local.len() == 64 && local == remote, "sha256 here {local}, in the VM {remote}");
}

#[test]
fn the_vm_cannot_open_anything_toward_a_userspace_consumer() {
    let Some(s) = the_run() else { return };
    assert_eq!(s.request.0, 0, "vm request: {:?}", s.request);
    let out = &s.escape.1;
    assert!(out.contains("TRIED"), "the VM ran its attempts: {:?}", s.escape);
    assert!(out.contains("TUNNEL-FENCED") && !out.contains("TUNNEL-OPEN"), "{out}");
    assert!(!out.contains("PING-ANSWERED"), "{out}");
    assert_eq!(s.into_consumer, 0, "a connection from the VM reached the consumer's service");
    let fenced = &s.show["fenced"];
    assert!(fenced["syn"].as_u64().unwrap_or(0) >= 1, "the VM's attempts are counted: {}", s.show);
    assert!(fenced["udp"].as_u64().unwrap_or(0) >= 3, "the VM's datagrams are counted: {}", s.show);
    assert_eq!(s.release.0, 0, "vm release: {:?}", s.release);
}
