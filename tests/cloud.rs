//! The cloud image end to end (issue 12), on software nobody in this project wrote: two Debian
//! 12 cloud VMs (systemd, cloud-init, OpenSSH, WireGuard) started by the engine with
//! `omertactl vm start --image`, a consumer on Debian's WireGuard (`wireguard-go`, or the
//! kernel's) and the OpenSSH client. Boots are minutes under TCG, so the whole run is one test
//! (`realvm::vm_iptables_survives_reboot`, the last of its stages) on two boots and a reboot:
//!
//! 1. both VMs become ready; one took its address by DHCP, one from its seed's
//!    `network-config`; SSH through the tunnel as `omerta`, the host key pinned to the
//!    fingerprint `vm show` reported (a wrong pin is refused);
//! 2. the WireGuard handshake and an encrypted transfer, seen by `wg show`; a capture on the
//!    consumer's link holds no plaintext of it;
//! 3. logged at both: a send the guest's firewall drops (its LOG line on the console), the same
//!    one as a raw frame below the firewall (the engine's blocked-traffic line);
//! 4. root in the VM flushes the firewall and sends UDP, TCP, ICMP and raw frames to the
//!    internet, the provider's LAN, the provider host and another VM: nothing reaches the sinks
//!    there, the engine counts each attempt;
//! 5. `sudo reboot`: the same QEMU process boots again, the firewall is up before the network,
//!    WireGuard is back, SSH works;
//! 6. no private key in any log, console or control reply.
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use omerta_it::{private_netns, EngineProc, ForbiddenSinks, GuestSlot, RealWgConsumer, Sink, TcpSink};
use serde_json::Value;

/// What each stage saw, checked once the namespace is gone (a failure names the stage).
fn stage(name: &str, ok: bool, detail: impl std::fmt::Display) {
    assert!(ok, "cloud end to end, {name}: {detail}");
}

/// `vm start --image` for a VM of `name` with `extra` options; the VM's JSON.
fn start(e: &EngineProc, image: &Path, key: &Path, consumer_key: &str, name: &str, extra: &[&str]) -> Value {
    let spec = format!("name={name},consumer=203.0.113.2:51820");
    let (img, k) = (image.to_string_lossy(), key.to_string_lossy());
    let mut args = vec!["--json", "vm", "start", &spec, "--image", &img, "--consumer-key", consumer_key];
    args.extend(["--ssh-key-file", &k]);
    args.extend_from_slice(extra);
    let (code, out, err) = e.ctl(&args);
    assert_eq!(code, 0, "vm start {name}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vm start printed no JSON ({e}): {out}"))
}

fn text(v: &Value, path: &[&str]) -> String {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str().unwrap_or_default().to_string()
}

fn console(show: &Value) -> String {
    std::fs::read_to_string(text(show, &["guest", "console"])).unwrap_or_default()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// A known_hosts file pinning `host` to `key` (from `vm show`), checked against the
/// fingerprint `vm show` gave: `ssh-keygen -l` must print the same.
fn pin(dir: &Path, host: &str, key: &str, fingerprint: &str) -> PathBuf {
    let path = dir.join(format!("known_hosts-{host}"));
    std::fs::write(&path, format!("{host} {key}\n")).expect("known_hosts");
    let out = Command::new("ssh-keygen").arg("-l").arg("-f").arg(&path).output().expect("ssh-keygen -l");
    let printed = String::from_utf8_lossy(&out.stdout);
    stage("host key pinning", printed.contains(fingerprint), format!("ssh-keygen -l: {printed} vs {fingerprint}"));
    path
}

pub fn end_to_end() {
    // Built (or found current) here, outside the namespace: building needs Debian's mirror.
    let Some((base, _, _)) = omerta_it::cloud_image() else { return };
    let Some((kernel, _)) = omerta_it::guest_image() else { return };
    let image = base.parent().expect("image dir").to_path_buf();
    // Our static helper from the test guest (raw frames, ICMP), copied into the VM over scp.
    let helper = kernel.parent().expect("guest dir").join("tree/bin/omerta-guest");
    let out = private_netns(move |ns| run(ns, &image, &helper));
    let Some(Some(r)) = out else { return };
    r.check();
}

/// What the run observed.
#[derive(Debug, Default)]
struct Seen {
    consumer_kind: &'static str,
    started: Vec<Value>,
    ready_s: Vec<f64>,
    static_login: String,
    wrong_pin: (i32, String),
    dhcp_login: String,
    dhcp_acks: u64,
    handshake: (u64, u64, u64),
    after_transfer: (u64, u64, u64),
    marker_received: String,
    marker_in_capture: bool,
    capture_bytes: usize,
    fw_line: Option<String>,
    raw_sent: String,
    engine_line: Option<String>,
    bypass_out: String,
    drops_before: (u64, u64),
    drops_after: (u64, u64),
    leaks: Vec<String>,
    pid_before: u64,
    pid_after: u64,
    reboot_s: f64,
    after_reboot: String,
    secrets: Vec<String>,
    haystack: String,
    engine_exit: Option<i32>,
}

const MARKER: &str = "OMERTA-PLAINTEXT-MARKER-7f3a9c";

fn run(ns: &omerta_it::Netns, image: &Path, helper: &Path) -> Option<Seen> {
    // Two cloud VMs: both guest slots while they run.
    let slots = (GuestSlot::take(), GuestSlot::take());
    let mut seen = Seen::default();
    let wg = RealWgConsumer::start(ns, "cloud", &["10.50.1.1/24", "10.50.2.1/24"])?;
    seen.consumer_kind = wg.kind;
    let e = EngineProc::start(ns, "cloud", &["--image-dir".into(), image.display().to_string()]);
    let dir = e.dir.join("consumer");
    std::fs::create_dir_all(&dir).expect("consumer dir");
    let key = dir.join("id_ed25519");
    let made =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "consumer", "-f"]).arg(&key).status();
    assert!(made.is_ok_and(|s| s.success()), "ssh-keygen");
    let pubkey = dir.join("id_ed25519.pub");

    // 1. Two VMs, one by DHCP (c1, 10.50.1.2), one by network-config (c2, 10.50.2.2).
    let t0 = Instant::now();
    let c1 = start(&e, image, &pubkey, &wg.public, "c1", &[]);
    let c2 = start(
        &e,
        image,
        &pubkey,
        &wg.public,
        "c2",
        &["--network", "static", "--tunnel", "10.50.2.2/24", "--consumer-tunnel", "10.50.2.1"],
    );
    for v in [&c1, &c2] {
        wg.add_peer(
            &text(v, &["guest", "cloud", "wireguard_public_key"]),
            &format!("{}/32", text(v, &["guest", "cloud", "tunnel"]).split('/').next().unwrap_or_default()),
        );
    }
    seen.started = vec![c1.clone(), c2.clone()];
    for name in ["c1", "c2"] {
        let v = e.wait_json(&format!("{name} ready"), &["vm", "show", name], 600, |v| {
            v["state"] == "ready" || v["state"] == "failed" || v["state"] == "exited"
        });
        assert_eq!(v["state"], "ready", "{name} never became ready: {v}\nconsole:\n{}", tail(&console(&v)));
        seen.ready_s.push(v["guest"]["ready_after_s"].as_f64().unwrap_or(0.0));
    }
    eprintln!("cloud: both VMs ready after {:.0} s ({})", t0.elapsed().as_secs_f64(), wg.kind);
    let pins: Vec<PathBuf> = [(&c1, "10.50.1.2"), (&c2, "10.50.2.2")]
        .iter()
        .map(|(v, host)| {
            pin(
                &dir,
                host,
                &text(v, &["guest", "cloud", "ssh_host_key"]),
                &text(v, &["guest", "cloud", "ssh_host_fingerprint"]),
            )
        })
        .collect();
    let ssh1 = |cmd: &str| wg.ssh(&key, &pins[0], "omerta@10.50.1.2", cmd);
    let ssh_retry = |to: &str, pin: &Path, cmd: &str| {
        // Ready means cloud-init is done; sshd may take a moment more under TCG.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let r = wg.ssh(&key, pin, to, cmd);
            if r.0 == 0 || Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    };
    let r = ssh_retry("omerta@10.50.2.2", &pins[1], "id -un; ip -4 -o addr show scope global");
    seen.static_login = format!("rc={} {}{}", r.0, r.1, r.2);
    // The wrong pin (c1's key for c2's address) is refused, not learnt.
    let wrong = dir.join("known_hosts-wrong");
    std::fs::write(&wrong, format!("10.50.2.2 {}\n", text(&c1, &["guest", "cloud", "ssh_host_key"])))
        .expect("wrong pin");
    let r = wg.ssh(&key, &wrong, "omerta@10.50.2.2", "true");
    seen.wrong_pin = (r.0, r.2);
    // c2 has served its purpose: one guest slot back for the rest of the suite.
    let _ = e.ctl(&["vm", "remove", "c2"]);
    drop(slots.1);
    let r = ssh_retry("omerta@10.50.1.2", &pins[0], "id -un; ip -4 -o addr show scope global");
    seen.dhcp_login = format!("rc={} {}{}", r.0, r.1, r.2);
    seen.dhcp_acks = e.json(&["stats", "c1"])[0]["dhcp_acks"].as_u64().unwrap_or(0);

    // 2. The handshake, and a plaintext marker sent through the tunnel to a listener of the
    // consumer's, captured on the consumer's link.
    let pub1 = text(&c1, &["guest", "cloud", "wireguard_public_key"]);
    seen.handshake = wg.peer_stats(&pub1);
    let pcap = dir.join("consumer.pcap");
    let mut dump = wg
        .cmd("tcpdump")
        .args(["-i", "vc1", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("udp")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump (make setup installs it)");
    std::thread::sleep(Duration::from_secs(2));
    let listener = wg.run(|| {
        let l = std::net::TcpListener::bind("10.50.1.1:7777").expect("consumer listener");
        std::thread::spawn(move || {
            l.set_nonblocking(false).ok();
            let mut got = String::new();
            if let Ok((mut s, _)) = l.accept() {
                s.set_read_timeout(Some(Duration::from_secs(20))).ok();
                let _ = s.read_to_string(&mut got);
            }
            got
        })
    });
    let r = ssh1(&format!("for i in $(seq 50); do echo {MARKER}-$i; done > /dev/tcp/10.50.1.1/7777; echo sent"));
    assert_eq!(r.0, 0, "the transfer through the tunnel: {}", r.2);
    seen.marker_received = listener.join().unwrap_or_default();
    std::thread::sleep(Duration::from_secs(1));
    let _ = Command::new("kill").args(["-TERM", &dump.id().to_string()]).status();
    let _ = dump.wait();
    let cap = std::fs::read(&pcap).unwrap_or_default();
    seen.capture_bytes = cap.len();
    seen.marker_in_capture = cap.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    seen.after_transfer = wg.peer_stats(&pub1);

    // 3. Logged at both: the firewall drops (and logs) a plain send; the same datagram as a
    // raw frame below the firewall reaches the engine, which drops (and logs) it.
    let copy = wg
        .cmd("timeout")
        .arg("60")
        .arg("scp")
        .args(omerta_it::ssh_options(&key, &pins[0]))
        .arg(helper)
        .arg("omerta@10.50.1.2:/tmp/omerta-guest")
        .output()
        .expect("scp");
    assert!(copy.status.success(), "scp the helper: {}", String::from_utf8_lossy(&copy.stderr));
    let nic = "OMERTA_NIC=$(ls /sys/class/net | grep -v -x -e lo -e wg0 | head -n 1)";
    let r = ssh1(&format!(
        "echo x > /dev/udp/8.8.8.8/53 || echo FW-REFUSED; sleep 1; sudo env {nic} /tmp/omerta-guest raw-udp 8.8.8.8:53 below-the-firewall"
    ));
    seen.raw_sent = format!("{}{}", r.1, r.2);
    std::thread::sleep(Duration::from_secs(2));
    let show = e.json(&["vm", "show", "c1"]);
    seen.fw_line =
        console(&show).lines().find(|l| l.contains("OMERTA-FW-DROP") && l.contains("DST=8.8.8.8")).map(str::to_string);
    let log = e.json(&["log", "c1"]).to_string();
    seen.engine_line = log.contains("8.8.8.8:53").then(|| log.chars().take(400).collect());

    // 4. Root flushes the firewall and tries everything; sinks on every destination.
    let sinks = ForbiddenSinks::start(ns);
    let more =
        [Sink::on(ns, [203, 0, 113, 1], 22), Sink::on(ns, [10, 0, 2, 16], 51820), Sink::on(ns, [192, 0, 2, 253], 22)];
    let tcp = [
        TcpSink::on(ns, [8, 8, 8, 8], 443),
        TcpSink::on(ns, [192, 168, 1, 1], 22),
        TcpSink::on(ns, [203, 0, 113, 1], 2222),
    ];
    let drops = |e: &EngineProc| {
        let s = &e.json(&["stats", "c1"])[0];
        (s["drops"]["not_allowed"].as_u64().unwrap_or(0), s["dropped"].as_u64().unwrap_or(0))
    };
    seen.drops_before = drops(&e);
    let g = "/tmp/omerta-guest";
    let script = format!(
        "iptables -P INPUT ACCEPT; iptables -P OUTPUT ACCEPT; iptables -P FORWARD ACCEPT; iptables -F; \
         ip6tables -P OUTPUT ACCEPT; ip6tables -F; iptables -S; \
         for d in 8.8.8.8:53 8.8.4.4:53 1.1.1.1:53 192.168.1.1:80 10.0.2.2:22 203.0.113.1:22 192.0.2.253:22 10.0.2.16:51820; do {g} udp-send $d leak 2; done; \
         for d in 8.8.8.8/443 192.168.1.1/22 203.0.113.1/2222; do timeout 3 bash -c \"echo leak > /dev/tcp/$d\" || echo TCP-REFUSED $d; done; \
         {g} ping 8.8.8.8 2; {g} ping 192.168.1.1 1; env {nic} {g} raw-udp 192.168.1.1:80 raw-leak; env {nic} {g} raw-udp 203.0.113.1:22 raw-host"
    );
    let r = ssh1(&format!("sudo bash -c '{script}'"));
    seen.bypass_out = format!("rc={} {}{}", r.0, r.1, r.2);
    std::thread::sleep(Duration::from_secs(2));
    seen.drops_after = drops(&e);
    let mut leaks: Vec<String> = sinks.leaks().iter().map(|(ep, n)| format!("{ep}: {n}")).collect();
    leaks.extend(
        more.into_iter().map(|s| (s.at, s.finish())).filter(|(_, n)| *n > 0).map(|(ep, n)| format!("{ep}: {n}")),
    );
    leaks.extend(tcp.iter().filter(|t| t.count() > 0).map(|t| format!("tcp {}: {}", t.at, t.count())));
    seen.leaks = leaks;

    // Before the reboot (the firewall is flushed now, the seed's files are not): the private
    // keys, to look for them everywhere afterwards.
    let r = ssh1("sudo sed -n 's/^PrivateKey = //p' /etc/wireguard/wg0.conf; sudo grep -v -e BEGIN -e END /etc/ssh/ssh_host_ed25519_key");
    seen.secrets = r.1.lines().map(str::trim).filter(|l| l.len() >= 40).map(str::to_string).collect();

    // 5. The reboot, inside the same QEMU process.
    seen.pid_before = e.json(&["vm", "show", "c1"])["guest"]["pid"].as_u64().unwrap_or(0);
    let t = Instant::now();
    let _ = ssh1("sudo systemctl reboot");
    std::thread::sleep(Duration::from_secs(15));
    let end = Instant::now() + Duration::from_secs(420);
    let mut after = (1, String::new(), String::new());
    while Instant::now() < end {
        after = wg.ssh(
            &key,
            &pins[0],
            "omerta@10.50.1.2",
            "sudo iptables -S; sudo ip6tables -S; sudo wg show wg0; sudo stat -c 'wg0.conf %a' /etc/wireguard/wg0.conf; \
             systemctl show -p ActiveEnterTimestampMonotonic --value omerta-firewall.service; \
             systemctl show -p ExecMainStartTimestampMonotonic --value systemd-networkd.service; \
             cat /proc/sys/kernel/random/boot_id; uptime -s",
        );
        if after.0 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    seen.reboot_s = t.elapsed().as_secs_f64();
    seen.after_reboot = format!("rc={} {}{}", after.0, after.1, after.2);
    let show = e.json(&["vm", "show", "c1"]);
    seen.pid_after = show["guest"]["pid"].as_u64().unwrap_or(0);
    eprintln!("cloud: SSH again {:.0} s after the reboot", seen.reboot_s);

    // 6. Everything the provider shows or logs.
    let mut hay = console(&show);
    for args in [&["vm", "show", "c1"][..], &["vm", "list"], &["log"], &["stats"], &["status"]] {
        hay.push_str(&e.json(args).to_string());
    }
    hay.push_str(&e.ctl(&["metrics"]).1);
    for v in &seen.started {
        hay.push_str(&v.to_string());
    }
    let _ = e.ctl(&["vm", "remove", "c1"]);
    let (code, log) = e.stop();
    seen.engine_exit = code;
    hay.push_str(&log);
    for f in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        // Consoles of guests already removed are gone with them; nothing else may hold a key.
        if f.file_name().to_string_lossy().contains(".console") {
            hay.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
        }
    }
    seen.haystack = hay;
    drop(slots.0);
    Some(seen)
}

impl Seen {
    fn check(&self) {
        let cloud = &self.started[0]["guest"]["cloud"];
        stage("vm start", self.started.iter().all(|v| v["state"] == "booting"), format!("{:?}", self.started));
        stage(
            "vm start reports the public keys only",
            cloud["wireguard_public_key"].as_str().is_some_and(|k| k.len() == 44)
                && cloud["ssh_host_fingerprint"].as_str().is_some_and(|f| f.starts_with("SHA256:")),
            cloud,
        );
        stage(
            "SSH to the network-config VM",
            self.static_login.starts_with("rc=0 omerta\n")
                && self.static_login.contains("inet 10.0.2.15/24")
                && !self.static_login.contains("dynamic"),
            &self.static_login,
        );
        stage(
            "a wrong host key pin is refused",
            self.wrong_pin.0 != 0 && self.wrong_pin.1.contains("Host key verification failed"),
            format!("{:?}", self.wrong_pin),
        );
        stage(
            "SSH to the DHCP VM",
            self.dhcp_login.starts_with("rc=0 omerta\n")
                && self.dhcp_login.contains("inet 10.0.2.15/24")
                && self.dhcp_login.contains("dynamic"),
            &self.dhcp_login,
        );
        stage("its address came from the engine's DHCP", self.dhcp_acks >= 1, self.dhcp_acks);
        stage(
            "the WireGuard handshake (wg show)",
            self.handshake.0 > 0 && self.handshake.1 > 0,
            format!("{:?}", self.handshake),
        );
        stage(
            "the transfer reached the consumer",
            self.marker_received.contains(&format!("{MARKER}-50")),
            &self.marker_received,
        );
        stage(
            "and went encrypted",
            self.after_transfer.1 > self.handshake.1 + 1000 && self.capture_bytes > 2000 && !self.marker_in_capture,
            format!(
                "{:?} -> {:?}, capture {} bytes, marker seen {}",
                self.handshake, self.after_transfer, self.capture_bytes, self.marker_in_capture
            ),
        );
        stage(
            "the guest firewall refused the plain send",
            self.raw_sent.contains("FW-REFUSED") && self.raw_sent.contains("RAW-SENT"),
            &self.raw_sent,
        );
        let fw = self.fw_line.clone().unwrap_or_default();
        stage("logged by the guest firewall", fw.contains("PROTO=UDP") && fw.contains("DPT=53"), &fw);
        stage(
            "logged by the engine",
            self.engine_line.as_ref().is_some_and(|l| l.contains("not_allowed")),
            format!("{:?}", self.engine_line),
        );
        stage("root flushed the firewall", self.bypass_out.contains("-P OUTPUT ACCEPT"), &self.bypass_out);
        stage("nothing reached a sink", self.leaks.is_empty(), format!("{:?}\n{}", self.leaks, self.bypass_out));
        // 8 destinations x 2 datagrams (another VM's never get past ARP), 3 TCP connections
        // (each SYN and its retries), 3 pings, 2 raw frames.
        let (na, all) = (self.drops_after.0 - self.drops_before.0, self.drops_after.1 - self.drops_before.1);
        stage(
            "the engine counted each attempt",
            na >= 14 && all >= 20,
            format!("not_allowed +{na}, dropped +{all}\n{}", self.bypass_out),
        );
        stage(
            "the same QEMU process rebooted",
            self.pid_before != 0 && self.pid_before == self.pid_after,
            format!("{} -> {}", self.pid_before, self.pid_after),
        );
        let a = &self.after_reboot;
        stage("SSH after the reboot", a.starts_with("rc=0"), a);
        stage(
            "the firewall is back (IPv4 and IPv6)",
            a.matches("-P INPUT DROP").count() == 2
                && a.matches("-P OUTPUT DROP").count() == 2
                && a.contains("-P FORWARD DROP"),
            a,
        );
        stage("WireGuard is back", a.contains("interface: wg0") && a.contains("wg0.conf 600"), a);
        let nums: Vec<u64> = a.lines().filter_map(|l| l.trim().parse().ok()).collect();
        stage(
            "the firewall came up before the network",
            nums.len() >= 2 && nums[0] > 0 && nums[0] < nums[1],
            format!("{nums:?}\n{a}"),
        );
        stage("the private keys were found in the VM", self.secrets.len() >= 2, self.secrets.len());
        for s in &self.secrets {
            stage(
                "no private key in any log, console or control reply",
                !self.haystack.contains(s.as_str()),
                "a private key line leaked",
            );
        }
        stage("the engine stopped cleanly", self.engine_exit == Some(0), format!("{:?}", self.engine_exit));
        eprintln!(
            "cloud: ready after {:?} s, reboot to SSH {:.0} s, consumer {}",
            self.ready_s, self.reboot_s, self.consumer_kind
        );
    }
}
