//! Provider-side security as a local attacker would probe it: what the engine creates, replaces
//! or follows on the provider's file system. Every case runs inside a private network
//! namespace like the rest of the suite.
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use omerta_it::{sealed, workspace_bin, EngineProc};

/// A file that must come out of the test unchanged.
fn precious(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"precious contents").unwrap();
    p
}

fn unchanged(p: &std::path::Path) {
    assert_eq!(std::fs::read(p).unwrap(), b"precious contents", "{} was changed", p.display());
}

#[test]
fn a_handle_path_that_is_not_a_socket_is_never_removed() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "paths", &[]);
        let file = precious(&e.dir, "not-a-socket");
        let target = precious(&e.dir, "target");
        let link = e.dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for (kind, path) in [("dgram", &file), ("stream", &file), ("dgram", &link), ("stream", &link)] {
            let spec = format!("name=p,handle={kind}:{},consumer=203.0.113.7:51820", path.display());
            let (code, _, err) = e.ctl(&["vm", "add", &spec]);
            assert_ne!(code, 0, "{kind}:{} was accepted", path.display());
            assert!(err.contains("is not a socket"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        unchanged(&file);
        unchanged(&target);
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink is still there");
    });
}

#[test]
fn handle_sockets_are_the_engines_own() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "modes", &[]);
        for kind in ["dgram", "stream"] {
            let path = e.dir.join(format!("{kind}.sock"));
            let spec = format!("name={kind},handle={kind}:{},consumer=203.0.113.7:51820", path.display());
            let (code, _, err) = e.ctl(&["vm", "add", &spec]);
            assert_eq!(code, 0, "{err}");
            let m = std::fs::symlink_metadata(&path).unwrap();
            assert!(m.file_type().is_socket());
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{kind} handle socket is for the engine's user only");
        }
    });
}

#[test]
fn the_control_socket_never_replaces_a_file() {
    sealed(|ns| {
        let dir = std::env::temp_dir().join(format!("omerta-ctlfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = precious(&dir, "engine.sock");
        let mut child = Command::new(omerta_it::engine_bin(ns))
            .arg("--control")
            .arg(&file)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: an engine that took the path would serve forever; ended by its pid.
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let refused = child.try_wait().unwrap().is_some_and(|s| !s.success());
        if !refused {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(refused, "the engine started on a regular file: {err}");
        assert!(err.contains("is not a socket"), "{err}");
        unchanged(&file);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_capture_never_writes_through_a_symlink_or_over_a_file() {
    sealed(|ns| {
        let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
        sys::set_inheritable(std::os::fd::AsFd::as_fd(&theirs)).unwrap();
        let spec = format!("name=t,handle=fd:{},consumer=203.0.113.7:51820", std::os::fd::AsRawFd::as_raw_fd(&theirs));
        let e = EngineProc::start(ns, "capture", &["--vm".to_string(), spec]);
        drop((ours, theirs));
        let target = precious(&e.dir, "root-only");
        let link = e.dir.join("dropped.pcap");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let existing = precious(&e.dir, "existing.pcap");
        for out in [&link, &existing] {
            let (code, _, err) =
                e.ctl(&["capture", "t", "--dropped", out.to_str().unwrap(), "--count", "1", "--timeout", "1"]);
            assert_eq!(code, 1, "{err}");
            assert!(err.contains("exists"), "{err}");
        }
        unchanged(&target);
        unchanged(&existing);
        // A new name works, and the file is the client's alone.
        let fresh = e.dir.join("fresh.pcap");
        let (code, _, err) =
            e.ctl(&["capture", "t", "--dropped", fresh.to_str().unwrap(), "--count", "1", "--timeout", "1"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        std::thread::sleep(Duration::from_millis(10));
    });
}

#[test]
fn failing_vm_starts_leave_no_descriptor_behind() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "fdleak", &[]);
        let (k, i) = (precious(&e.dir, "kernel"), precious(&e.dir, "initrd"));
        assert_eq!(e.add_vm("x", "consumer=203.0.113.7:51820").0, 0);
        let fds = || std::fs::read_dir(format!("/proc/{}/fd", e.pid())).unwrap().count();
        let before = fds();
        // Bounded: 100 refusals, half at validation, half because the name is taken.
        for n in 0..100 {
            let spec = if n % 2 == 0 { "name=y,consumer=nope" } else { "name=x,consumer=203.0.113.7:51820" };
            let (code, _, err) =
                e.ctl(&["vm", "start", spec, "--kernel", k.to_str().unwrap(), "--initrd", i.to_str().unwrap()]);
            assert_ne!(code, 0, "{spec} was accepted");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let after = fds();
        assert!(after <= before + 2, "descriptors {before} -> {after} after 100 refused starts");
    });
}

#[test]
fn host_side_noise_does_not_silence_the_guests_own_violations() {
    sealed(|ns| {
        use std::os::fd::{AsFd, AsRawFd};
        let c = omerta_it::Consumer::new(ns);
        let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
        sys::set_inheritable(theirs.as_fd()).unwrap();
        let spec = format!("name=t,handle=fd:{},consumer={}", theirs.as_raw_fd(), c.endpoint());
        let e = EngineProc::start(ns, "noise", &["--vm".to_string(), spec]);
        drop(theirs);
        let vm = omerta_it::SyntheticVm {
            end: omerta_it::VmEnd::Dgram(std::os::unix::net::UnixDatagram::from(ours)),
            id: engine::VmIdentity::default(),
        };
        vm.send(&vm.udp(c.endpoint(), b"open the flow"));
        let (_, engine_port) = c.recv(Duration::from_secs(3)).expect("the flow is open");
        // A stranger floods the VM's host port (bounded: 2 x 2000 datagrams), before and
        // after one violation of the guest's own.
        let stranger = omerta_it::Consumer::new(ns);
        let noise = || {
            for _ in 0..2000 {
                let _ = stranger.sock.send_to(b"noise", engine_port);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        noise();
        vm.send(&vm.udp(omerta_it::ep([8, 8, 8, 8], 53), b"the guest's own"));
        std::thread::sleep(Duration::from_millis(200));
        noise();
        let log = e.wait_json("the log", &["log", "t"], 5, |v| v.as_array().is_some_and(|a| !a.is_empty()));
        let ours: Vec<&serde_json::Value> = log
            .as_array()
            .unwrap()
            .iter()
            .filter(|ev| ev["direction"] == "from_vm" && ev["headers"].as_str().unwrap_or("").contains("8.8.8.8"))
            .collect();
        assert_eq!(ours.len(), 1, "the guest's violation is still in the recent log: {log}");
        let (_, stderr) = e.stop();
        assert!(
            stderr.lines().any(|l| l.contains("dropped") && l.contains("8.8.8.8") && !l.contains("inbound")),
            "the guest's violation was logged despite the noise:\n{stderr}"
        );
    });
}

#[test]
fn clients_trickling_bytes_cannot_lock_the_control_socket() {
    sealed(|ns| {
        use std::io::Write;
        let e = EngineProc::start(ns, "trickle", &[]);
        // Every handler slot taken by a client that sends a byte every 300 ms and never ends
        // its line (bounded: 16 clients, 20 bytes each, 6 s at most).
        let tricklers: Vec<_> = (0..16)
            .map(|_| {
                let path = e.control.clone();
                std::thread::spawn(move || {
                    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else { return 0 };
                    let mut sent = 0;
                    for _ in 0..20 {
                        if s.write_all(b"s").is_err() {
                            break;
                        }
                        sent += 1;
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    sent
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // Someone else still gets an answer within a few seconds (retrying while busy).
        let start = std::time::Instant::now();
        let mut answered = false;
        while start.elapsed() < Duration::from_secs(5) {
            if e.ctl(&["status"]).0 == 0 {
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let waited = start.elapsed();
        let sent: Vec<i32> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(answered, "locked out for {waited:?} by clients trickling bytes");
        // Each trickler was cut off at its request's deadline, long before its 20 bytes.
        assert!(sent.iter().all(|n| *n < 20), "a trickler kept its connection: {sent:?}");
    });
}

#[test]
fn a_configured_handles_missing_directory_is_made_for_the_engines_user() {
    sealed(|ns| {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        // The engine drops root before its VMs start; their handle sockets are made by its
        // user, in a directory it makes for that user when none exists yet (/run/omerta/vms).
        let top = std::env::temp_dir().join(format!("omerta-hdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let sock = top.join("vms/a.sock");
        let spec = format!("name=a,handle=dgram:{},consumer=198.51.100.7:51820", sock.display());
        let e = EngineProc::start(ns, "hdir", &["--vm".to_string(), spec]);
        e.wait_json("running", &["vm", "show", "a"], 10, |v| v["state"] == "running");
        let m = std::fs::metadata(top.join("vms")).unwrap();
        if let Some(u) = omerta_it::engine_user() {
            assert_eq!((m.uid(), m.mode() & 0o777), (u.uid, 0o700), "the directory is the engine user's");
        }
        assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket(), "the VM's handle is there");
        drop(e);
        let _ = std::fs::remove_dir_all(&top);
    });
}

#[test]
fn a_second_writer_on_a_dgram_handle_can_neither_inject_nor_take_the_replies() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "takeover", &[]);
        let consumer = omerta_it::Sink::consumer_at(ns, [198, 51, 100, 7], 51820);
        let id = engine::VmIdentity::default();
        let udp = |text: &[u8]| engine::testkit::FrameSpec::udp(&id, consumer.at, text).build();
        let arp = engine::testkit::arp_request(&id, id.gateway_ip);
        let quiet = Duration::from_millis(300);
        // Learnt: the first sender is the VM.
        let path = e.dir.join("vm.sock");
        let spec = format!("name=m,handle=dgram:{},consumer={}", path.display(), consumer.at);
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0);
        e.wait_json("running", &["vm", "show", "m"], 10, |v| v["state"] == "running");
        let vmm = omerta_it::bind_vmm_socket(&e.dir.join("vmm.sock"));
        let intruder = omerta_it::bind_vmm_socket(&e.dir.join("intruder.sock"));
        for s in [&vmm, &intruder] {
            s.set_read_timeout(Some(quiet)).unwrap();
        }
        vmm.send_to(&udp(b"from the VM"), &path).unwrap();
        assert_eq!(consumer.wait_for(1, Duration::from_secs(3)), 1);
        // Another local process writes to the handle: as the VM, and asking for an answer.
        let _ = intruder.send_to(&udp(b"injected"), &path);
        let _ = intruder.send_to(&arp, &path);
        std::thread::sleep(quiet);
        assert_eq!(consumer.count(), 1, "the intruder's datagram was forwarded");
        let mut buf = [0u8; 2048];
        assert!(intruder.recv(&mut buf).is_err(), "the intruder got an answer");
        // The VM still gets its own.
        vmm.send_to(&arp, &path).unwrap();
        assert_eq!(vmm.recv(&mut buf).unwrap(), 42, "the VM's ARP is answered, to the VM");

        // Named with peer=, before the VMM exists: a frame from anyone else is dropped, counted.
        let path2 = e.dir.join("vm2.sock");
        let vmm2_path = e.dir.join("vmm2.sock");
        let spec =
            format!("name=n,handle=dgram:{},peer={},consumer={}", path2.display(), vmm2_path.display(), consumer.at);
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0);
        e.wait_json("running", &["vm", "show", "n"], 10, |v| v["state"] == "running");
        intruder.send_to(&udp(b"first, but not the VM"), &path2).unwrap();
        e.wait_json("the foreign frame counted", &["stats", "n"], 5, |s| s[0]["drops"]["foreign_sender"] == 1);
        let vmm2 = omerta_it::bind_vmm_socket(&vmm2_path);
        vmm2.send_to(&udp(b"the VM"), &path2).unwrap();
        assert_eq!(consumer.wait_for(2, Duration::from_secs(3)), 2, "the named VM's datagram is forwarded");
        std::thread::sleep(quiet);
        assert_eq!(consumer.count(), 2);
    });
}

#[test]
fn the_allowlist_refuses_the_providers_neighbourhood() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "policy", &[]);
        let add = |name: &str, extra: &str| {
            let (code, _, err) = e.add_vm(name, &format!("consumer=203.0.113.7:51820{extra}"));
            assert_eq!(code, 0, "{err}");
        };
        add("m", "");
        let refused = [
            ("127.0.0.1:53", "loopback"),
            ("0.0.0.0:53", "unspecified"),
            ("0.1.2.3:53", "0.0.0.0/8"),
            ("240.0.0.1:53", "240.0.0.0/4"),
            ("255.255.255.255:53", "broadcast"),
            ("224.0.0.1:53", "multicast"),
            ("169.254.169.254:80", "link-local"),
            ("192.168.1.1:80", "RFC 1918"),
            ("10.1.2.3:80", "RFC 1918"),
            ("172.16.0.1:80", "RFC 1918"),
            ("100.64.0.1:80", "CGNAT"),
            ("10.0.2.2:53", "own subnet"),
            ("10.0.2.77:53", "own subnet"),
        ];
        for (ep, rule) in refused {
            let (code, _, err) = e.ctl(&["allow", "add", "m", ep]);
            assert_eq!(code, 4, "{ep} was accepted: {err}");
            assert!(err.contains(rule) && err.lines().count() == 1, "{ep}: the refusal names its rule: {err}");
        }
        let list = e.json(&["allow", "list", "m"]);
        assert_eq!(list["allow"], serde_json::json!(["203.0.113.7:51820"]), "nothing was added");
        // A LAN deployment opts in to private addresses, and only to those.
        add("lan", ",allow-private=yes");
        assert_eq!(e.ctl(&["allow", "add", "lan", "192.168.7.7:80"]).0, 0);
        assert_eq!(e.ctl(&["allow", "add", "lan", "100.64.0.1:80"]).0, 0);
        // Not the VM's own network, not a special address, not one of this host's (the
        // forbidden sink 192.168.1.1 sits on this namespace's `lo`).
        for ep in ["10.0.2.2:53", "10.0.2.77:53", "127.0.0.1:53", "169.254.169.254:80", "192.168.1.1:80"] {
            assert_eq!(e.ctl(&["allow", "add", "lan", ep]).0, 4, "{ep} is refused even with allow-private=yes");
        }
        // The same rules hold for a description's consumers.
        let (code, _, err) = e.add_vm("bad", "consumer=192.168.1.1:80");
        assert_ne!(code, 0);
        assert!(err.contains("allow-private=yes"), "{err}");
    });
}

#[test]
fn a_stream_handle_takes_one_connection_from_the_uid_it_names() {
    sealed(|ns| {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let e = EngineProc::start(ns, "peeruid", &[]);
        let me = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        let arp = {
            let id = engine::VmIdentity::default();
            let f = engine::testkit::arp_request(&id, id.gateway_ip);
            let mut framed = u32::try_from(f.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&f);
            framed
        };
        let answered = |s: &mut UnixStream| {
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let _ = s.write_all(&arp);
            let mut len = [0u8; 4];
            s.read_exact(&mut len).is_ok()
        };
        // A handle for another uid: our connection is closed at once and counted.
        let other = e.dir.join("other.sock");
        let spec = format!("name=o,handle=stream:{},peer-uid={},consumer=203.0.113.7:51820", other.display(), me + 1);
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0);
        let mut s = UnixStream::connect(&other).unwrap();
        assert!(!answered(&mut s), "a connection from the wrong uid was served");
        e.wait_json("the refusal counted", &["stats", "o"], 5, |s| s[0]["drops"]["foreign_sender"] == 1);
        // A handle for our uid: served; and once connected, nobody else can connect.
        let mine = e.dir.join("mine.sock");
        let spec = format!("name=m,handle=stream:{},peer-uid={me},consumer=203.0.113.7:51820", mine.display());
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0);
        let mut s = UnixStream::connect(&mine).unwrap();
        assert!(answered(&mut s), "the VM's own connection is served");
        assert!(UnixStream::connect(&mine).is_err(), "a second connection to a connected stream handle");
        // peer-uid= goes only with a stream path.
        let (code, _, err) = e.add_vm("x", "peer-uid=0,consumer=203.0.113.7:51820");
        assert_ne!(code, 0);
        assert!(err.contains("only with handle=stream"), "{err}");
    });
}

#[test]
fn the_hosts_own_addresses_are_never_consumers() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "hostaddr", &[]);
        assert_eq!(e.add_vm("m", "consumer=198.51.100.7:51820").0, 0);
        // The namespace's own address (its end of the consumers' link) is this host's.
        let (code, _, err) = e.ctl(&["allow", "add", "m", "192.0.2.253:53"]);
        assert_eq!(code, 4, "{err}");
        assert!(err.contains("address of this host"), "{err}");
        // An endpoint that becomes a host address later leaves every list that names it.
        assert_eq!(e.ctl(&["allow", "add", "m", "198.51.100.9:53"]).0, 0);
        omerta_it::add_local_address(ns, [198, 51, 100, 9]);
        let list = e.wait_json("the endpoint removed", &["allow", "list", "m"], 10, |v| {
            v["allow"].as_array().is_some_and(|a| !a.iter().any(|x| x == "198.51.100.9:53"))
        });
        assert_eq!(list["allow"], serde_json::json!(["198.51.100.7:51820"]));
        // A lab may, explicitly.
        assert_eq!(e.add_vm("lab", "consumer=192.0.2.253:53,allow-special=yes").0, 0);
    });
}

#[test]
fn a_control_group_member_cannot_make_the_engine_read_a_file_it_could_not() {
    sealed(|ns| {
        use std::os::unix::fs::PermissionsExt as _;
        // An engine whose control socket the group 65534 (nogroup) may use, each VMM as a uid
        // of its own; a client running as uid 1234 in that group (setpriv) asks for a guest
        // whose kernel and initrd only the engine's user may read.
        let args = ["--control-gid", "65534", "--vmm-uid-base", "40000"].map(String::from);
        let e = EngineProc::start(ns, "readas", &args);
        let engine = omerta_it::engine_user().map_or(0, |u| u.uid);
        let secret = precious(&e.dir, "engine-only");
        std::os::unix::fs::chown(&secret, Some(engine), Some(0)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let as_member = |args: &[&str]| {
            let out = Command::new("setpriv")
                .args(["--reuid=1234", "--regid=65534", "--clear-groups"])
                .arg(workspace_bin("omertactl"))
                .arg("--socket")
                .arg(&e.control)
                .args(args)
                .output()
                .expect("setpriv (util-linux)");
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let s = secret.to_str().unwrap();
        let (code, err) =
            as_member(&["vm", "start", "name=x,consumer=198.51.100.7:51820", "--kernel", s, "--initrd", s]);
        assert_eq!(code, Some(4), "{err}");
        assert!(err.contains("not readable by uid 1234"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // The same client may use the control socket otherwise (it is not refused as a peer).
        assert_eq!(as_member(&["status"]).0, Some(0));
        // Root may read it, but the VMM runs as a uid of its own and would open it again as
        // that uid: the engine says so before starting anything.
        let (code, _, err) =
            e.ctl(&["vm", "start", "name=y,consumer=198.51.100.7:51820", "--kernel", s, "--initrd", s]);
        assert_eq!(code, 4, "{err}");
        assert!(err.contains("not readable by the VMM's user uid 40000"), "{err}");
        // A file only root may read the engine cannot open at all, whoever asks: it runs as its
        // own user.
        let root_only = precious(&e.dir, "root-only");
        std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = root_only.to_str().unwrap();
        let (code, _, err) =
            e.ctl(&["vm", "start", "name=z,consumer=198.51.100.7:51820", "--kernel", r, "--initrd", r]);
        assert_eq!(code, 4, "{err}");
        if engine != 0 {
            assert!(err.contains("Permission denied"), "{err}");
        }
        unchanged(&secret);
        unchanged(&root_only);
    });
}

#[test]
fn each_vm_gets_its_own_echo_replies_only() {
    // Both ICMP paths: ping sockets (which the engine enables for its own group in its
    // namespace, where new namespaces have them off), and a raw socket, which sees every echo
    // reply on the host.
    for icmp in ["auto", "raw"] {
        sealed(move |ns| {
            use std::os::fd::{AsFd, AsRawFd};
            let target: std::net::Ipv4Addr = "198.51.100.20".parse().unwrap();
            // The consumers' namespace answers echo requests to any of its addresses.
            let _consumer = omerta_it::Consumer::new(ns);
            let mut keep = Vec::new();
            let mut args = Vec::new();
            let mut vms = Vec::new();
            for name in ["a", "b"] {
                let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
                sys::set_inheritable(theirs.as_fd()).unwrap();
                args.push("--vm".to_string());
                args.push(format!("name={name},handle=fd:{},consumer={target}:51820", theirs.as_raw_fd()));
                keep.push(theirs);
                vms.push(omerta_it::SyntheticVm {
                    end: omerta_it::VmEnd::Dgram(std::os::unix::net::UnixDatagram::from(ours)),
                    id: engine::VmIdentity::default(),
                });
            }
            // Raw ICMP sockets need CAP_NET_RAW, which an engine that dropped root has not.
            // The kernel fence holds the engine's own user, which --runas self makes root: it
            // cannot be told apart from the test's own root processes, so it is off here.
            if icmp == "raw" {
                args.extend(["--runas", "self", "--kernel-fence=off"].map(String::from));
            }
            let e = EngineProc::start_env(ns, &format!("icmp-{icmp}"), &args, &[("OMERTA_ICMP", icmp)]);
            drop(keep);
            let (a, b) = (&vms[0], &vms[1]);
            let is_reply = |f: &[u8]| f.len() > 34 && f[23] == 1 && f[34] == 0;
            // Both VMs have pinged once (so both have an ICMP flow to the target) ...
            for (vm, ident) in [(a, 0x1111u16), (b, 0x2222u16)] {
                vm.send(&engine::testkit::FrameSpec::icmp_echo(&vm.id, target, ident, 1, b"first").build());
                assert!(vm.recv_matching(Duration::from_secs(3), is_reply).is_some(), "a VM's own reply ({icmp})");
            }
            // The host gains an address: within the engine's 2 s check every VM's sockets are
            // connected (ICMP ones replaced) again, and echo still works afterwards.
            omerta_it::add_local_address(ns, [198, 18, 0, 77]);
            std::thread::sleep(Duration::from_millis(2500));
            // ... then only A pings: B must see none of A's replies.
            for seq in 2..12 {
                a.send(&engine::testkit::FrameSpec::icmp_echo(&a.id, target, 0x1111, seq, b"a's").build());
            }
            let mut got_a = 0;
            while a.recv_matching(Duration::from_millis(500), is_reply).is_some() {
                got_a += 1;
            }
            assert_eq!(got_a, 10, "A gets each of its replies once ({icmp})");
            assert!(
                b.recv_matching(Duration::from_millis(500), is_reply).is_none(),
                "B received a reply to A's request ({icmp})"
            );
            let _ = e.stop();
        });
    }
}

#[test]
fn vm_start_takes_guests_from_image_directories_only() {
    sealed(|ns| {
        // The harness gives every engine two image directories: the test image's and its own
        // scratch directory. A kernel anywhere else is refused, symlink or not.
        let e = EngineProc::start(ns, "imgdir", &[]);
        let outside = std::env::temp_dir().join(format!("omerta-outside-{}", std::process::id()));
        std::fs::write(&outside, b"not a kernel").unwrap();
        let link = e.dir.join("sneaky");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        // A relative name is looked up in the first image directory; climbing out of it fails.
        for k in [outside.to_str().unwrap(), link.to_str().unwrap(), "../../../../../../../../../../etc/passwd"] {
            let (code, _, err) =
                e.ctl(&["vm", "start", "name=x,consumer=198.51.100.7:51820", "--kernel", k, "--initrd", k]);
            assert_eq!(code, 4, "{k}: {err}");
            assert!(err.contains("not in an image directory"), "{k}: {err}");
        }
        let _ = std::fs::remove_file(&outside);
    });
}

#[test]
fn the_engine_and_everything_it_runs_cannot_gain_privileges() {
    // On both backends.
    for backend in ["uring", "portable"] {
        sealed(move |ns| {
            // An engine started as root runs as its own user: every thread of it (data plane,
            // control, control socket, signals) has a uid that is not 0, no capability (and an
            // empty bounding set: nothing it could execute would hold one), no-new-privs and a
            // seccomp filter, after forwarding in both directions. Its launcher, the one process
            // that keeps root for VMMs and namespaces, holds only what that work takes.
            let consumer = omerta_it::Consumer::new(ns);
            let env = [("OMERTA_BACKEND", backend)];
            let (e, vm, theirs) =
                EngineProc::with_fd_vm(ns, &format!("privs-{backend}"), consumer.endpoint(), "", &env);
            drop(theirs);
            // The worker forwards both ways under its filter (an allowlist change included).
            assert_eq!(e.ctl(&["allow", "add", "t", "198.51.100.99:9"]).0, 0);
            vm.send(&engine::testkit::FrameSpec::udp(&vm.id, consumer.endpoint(), b"out").build());
            let (_, engine_at) = consumer.recv(Duration::from_secs(3)).expect("the VM's datagram reaches the consumer");
            consumer.sock.send_to(b"back", engine_at).unwrap();
            assert!(
                vm.recv_matching(Duration::from_secs(3), |f| f.ends_with(b"back")).is_some(),
                "and back ({backend})"
            );
            let field = omerta_it::status_field;
            let root = sys::effective_ids().0 == 0;
            let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", e.pid())).unwrap().flatten().collect();
            let (mut checked, mut workers, mut sockets) = (0, 0, 0);
            for t in tasks {
                // A short-lived thread (a control connection's handler) may be gone already.
                let Ok(status) = std::fs::read_to_string(t.path().join("status")) else { continue };
                checked += 1;
                let name = field(&status, "Name:");
                assert_eq!(field(&status, "NoNewPrivs:"), "1", "thread {name}");
                assert_eq!(field(&status, "Seccomp:"), "2", "thread {name} runs under a seccomp filter ({backend})");
                assert_eq!(field(&status, "CapEff:"), "0000000000000000", "thread {name} holds no capability");
                assert_eq!(field(&status, "CapPrm:"), "0000000000000000", "thread {name} cannot regain one");
                if root {
                    let uids: Vec<String> = field(&status, "Uid:").split_whitespace().map(String::from).collect();
                    assert!(uids.len() == 4 && uids.iter().all(|u| u != "0"), "thread {name} runs as {uids:?}");
                    assert_eq!(field(&status, "CapBnd:"), "0000000000000000", "thread {name} could hand one out");
                    assert_eq!(field(&status, "Groups:"), "", "thread {name} keeps supplementary groups");
                }
                if name == "omerta-control" || name == "omerta-ctl-conn" {
                    sockets += 1;
                } else if name.starts_with("omerta-vm-") {
                    workers += 1;
                }
            }
            assert!(checked >= 3, "the engine's main, control and VM threads at least: {checked}");
            assert_eq!(workers, 1, "one worker thread ({backend})");
            assert!(sockets >= 1, "the control socket's accept thread was checked");
            if root {
                // The launcher: the engine's child, still root, with only what VMMs and direct
                // mode's namespaces take, and never what no program of it needs.
                let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", e.pid())).unwrap();
                let launcher: Vec<&str> = kids.split_whitespace().collect();
                assert_eq!(launcher.len(), 1, "one launcher: {kids}");
                let status = std::fs::read_to_string(format!("/proc/{}/status", launcher[0])).unwrap();
                assert_eq!(field(&status, "NoNewPrivs:"), "1", "the launcher");
                let eff = u64::from_str_radix(&field(&status, "CapEff:"), 16).unwrap();
                assert_eq!(eff & !u64::from(control::launcher::LAUNCHER_CAPS), 0, "the launcher holds {eff:x}");
                let bnd = u64::from_str_radix(&field(&status, "CapBnd:"), 16).unwrap();
                for (cap, what) in [(1, "DAC_OVERRIDE"), (16, "SYS_MODULE"), (17, "SYS_RAWIO"), (39, "BPF")] {
                    assert_eq!((eff | bnd) & (1 << cap), 0, "the launcher may still use or hand out CAP_{what}");
                }
                // It holds nothing the engine had open (the VM's handle above all): stdin,
                // stdout, stderr and its socket to the engine.
                let fds = std::fs::read_dir(format!("/proc/{}/fd", launcher[0])).unwrap().count();
                assert_eq!(fds, 4, "the launcher holds {fds} descriptors");
            }
            // The worker ends under its filter too (its heap trimmed, its sockets closed).
            let (code, err) = e.stop();
            assert_eq!(code, Some(0), "a clean stop ({backend}): {err}");
        });
    }
}

/// The IPv4 sockets of process `pid` in `/proc/PID/net/{table}` (`udp`, `icmp`, `raw`): each
/// as (local, remote) address.
/// The socket inodes in thread `tid`'s descriptor table of process `pid`.
fn socket_inodes(pid: u32, tid: &str) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/task/{tid}/fd"))
        .map(|d| d.flatten().filter_map(|f| std::fs::read_link(f.path()).ok()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect()
}

/// The threads of `pid`: (tid, name).
fn threads_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|t| t.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|tid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            (tid, name.trim().to_string())
        })
        .collect()
}

fn sockets_of(pid: u32, table: &str) -> Vec<(std::net::SocketAddrV4, std::net::SocketAddrV4)> {
    // Every thread's table: each worker has one of its own.
    let inodes: Vec<String> = threads_of(pid).iter().flat_map(|(tid, _)| socket_inodes(pid, tid)).collect();
    let addr = |s: &str| -> Option<std::net::SocketAddrV4> {
        let (ip, port) = s.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        Some(std::net::SocketAddrV4::new(ip.to_le_bytes().into(), u16::from_str_radix(port, 16).ok()?))
    };
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.get(9)?;
            inodes.iter().any(|i| i == inode).then(|| Some((addr(f.get(1)?)?, addr(f.get(2)?)?)))?
        })
        .collect()
}

#[test]
fn a_vm_has_one_udp_socket_and_icmp_sockets_connected_to_its_allowed_addresses() {
    // A VM's host side, as /proc lists it while its list changes: one UDP socket on its port,
    // never connected (every datagram names its destination, which the translation found on
    // the list), and one ICMP socket per allowed address, connected to it.
    sealed(|ns| {
        let e = EngineProc::start(ns, "egress", &[]);
        assert_eq!(e.add_vm("t", "consumer=198.51.100.20:51820").0, 0);
        let pid = e.pid();
        let unconnected: std::net::SocketAddrV4 = "0.0.0.0:0".parse().unwrap();
        let wait_for = |icmp: &[&str]| {
            let mut want_icmp: Vec<std::net::Ipv4Addr> = icmp.iter().map(|a| a.parse().unwrap()).collect();
            want_icmp.sort();
            let mut last = (Vec::new(), Vec::new());
            for _ in 0..100 {
                let socks = sockets_of(pid, "udp");
                let mut pings: Vec<_> = sockets_of(pid, "icmp").iter().map(|s| *s.1.ip()).collect();
                pings.sort();
                if socks.len() == 1 && socks[0].1 == unconnected && pings == want_icmp {
                    return;
                }
                last = (socks, pings);
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("the engine's sockets are {last:?}; wanted one unconnected UDP socket, ICMP peers {want_icmp:?}");
        };
        wait_for(&["198.51.100.20"]);
        assert_eq!(e.ctl(&["allow", "add", "t", "198.51.100.21:443"]).0, 0);
        wait_for(&["198.51.100.20", "198.51.100.21"]);
        assert_eq!(e.ctl(&["allow", "remove", "t", "198.51.100.20:51820"]).0, 0);
        wait_for(&["198.51.100.21"]);
        assert_eq!(e.ctl(&["allow", "set", "t"]).0, 0);
        wait_for(&[]);
        let _ = e.stop();
    });
}

/// Issue 24, review: a worker (it parses guest frames) shared the process's descriptor table,
/// so code running in it could pass the launcher's socket to itself through a socket of its
/// own (`SCM_RIGHTS`, which no filter sees) and change the kernel fence. Each worker now has a
/// table of its own: /proc shows, for worker a, none of the sockets the rest of the engine
/// holds (the launcher's, the control socket) nor any of worker b's.
#[test]
fn a_worker_holds_no_descriptor_but_its_own() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "fdtable", &[]);
        let pid = e.pid();
        // The engine's own sockets (the launcher's, the control socket), before any VM.
        let engine = socket_inodes(pid, &pid.to_string());
        assert!(!engine.is_empty(), "the engine holds sockets of its own");
        assert_eq!(e.add_vm("a", "consumer=198.51.100.20:51820").0, 0);
        assert_eq!(e.add_vm("b", "consumer=198.51.100.21:51820").0, 0);
        let threads = threads_of(pid);
        let find = |name: &str| threads.iter().find(|t| t.1 == name).map(|t| t.0.clone());
        let (a, b) = (find("omerta-vm-a").expect("worker a"), find("omerta-vm-b").expect("worker b"));
        let (sa, sb) = (socket_inodes(pid, &a), socket_inodes(pid, &b));
        assert!(!sa.is_empty() && !sb.is_empty(), "{sa:?} {sb:?}");
        let reach: Vec<_> = sa.intersection(&engine).chain(sa.intersection(&sb)).collect();
        assert!(reach.is_empty(), "worker a can name {reach:?} (the engine's: {engine:?}, worker b's: {sb:?})");
        let _ = e.stop();
    });
}

#[test]
fn a_vms_port_is_its_own() {
    // Two VMs asking for one UDP port: the second is refused, so no VM can be handed another's
    // replies.
    sealed(|ns| {
        let e = EngineProc::start(ns, "ports", &[]);
        let add = |name: &str| e.add_vm(name, "consumer=198.51.100.7:51820,bind=0.0.0.0:40123");
        assert_eq!(add("first").0, 0);
        let (code, _, err) = add("second");
        assert_ne!(code, 0, "a second VM got the first one's port");
        assert!(err.to_lowercase().contains("in use"), "{err}");
        let _ = e.stop();
    });
}

#[test]
fn no_process_of_the_engines_user_can_share_a_vms_port() {
    // A process running as the engine's own user asks for a VM's port with SO_REUSEPORT, and
    // connects to the consumer so that the kernel would hand it the consumer's datagrams. The
    // port is the VM's alone: the bind is refused, and every datagram the consumer sends
    // reaches the VM. On both backends.
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    const PORT: u16 = 40125;
    for backend in ["uring", "portable"] {
        sealed(move |ns| {
            let consumer = omerta_it::Consumer::new(ns);
            let (env, extra) = ([("OMERTA_BACKEND", backend)], format!(",bind=0.0.0.0:{PORT}"));
            let (e, vm, theirs) =
                EngineProc::with_fd_vm(ns, &format!("share-{backend}"), consumer.endpoint(), &extra, &env);
            drop(theirs);
            vm.send(&engine::testkit::FrameSpec::udp(&vm.id, consumer.endpoint(), b"open").build());
            let (_, engine_at) = consumer.recv(Duration::from_secs(3)).expect("the VM's datagram reaches the consumer");
            assert_eq!(engine_at.port(), PORT);

            let mut cmd = Command::new(omerta_it::bin_for_every_user("omerta-guest"));
            if let Some(u) = omerta_it::engine_user() {
                cmd.uid(u.uid).gid(u.gid);
            }
            cmd.args(["udp-join", &format!("0.0.0.0:{PORT}"), &consumer.endpoint().to_string(), "1500"]);
            let mut joiner = cmd.stdout(std::process::Stdio::piped()).spawn().expect("omerta-guest");
            let mut lines = std::io::BufReader::new(joiner.stdout.take().unwrap()).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();

            const N: usize = 100;
            for i in 0..N {
                consumer.sock.send_to(format!("reply-{i}").as_bytes(), engine_at).unwrap();
                // Paced a little, so the VM's own socket buffers are never what loses one.
                if i % 20 == 19 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let mut to_vm = 0;
            while to_vm < N
                && vm.recv_matching(Duration::from_secs(2), |f| f.windows(6).any(|w| w == b"reply-")).is_some()
            {
                to_vm += 1;
            }
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            let _ = joiner.wait();
            assert!(
                first.starts_with("JOIN-REFUSED") && first.contains("in use"),
                "a process of the engine's user joined the VM's port ({backend}): {first} {rest:?}; \
                 the VM got {to_vm} of the consumer's {N} datagrams"
            );
            assert_eq!(to_vm, N, "every datagram of the consumer reaches the VM ({backend})");
            let _ = e.stop();
        });
    }
}

#[test]
fn a_relative_guest_path_means_the_clients_directory_never_the_engines() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "relpath", &[]);
        // omertactl makes a relative path absolute from its own directory before sending it.
        let here = std::env::temp_dir().join(format!("omerta-cwd-{}", std::process::id()));
        std::fs::create_dir_all(here.join("sub")).unwrap();
        std::fs::write(here.join("sub/k"), b"not a kernel").unwrap();
        let out = Command::new(workspace_bin("omertactl"))
            .current_dir(&here)
            .arg("--socket")
            .arg(&e.control)
            .args(["vm", "start", "name=x,consumer=198.51.100.7:51820", "--kernel", "sub/k", "--initrd", "sub/k"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains(&format!("{}/sub/k", here.display())), "resolved in omertactl's directory: {err}");
        // Sent as is, a relative path with a directory in it is refused by the engine, which
        // never resolves it in a directory of its own.
        let mut c = api::Client::connect(&e.control).unwrap();
        let answer = c.raw("vm start name=y,consumer=198.51.100.7:51820,kernel=sub/k,initrd=sub/k,memory=128").unwrap();
        let failure = answer.expect_err("a relative path is refused");
        assert!(failure.message.contains("a relative path"), "{}", failure.message);
        let _ = std::fs::remove_dir_all(&here);
    });
}

#[test]
fn an_engine_keeping_its_user_makes_a_handles_missing_directory() {
    sealed(|ns| {
        let dir = std::env::temp_dir().join(format!("omerta-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("vms/deep/d.sock");
        let spec = format!("name=d,handle=dgram:{},consumer=198.51.100.7:51820", sock.display());
        // The kernel fence holds the engine's own user, which --runas self makes root (the
        // test's own processes too): off for an engine that keeps root.
        let args = ["--runas".into(), "self".into(), "--kernel-fence=off".into(), "--vm".into(), spec];
        let e = EngineProc::start(ns, "keepuser", &args);
        e.wait_json("vm d running", &["vm", "show", "d"], 10, |v| v["state"] == "running");
        assert!(sock.exists(), "the handle socket was bound in the directory the engine made");
        let mode = std::fs::metadata(sock.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "made 0700");
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Runs `script` with bash as `user` (a process of the engine's user, in the engine's
/// namespace), at most 5 s; whether it succeeded.
fn as_user(user: &hv::VmmUser, script: &str) -> bool {
    use std::os::unix::process::CommandExt;
    Command::new("timeout")
        .args(["5", "bash", "-c", script])
        .uid(user.uid)
        .gid(user.gid)
        .current_dir("/")
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Issue 24: the kernel fence. In a running engine's namespace, a process of the engine's user
/// reaches neither the internet (8.8.8.8, routed into a sink here), nor this host, nor its LAN,
/// nor the consumer of a VM that has gone, by UDP or TCP, while the engine still forwards its
/// VM's datagrams to its consumer; the table goes when the engine stops.
#[test]
fn the_kernel_fence_holds_the_engines_user_to_its_vms_consumers() {
    sealed(|ns| {
        let Some(user) = omerta_it::engine_user() else {
            omerta_it::require("root (the engine drops to its own user)", Err("not root".into()));
            return;
        };
        let e = EngineProc::start(ns, "fence", &[]);
        let listed =
            || Command::new("nft").args(["list", "table", "inet", "omerta"]).output().map(|o| o.status.success());
        assert!(matches!(listed(), Ok(true)), "the engine runs without its table");
        let consumer = omerta_it::Sink::consumer_at(ns, [198, 51, 100, 7], 51820);
        let gone = omerta_it::Sink::consumer_at(ns, [198, 51, 100, 8], 51820);
        let host = omerta_it::Sink::on(ns, [10, 20, 30, 40], 7001);
        let lan_tcp = omerta_it::TcpSink::on(ns, [10, 1, 2, 3], 22);
        let (code, _, err) = e.add_vm("a", &format!("consumer={}", consumer.at));
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = e.add_vm("b", &format!("consumer={}", gone.at));
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = e.ctl(&["vm", "remove", "b"]);
        assert_eq!(code, 0, "{err}");
        // The engine forwards its VM's datagram to its consumer.
        let path = e.dir.join("a.sock");
        let vmm = omerta_it::bind_vmm_socket(&e.dir.join("vmm.sock"));
        let id = engine::VmIdentity::default();
        let frame = engine::testkit::FrameSpec::udp(&id, consumer.at, b"through the fence").build();
        e.wait_running("a").unwrap();
        vmm.send_to(&frame, &path).unwrap();
        assert_eq!(consumer.wait_for(1, Duration::from_secs(5)), 1, "the engine's datagram reached its consumer");
        // A process of the engine's user: nothing but the VMs' consumers.
        let udp = |to: &omerta_it::Sink| format!("printf x >/dev/udp/{}/{}", to.at.ip, to.at.port);
        for (what, to) in [("this host", &host), ("the consumer of a VM that has gone", &gone)] {
            assert!(!as_user(&user, &udp(to)), "{what}: the send was not refused");
        }
        for (ip, port) in omerta_it::FORBIDDEN {
            let script = format!("printf x >/dev/udp/{}/{port}", std::net::Ipv4Addr::from(ip));
            assert!(!as_user(&user, &script), "{ip:?}:{port}: the send was not refused");
        }
        assert!(!as_user(&user, "exec 3<>/dev/tcp/10.1.2.3/22"), "a TCP connection to the LAN");
        // ... while the same process may send to a consumer on the list: the fence is the list.
        assert!(as_user(&user, &udp(&consumer)), "the engine's user cannot reach its VM's consumer");
        assert_eq!(consumer.wait_for(2, Duration::from_secs(5)), 2);
        // Root in the same namespace is not fenced: the sinks do listen.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.send_to(b"root", (host.at.ip, host.at.port)).unwrap();
        assert_eq!(host.wait_for(1, Duration::from_secs(5)), 1, "root's datagram reached the host's sink");
        assert_eq!((gone.finish(), lan_tcp.count()), (0, 0), "a fenced destination got something");
        let (_, stderr) = e.stop();
        assert!(stderr.contains("kernel fence: vm b: 198.51.100.8:51820 removed"), "{stderr}");
        assert!(matches!(listed(), Ok(false)), "the table outlived the engine");
    });
}
