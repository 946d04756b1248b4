//! The control plane as an operator uses it: a running `omerta-engine` and `omertactl`.
//!
//! Over 500 lines on purpose: one file per area of the test plan; every case is independent.
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use omerta_it::{ep, sealed, Consumer, EngineProc, SyntheticVm, VmEnd};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(3);

// Every test body runs in `sealed`: a private network namespace, where the engine it starts
// can send nowhere but inside (`EngineProc` refuses to start anywhere else), with sinks on the
// forbidden destinations, which must receive nothing.

/// An engine serving one VM named `t` on a socketpair, allowing the loopback consumer `c`.
fn engine_with_vm(ns: &omerta_it::Netns, tag: &str, c: &Consumer, extra: &str) -> (EngineProc, SyntheticVm, OwnedFd) {
    EngineProc::with_fd_vm(ns, tag, c.endpoint(), extra, &[])
}

fn raw_request(path: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_harness_refuses_an_engine_outside_a_private_namespace() {
    // Everything that can send (an engine, a worker, a guest, a consumer, a sink, a daemon)
    // takes an `omerta_it::Netns`, which only entering a fresh namespace makes and which cannot
    // leave its thread: a test without one does not compile (the `compile_fail` examples on
    // `Netns`, run by `cargo test --doc`). What is left to check at run time is the check the
    // proof is made with: this thread, in the runner's namespace, where a consumer like
    // 203.0.113.7 would be routed out of the machine, is refused.
    let err = omerta_it::check_private_netns("omerta-engine").expect_err("the runner's namespace is refused");
    assert!(err.contains("refusing to start omerta-engine"), "{err}");
    // Inside one, the proof names the thread's namespace, not the runner's.
    omerta_it::private_netns(|ns| {
        assert_eq!(Some(ns.id()), omerta_it::current_netns(), "the proof is of this thread's namespace");
        assert_ne!(Some(ns.id()), omerta_it::runner_netns(), "which is not the runner's");
        omerta_it::check_private_netns("omerta-engine").expect("a private namespace passes the check");
    });
}

#[test]
fn a_started_engine_runs_in_the_tests_private_namespace() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "netns", &[]);
        let (engine_ns, runner) = (omerta_it::netns_of(e.pid()), omerta_it::runner_netns());
        assert!(engine_ns.is_some() && runner.is_some(), "namespaces readable from /proc");
        assert_ne!(engine_ns, runner, "the engine is not in the runner's network namespace");
        assert_eq!(engine_ns, omerta_it::current_netns(), "but in the one the test made");
    });
}

#[test]
fn every_command_against_a_running_engine() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "cmds", &c, "");
        for _ in 0..10 {
            vm.send(&vm.udp(c.endpoint(), b"to the consumer"));
        }
        vm.send(&vm.udp(ep([8, 8, 8, 8], 53), b"secret-dns-query"));
        vm.send(&vm.udp(ep([192, 168, 1, 1], 80), b"secret-lan"));
        assert_eq!(c.drain(Duration::from_millis(300)).len(), 10);
        e.wait_json("the counters published", &["stats", "t"], 5, |s| s[0]["frames_from_vm"] == 12);

        let (code, out, _) = e.ctl(&["status"]);
        assert_eq!(code, 0);
        assert!(out.contains("1 VM(s): 1 running"), "{out}");
        let (code, out, _) = e.ctl(&["vm", "list"]);
        assert!(code == 0 && out.contains("t ") && out.contains("running") && out.contains("filtered"), "{out}");
        let show = e.json(&["vm", "show", "t"]);
        assert_eq!((show["state"].as_str(), show["strategy"].as_str()), (Some("running"), Some("filtered")));

        let stats = e.json(&["stats", "t"]);
        let s = &stats[0];
        assert_eq!(s["forwarded_udp"], 10);
        assert_eq!(s["drops"]["not_allowed"], 2);
        assert_eq!(s["frames_from_vm"], 12);
        let (_, text, _) = e.ctl(&["stats"]);
        let row = |name: &str, value: &str| text.lines().any(|l| l.split_whitespace().eq([name, value]));
        assert!(row("not_allowed", "2") && row("forwarded_udp", "10"), "{text}");

        let lat = e.json(&["latency", "t"]);
        assert!(lat[0]["vm_to_host"]["count"].as_u64().unwrap() >= 12, "{lat}");
        assert!(lat[0]["vm_to_host"]["p50_us"].as_f64().unwrap() > 0.0);
        let (code, text, _) = e.ctl(&["latency"]);
        assert!(code == 0 && text.contains("p99.9") && text.contains("*"), "{text}");

        let log = e.json(&["log", "t"]);
        let lines = log.to_string();
        assert!(
            lines.contains("8.8.8.8:53") && lines.contains("192.168.1.1:80") && lines.contains("not_allowed"),
            "{lines}"
        );
        assert!(!lines.contains("secret"), "the log never carries payload bytes");

        let (code, metrics, _) = e.ctl(&["metrics"]);
        assert_eq!(code, 0);
        assert!(metrics.contains("omerta_drops_total{vm=\"t\",reason=\"not_allowed\"} 2"), "{metrics}");
        assert!(metrics.contains("omerta_forwarded_udp_total{vm=\"t\"} 10"));
        assert!(metrics.contains("# TYPE omerta_frame_latency_seconds histogram"), "{metrics}");
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "exposition format: '{line}'");
        }

        // Allowlist commands.
        let other = ep([198, 51, 100, 9], 443);
        assert_eq!(e.json(&["allow", "add", "t", &other.to_string()])["allow"].as_array().unwrap().len(), 2);
        assert_eq!(e.json(&["allow", "remove", "t", &other.to_string()])["allow"].as_array().unwrap().len(), 1);
        assert_eq!(
            e.json(&["allow", "set", "t", &c.endpoint().to_string(), &other.to_string()])["allow"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let (_, out, _) = e.ctl(&["allow", "list", "t"]);
        assert!(out.contains(&other.to_string()), "{out}");

        // Capture the next dropped frames into a pcap file.
        let pcap = e.dir.join("dropped.pcap");
        let vm2 = std::thread::spawn({
            let frame = vm.udp(ep([8, 8, 4, 4], 53), b"x");
            let end = match &vm.end {
                VmEnd::Dgram(s) => s.try_clone().unwrap(),
                VmEnd::Stream(_) => unreachable!(),
            };
            move || {
                for _ in 0..30 {
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = end.send(&frame);
                }
            }
        });
        let (code, out, err) =
            e.ctl(&["capture", "t", "--dropped", pcap.to_str().unwrap(), "--count", "5", "--timeout", "5"]);
        vm2.join().unwrap();
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("5 dropped frame(s)"), "{out}");
        let (snaplen, frames) = omerta_it::read_pcapng(&std::fs::read(&pcap).unwrap());
        assert_eq!(snaplen, 128);
        assert_eq!(frames.len(), 5, "five frames");
        for f in &frames {
            assert_eq!((f.caplen, f.len, f.to_vm), (43, 43, false), "whole 43-byte frames from the VM");
            assert!(f.comment.as_deref().is_some_and(|c| c.starts_with("dropped: ")), "{:?}", f.comment);
        }

        // Lifecycle and exit codes.
        assert_eq!(e.ctl(&["vm", "show", "nope"]).0, 3, "not found");
        assert_eq!(
            e.ctl(&["allow", "add", "t", "127.0.0.1:9"]).0,
            4,
            "special addresses follow the VM's policy: refused"
        );
        assert_eq!(e.ctl(&["vm", "restart", "t"]).0, 4, "an fd handle cannot be reopened: refused");
        let path = e.dir.join("vm2.sock");
        let spec = format!("name=second,handle=dgram:{},consumer=203.0.113.7:51820", path.display());
        let (code, out, err) = e.ctl(&["vm", "add", &spec]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("second"));
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 4, "a duplicate name is refused");
        assert_eq!(e.json(&["vm", "stop", "second"])["state"], "stopped");
        assert_eq!(e.ctl(&["vm", "stop", "second"]).0, 4, "stopping a stopped VM is refused");
        let restarted = e.json(&["vm", "restart", "second"]);
        assert_eq!(restarted["starts"], 2);
        // Removed while running: gone from the list, its socket file gone, its name free.
        assert_eq!(e.json(&["vm", "remove", "second"])["state"], "removed");
        assert!(!path.exists(), "the removed VM's handle socket is gone");
        let names = e.json(&["vm", "list"]).to_string();
        assert!(!names.contains("\"second\""), "{names}");
        assert_eq!(e.ctl(&["vm", "remove", "second"]).0, 3, "removing it again: not found");
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0, "the name is free again");
        assert_eq!(e.json(&["vm", "stop", "t"])["state"], "stopped");

        let control = e.control.clone();
        let (code, err) = e.stop();
        assert_eq!(code, Some(0), "{err}");
        assert!(!control.exists(), "the control socket is removed on exit");
        let out = std::process::Command::new(omerta_it::workspace_bin("omertactl"))
            .arg("--socket")
            .arg(&control)
            .arg("status")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "engine not running");
    });
}

#[test]
fn every_counter_is_in_every_view() {
    sealed(|ns| {
        // One vocabulary (engine::stats::COUNTERS): the stats JSON, `omertactl stats`, the
        // Prometheus text and the engine's exit summary each show every counter of it.
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "views", &c, "");
        vm.send(&vm.udp(c.endpoint(), b"x"));
        c.recv(WAIT).expect("forwarded");
        let json = &e.wait_json("published", &["stats", "t"], 5, |s| s[0]["forwarded_udp"] == 1)[0];
        let (_, text, _) = e.ctl(&["stats", "t"]);
        let (_, metrics, _) = e.ctl(&["metrics"]);
        let (code, log) = e.stop();
        assert_eq!(code, Some(0), "{log}");
        let summary = log
            .lines()
            .find(|l| l.contains("vm t: frames_from_vm="))
            .unwrap_or_else(|| panic!("no exit summary: {log}"));
        for k in engine::stats::COUNTERS {
            assert!(json[k.name].is_u64(), "stats JSON lacks {}: {json}", k.name);
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(&format!("{} ", k.name))),
                "omertactl stats lacks {}: {text}",
                k.name
            );
            assert!(metrics.contains(&format!("omerta_{}{{vm=\"t\"}} ", k.metric)), "metrics lack omerta_{}", k.metric);
            // The family is named without the counter's `_total` (OpenMetrics).
            let family = k.metric.trim_end_matches("_total");
            assert!(
                metrics.contains(&format!("# HELP omerta_{family} {}", k.help)),
                "metrics lack HELP for {}",
                k.metric
            );
            assert!(
                summary.contains(&format!(" {}=", k.name)) || summary.contains(&format!(": {}=", k.name)),
                "exit summary lacks {}: {summary}",
                k.name
            );
        }
        assert_eq!(json["forwarded_udp"], 1);
    });
}

#[test]
fn a_handle_path_in_use_is_refused_whatever_its_scheme() {
    sealed(|ns| {
        use std::os::unix::fs::MetadataExt;
        let c = Consumer::new(ns);
        let (e, _vm, _keep) = engine_with_vm(ns, "samepath", &c, "");
        // VM a's live datagram socket at P: another VM may not take P, as dgram:P or
        // stream:P, nor with a peer= that makes the handle's text differ.
        let path = e.dir.join("live.sock");
        let a = format!("name=a,handle=dgram:{},consumer=203.0.113.7:51820", path.display());
        let (code, _, err) = e.ctl(&["vm", "add", &a]);
        assert_eq!(code, 0, "{err}");
        let ino = std::fs::metadata(&path).expect("VM a's socket").ino();
        for handle in [format!("stream:{}", path.display()), format!("dgram:{}", path.display())] {
            for extra in ["", ",peer=/tmp/omerta-no-such-peer.sock"] {
                let b = format!("name=b,handle={handle},consumer=203.0.113.7:51820{extra}");
                if handle.starts_with("stream") && !extra.is_empty() {
                    continue;
                }
                let (code, _, err) = e.ctl(&["vm", "add", &b]);
                assert_eq!(code, 4, "{b}: {err}");
                assert!(err.contains("is used by VM 'a'"), "{b}: {err}");
            }
        }
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "VM a's socket is the file it bound");
        // A live socket of someone else at a path no VM names: the engine's probe finds it
        // bound, whatever its type, and refuses to replace it.
        let other = e.dir.join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let ino = std::fs::metadata(&other).unwrap().ino();
        let spec = format!("name=c,handle=dgram:{},consumer=203.0.113.7:51820", other.display());
        let (code, _, err) = e.ctl(&["vm", "add", &spec]);
        assert_eq!(code, 4, "{err}");
        assert!(err.contains("in use"), "{err}");
        assert_eq!(std::fs::metadata(&other).unwrap().ino(), ino, "the listener's socket file stays");
        // The operator sees each refusal and who asked for it.
        let (_, log) = e.stop();
        assert!(log.contains("vm b: refused (asked by uid 0): handle stream:"), "{log}");
        assert!(log.contains("vm c: refused (asked by uid 0):") && log.contains("in use"), "{log}");
    });
}

#[test]
fn a_stopped_vm_keeps_what_its_worker_saw_last() {
    sealed(|ns| {
        // `vm stop` right after traffic, before the worker's next publication (every 100 ms):
        // counters, the blocked-traffic log and the latency histograms still show all of it.
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "final", &c, "");
        let start = api::Request::CaptureStart { vm: "t".into(), count: 10, snaplen: 128, all: false };
        assert!(raw_request(&e.control, format!("{start}\n").as_bytes()).contains("\"ok\":true"));
        for _ in 0..5 {
            vm.send(&vm.udp(c.endpoint(), b"good"));
        }
        for port in [53, 54, 55] {
            vm.send(&vm.udp(ep([8, 8, 8, 8], port), b"blocked"));
        }
        for _ in 0..5 {
            c.recv(WAIT).expect("forwarded");
        }
        // Straight on the socket, well inside the 100 ms before the next publication.
        let reply = {
            let mut s = UnixStream::connect(&e.control).unwrap();
            s.write_all(format!("{}\n", api::Request::VmStop("t".into())).as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        assert!(reply.contains("\"state\":\"stopped\""), "{reply}");
        let s = &e.json(&["stats", "t"])[0];
        assert_eq!((s["frames_from_vm"].as_u64(), s["forwarded_udp"].as_u64()), (Some(8), Some(5)), "{s}");
        let log = e.json(&["log", "t"]).to_string();
        for port in [53, 54, 55] {
            assert!(log.contains(&format!("8.8.8.8:{port}")), "the log keeps the last blocked frames: {log}");
        }
        let lat = &e.json(&["latency", "t"])[0];
        assert!(lat["vm_to_host"]["count"].as_u64() >= Some(8), "and the latency of every frame: {lat}");
        let fetch = api::Request::CaptureFetch("t".into());
        let cap = raw_request(&e.control, format!("{fetch}\n").as_bytes());
        assert_eq!(cap.matches("\"hex\"").count(), 3, "and its capture of the three dropped frames: {cap}");
    });
}

#[test]
fn bad_requests_get_clear_errors() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, _vm, _keep) = engine_with_vm(ns, "bad", &c, "");
        let reply = |bytes: &[u8]| raw_request(&e.control, bytes);
        assert!(reply(b"\x00\x01garbage\n").contains("\"code\":\"bad_request\""));
        assert!(reply(b"reboot now\n").contains("unknown request 'reboot'"));
        assert!(reply(b"vm show ghost\n").contains("\"code\":\"not_found\""));
        assert!(reply(b"\n").contains("empty request"));
        let mut huge = vec![b'a'; 1 << 20];
        huge.push(b'\n');
        assert!(reply(&huge).contains("longer than 4096 bytes"), "a 1 MB line is refused");
        // A slow client: half a request, then silence past the read timeout.
        let mut s = UnixStream::connect(&e.control).unwrap();
        s.write_all(b"sta").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.contains("not completed within"), "{out}");
        // Several requests on one connection, one reply each.
        let out = reply(b"status\nvm list\n");
        assert_eq!(out.lines().count(), 2, "{out}");
        // The engine still answers everyone.
        assert_eq!(e.ctl(&["status"]).0, 0);
    });
}

#[test]
fn a_peer_with_the_wrong_uid_is_refused() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, _vm, _keep) = engine_with_vm(ns, "uid", &c, "");
        // The socket is 0600 in a 0700 directory: another user cannot even reach it. Open both up
        // here to reach the engine's own check (SO_PEERCRED).
        use std::os::unix::fs::PermissionsExt;
        let dir = e.control.parent().unwrap();
        let meta = std::fs::metadata(&e.control).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700);
        let mut p = std::fs::metadata(&e.dir).unwrap().permissions();
        p.set_mode(0o755);
        std::fs::set_permissions(&e.dir, p).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&e.control, std::fs::Permissions::from_mode(0o666)).unwrap();
        // A copy of omertactl that uid 65534 can run, wherever this checkout lives.
        let bin_dir = e.dir.join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        let ctl = bin_dir.join("omertactl");
        std::fs::copy(omerta_it::workspace_bin("omertactl"), &ctl).unwrap();
        for (path, mode) in [(&bin_dir, 0o755), (&ctl, 0o755)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut tmp = std::env::temp_dir();
        while let Some(parent) = tmp.parent().map(std::path::Path::to_path_buf) {
            if std::fs::metadata(&tmp).map(|m| m.permissions().mode() & 0o001 == 0).unwrap_or(false) {
                omerta_it::require(
                    "a temporary directory other users can enter",
                    Err(format!("{} is not o+x", tmp.display())),
                );
                return;
            }
            tmp = parent;
        }
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&ctl)
            .arg("--socket")
            .arg(&e.control)
            .arg("status")
            .output();
        let out = match out {
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("setpriv:") => {
                omerta_it::require(
                    "setpriv to run as another uid",
                    Err(String::from_utf8_lossy(&o.stderr).into_owned()),
                );
                return;
            }
            Ok(o) => o,
            Err(err) => {
                omerta_it::require("setpriv (util-linux)", Err(err.to_string()));
                return;
            }
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains("uid 65534 may not use this control socket"), "{err}");
    });
}

#[test]
fn control_hammering_does_not_stall_the_data_plane() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "hammer", &c, "");
        let control = e.control.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hammers: Vec<_> = (0..3)
            .map(|_| {
                let (control, stop) = (control.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut served = 0u32;
                    let start = std::time::Instant::now();
                    // Bounded: at most 3000 requests or 20 s per thread.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && served < 3000
                        && start.elapsed() < Duration::from_secs(20)
                    {
                        if raw_request(&control, b"metrics\nstats\n").contains("\"ok\":true") {
                            served += 1;
                        }
                    }
                    served
                })
            })
            .collect();
        let reader = std::thread::spawn(move || c.drain(Duration::from_millis(700)).len());
        let consumer_ep = {
            let s = e.json(&["allow", "list", "t"]);
            s["allow"][0].as_str().unwrap().parse::<engine::Endpoint>().unwrap()
        };
        for i in 0..20_000u32 {
            vm.send(&vm.udp(consumer_ep, &i.to_be_bytes()));
        }
        let received = reader.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served: u32 = hammers.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(received, 20_000, "every frame forwarded while the control socket was hammered");
        assert!(served > 0, "the control socket answered meanwhile");
    });
}

fn engine_with_added_vm(ns: &omerta_it::Netns, tag: &str, spec_extra: &str) -> (EngineProc, std::path::PathBuf, Value) {
    let e = EngineProc::start(ns, tag, &[]);
    let path = e.dir.join("vm.sock");
    let spec = format!("name=m,handle=dgram:{},consumer=198.51.100.7:51820{spec_extra}", path.display());
    let (code, _, err) = e.ctl(&["vm", "add", &spec]);
    assert_eq!(code, 0, "{err}");
    let show = e.wait_json("the VM running", &["vm", "show", "m"], 10, |v| v["state"] == "running");
    (e, path, show)
}

/// Plays the VMM of `engine_with_added_vm`'s VM: `n` datagrams to its consumer, from a bound
/// socket (QEMU -netdev dgram binds its end: an unnamed sender is not the VM).
fn send_to_consumer(e: &EngineProc, handle: &std::path::Path, n: usize) {
    let vmm = omerta_it::bind_vmm_socket(&e.dir.join("vmm.sock"));
    let to = "198.51.100.7:51820".parse().unwrap();
    let frame = engine::testkit::FrameSpec::udp(&engine::VmIdentity::default(), to, b"x").build();
    for _ in 0..n {
        vmm.send_to(&frame, handle).unwrap();
    }
}

/// seed: testFilteredModeCreatesFileHandle
#[test]
fn filtered_mode_creates_file_handle() {
    sealed(|ns| {
        use std::os::unix::fs::FileTypeExt;
        let (e, path, show) = engine_with_added_vm(ns, "filtered", ",mode=filtered");
        assert_eq!(show["strategy"], "filtered");
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket(), "the VM's NIC is a unix socket");
        // A VMM on the other end gets its ARP answered through it, and its datagram forwarded:
        // both counted as frames through that handle.
        let consumer = omerta_it::Sink::consumer_at(ns, [198, 51, 100, 7], 51820);
        let vmm = omerta_it::bind_vmm_socket(&e.dir.join("vmm.sock"));
        vmm.set_read_timeout(Some(WAIT)).unwrap();
        let id = engine::VmIdentity::default();
        vmm.send_to(&engine::testkit::arp_request(&id, id.gateway_ip), &path).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(vmm.recv(&mut buf).unwrap(), 42);
        let frame = engine::testkit::FrameSpec::udp(&id, consumer.at, b"through the handle").build();
        vmm.send_to(&frame, &path).unwrap();
        assert_eq!(consumer.wait_for(1, WAIT), 1, "the datagram reached the consumer");
        let s = &e.wait_json("two frames", &["stats", "m"], 5, |s| s[0]["frames_from_vm"] == 2)[0];
        assert_eq!(
            (s["arp_replies"].as_u64(), s["forwarded_udp"].as_u64(), s["frames_to_vm"].as_u64()),
            (Some(1), Some(1), Some(1)),
            "{s}"
        );
    });
}

/// seed: testConntrackModeUsesConntrackStrategy
#[test]
fn conntrack_mode_uses_conntrack_strategy() {
    sealed(|ns| {
        let (e, path, show) = engine_with_added_vm(ns, "conntrack", ",mode=conntrack");
        assert_eq!(show["strategy"], "conntrack");
        // Its behaviour: one allowlist check per flow, then the fast path; all five forwarded.
        let consumer = omerta_it::Sink::consumer_at(ns, [198, 51, 100, 7], 51820);
        send_to_consumer(&e, &path, 5);
        let s = &e.wait_json("five frames counted", &["stats", "m"], 5, |s| s[0]["forwarded_udp"] == 5)[0];
        assert_eq!((s["allowlist_checks"].as_u64(), s["fast_path"].as_u64()), (Some(1), Some(4)), "{s}");
        assert_eq!(consumer.wait_for(5, WAIT), 5, "the consumer received all five");
    });
}

/// seed: testSampledModeUsesSampledStrategy
#[test]
fn sampled_mode_uses_sampled_strategy() {
    sealed(|ns| {
        let (_e, _path, show) = engine_with_added_vm(ns, "sampled", ",mode=sampled");
        assert_eq!(show["strategy"], "sampled");
        assert_eq!(show["sample_rate"], 0.01, "1% by default");
    });
}

/// seed: testSamplingRateConfigurable
#[test]
fn sampling_rate_configurable() {
    sealed(|ns| {
        let (e, path, show) =
            engine_with_added_vm(ns, "rate", ",mode=sampled,sample-rate=0.05,seed=3,allow-special=yes");
        assert_eq!(show["sample_rate"], 0.05);
        send_to_consumer(&e, &path, 2000);
        let s = &e.wait_json("2000 frames counted", &["stats", "m"], 10, |s| s[0]["frames_from_vm"] == 2000)[0];
        let checked = s["allowlist_checks"].as_u64().unwrap();
        assert_eq!(checked + s["unchecked"].as_u64().unwrap(), 2000);
        // 5% of 2000 is 100; the binomial spread keeps a fair generator well inside 50..150.
        assert!((50..=150).contains(&checked), "checked {checked} of 2000 at 5%");
    });
}

fn threads_and_fds(pid: u32) -> (Vec<String>, usize) {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect();
    names.sort();
    // The process's table, and each worker's own (a worker takes one as it starts).
    let count = |dir: String| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let workers: usize = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().starts_with("omerta-vm-"))
        .map(|t| count(t.path().join("fd").display().to_string()))
        .sum();
    (names, count(format!("/proc/{pid}/fd")) + workers)
}

/// seed: testCleanupStopsBackgroundTasks
#[test]
fn cleanup_stops_background_tasks() {
    sealed(|ns| {
        let e = EngineProc::start(ns, "cleanup", &[]);
        let settled = || {
            // Until two looks 100 ms apart agree: a control connection just answered may still
            // be ending its handler thread.
            let mut last = threads_and_fds(e.pid());
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(100));
                let now = threads_and_fds(e.pid());
                if now == last {
                    break;
                }
                last = now;
            }
            last
        };
        let baseline = settled();
        let path = e.dir.join("vm.sock");
        let spec = format!("name=c,handle=dgram:{},consumer=203.0.113.7:51820", path.display());
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0);
        e.wait_json("the worker running", &["vm", "show", "c"], 5, |v| v["state"] == "running");
        let running = threads_and_fds(e.pid());
        assert!(running.0.iter().any(|n| n == "omerta-vm-c"), "a worker thread runs: {:?}", running.0);
        assert!(
            running.1 >= baseline.1 + 3,
            "the VM holds its handle, host socket and doorbell: {running:?} vs {baseline:?}"
        );
        assert_eq!(e.ctl(&["vm", "stop", "c"]).0, 0);
        let after = settled();
        assert_eq!(after, baseline, "stopping the VM ends its thread and releases its descriptors");
        assert!(!path.exists(), "and removes its socket file");
    });
}

/// seed: testRapidEndpointChanges
#[test]
fn rapid_endpoint_changes() {
    sealed(|ns| {
        // A sender thread numbers its datagrams and sends each number to twenty consumers, as
        // fast as the engine takes them, while the allowlist moves along them through the
        // control socket: {C0,C1}, {C1,C2}, ... {C18,C19}. Each step removes one consumer for
        // good. `allow set` replies once the worker has applied the list, so a number taken
        // after that reply never reaches the consumer it removed; and every consumer received
        // traffic while it was allowed.
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        use std::sync::Arc;
        let consumers: Vec<Consumer> = (0..20).map(|_| Consumer::new(ns)).collect();
        let eps: Vec<engine::Endpoint> = consumers.iter().map(Consumer::endpoint).collect();
        let (e, vm, _keep) = engine_with_vm(ns, "race", &consumers[0], &format!(",consumer={}", eps[1]));
        let (seq, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
        let (id, targets) = (vm.id, eps.clone());
        let end = match &vm.end {
            VmEnd::Dgram(s) => s.try_clone().unwrap(),
            VmEnd::Stream(_) => unreachable!(),
        };
        let sender = std::thread::spawn({
            let (seq, stop) = (seq.clone(), stop.clone());
            move || {
                let start = std::time::Instant::now();
                // Bounded: 500 000 numbers or 30 s.
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                    let n = seq.fetch_add(1, Ordering::SeqCst);
                    if n >= 500_000 {
                        break;
                    }
                    for ep in &targets {
                        let _ = end.send(&engine::testkit::FrameSpec::udp(&id, *ep, &n.to_be_bytes()).build());
                    }
                }
            }
        });
        let readers: Vec<_> = consumers
            .into_iter()
            .map(|c| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // Until the sender has stopped and nothing more arrives.
                    let mut seqs = Vec::new();
                    loop {
                        match c.recv(Duration::from_millis(200)) {
                            Some((d, _)) => seqs.push(u32::from_be_bytes([d[0], d[1], d[2], d[3]])),
                            None if stop.load(Ordering::Relaxed) => break,
                            None => {}
                        }
                    }
                    seqs
                })
            })
            .collect();
        // cut[j]: the first number surely taken after consumer j's removal was acknowledged.
        let mut cut = [u32::MAX; 20];
        for k in 1..19 {
            std::thread::sleep(Duration::from_millis(20));
            // Straight on the control socket: an omertactl process would take milliseconds, a
            // window in which even a queued change would long have been applied.
            let reply = {
                let mut c = UnixStream::connect(&e.control).unwrap();
                let req = api::Request::AllowSet("t".into(), vec![eps[k], eps[k + 1]]);
                c.write_all(format!("{req}\n").as_bytes()).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut out = String::new();
                let _ = c.read_to_string(&mut out);
                out
            };
            cut[k - 1] = seq.load(Ordering::SeqCst);
            assert!(reply.contains("\"ok\":true"), "{reply}");
        }
        // The last list stays: time for its consumers' traffic even on a loaded machine.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        let got: Vec<Vec<u32>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        for (j, seqs) in got.iter().enumerate() {
            assert!(!seqs.is_empty(), "consumer {j} received traffic while it was allowed");
            let late: Vec<&u32> = seqs.iter().filter(|n| **n >= cut[j]).collect();
            assert!(late.is_empty(), "consumer {j}, removed before number {}, still received {late:?}", cut[j]);
        }
        assert_eq!(e.json(&["allow", "list", "t"])["allow"].as_array().map(Vec::len), Some(2));
    });
}

/// seed: testConsumerReconnect
#[test]
fn consumer_reconnect() {
    sealed(|ns| {
        // Two consumers on a running engine; the first comes back from another address (a new
        // socket elsewhere, as after a reconnect from another network). After `allow set` it
        // works both ways at its new address, its old address no longer does in either
        // direction, and the other consumer never notices.
        let (old, other) = (Consumer::new(ns), Consumer::new(ns));
        let (e, vm, _keep) = engine_with_vm(ns, "reconnect", &old, &format!(",consumer={}", other.endpoint()));
        let round_trip = |c: &Consumer, tag: &str| -> Option<std::net::SocketAddr> {
            vm.send(&vm.udp(c.endpoint(), tag.as_bytes()));
            let (data, engine) = c.recv(WAIT)?;
            assert_eq!(data, tag.as_bytes());
            let reply = format!("reply-{tag}");
            c.sock.send_to(reply.as_bytes(), engine).unwrap();
            vm.recv_matching(WAIT, |f| f.ends_with(reply.as_bytes()))?;
            Some(engine)
        };
        let engine_addr = round_trip(&old, "old-1").expect("the first consumer, before it moves");
        assert!(round_trip(&other, "other-1").is_some());
        let moved = Consumer::new(ns);
        let (code, _, err) =
            e.ctl(&["allow", "set", "t", &moved.endpoint().to_string(), &other.endpoint().to_string()]);
        assert_eq!(code, 0, "{err}");
        assert!(round_trip(&moved, "moved-1").is_some(), "the moved consumer works both ways at its new address");
        assert!(round_trip(&other, "other-2").is_some(), "the other consumer is untouched");
        vm.send(&vm.udp(old.endpoint(), b"to-the-old-address"));
        assert!(old.recv(Duration::from_millis(300)).is_none(), "nothing goes to the old address");
        old.sock.send_to(b"from-the-old-address", engine_addr).unwrap();
        assert!(
            vm.recv_matching(Duration::from_millis(300), |f| f.ends_with(b"from-the-old-address")).is_none(),
            "nothing from the old address reaches the VM"
        );
        let s = e.wait_json("the refusals", &["stats", "t"], 5, |s| s[0]["drops"]["inbound_not_allowed"] == 1);
        assert_eq!(s[0]["drops"]["not_allowed"], 1, "{s}");
    });
}

/// seed: testResourceExhaustion
#[test]
fn resource_exhaustion() {
    sealed(|ns| {
        // A running engine whose open-files limit is lowered under it (prlimit --pid): `vm add`
        // is refused with one clear line, the engine keeps answering, the VM it has keeps
        // forwarding. At the limit exactly it cannot even accept a connection: it waits without
        // spinning and answers once the limit is raised.
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "fds", &c, "");
        let pid = e.pid().to_string();
        // The limit bounds descriptor numbers: the lowest free one is what the next open gets.
        let lowest_free = || {
            let used: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .filter_map(|f| f.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect();
            (0..).find(|n| !used.contains(n)).unwrap()
        };
        let prlimit = |n: usize| {
            // As the engine's own user: its ids then match (root without CAP_SYS_RESOURCE, as
            // in containers, may not change another user's limits).
            let mut cmd = match omerta_it::engine_user() {
                Some(u) => {
                    let mut c = std::process::Command::new("setpriv");
                    c.args(["--reuid", &u.uid.to_string(), "--regid", &u.gid.to_string(), "--clear-groups", "prlimit"]);
                    c
                }
                None => std::process::Command::new("prlimit"),
            };
            let out = cmd.args(["--pid", &pid, &format!("--nofile={n}:")]).output();
            match out {
                Ok(o) if o.status.success() => true,
                Ok(o) => panic!("prlimit: {}", String::from_utf8_lossy(&o.stderr)),
                Err(err) => !omerta_it::require("prlimit (util-linux)", Err(err.to_string())),
            }
        };
        // Room for one more descriptor: the control connection itself.
        if !prlimit(lowest_free() + 1) {
            return;
        }
        let spec = format!("name=x,handle=dgram:{},consumer={}", e.dir.join("x.sock").display(), c.endpoint());
        let (code, out, err) = e.ctl(&["vm", "add", &spec]);
        assert_eq!(code, 4, "refused: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("out of file descriptors"), "{err}");
        // The engine keeps answering. At the limit, the refused request's connection may still
        // be closing when the next one arrives, which then waits for the descriptor; on a
        // saturated machine that wait has outlasted omertactl's 10 s reply timeout. Three tries.
        let mut status = e.ctl(&["status"]);
        for _ in 0..2 {
            if status.0 == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            status = e.ctl(&["status"]);
        }
        assert_eq!(status.0, 0, "the engine keeps answering: {}", status.2);
        assert!(!e.ctl(&["vm", "list"]).1.contains("x "), "and holds no half-made VM");
        for i in 0..100u32 {
            vm.send(&vm.udp(c.endpoint(), &i.to_be_bytes()));
        }
        assert_eq!(c.drain(Duration::from_millis(300)).len(), 100, "the existing VM keeps forwarding");
        // No descriptor left at all: a client's connection waits in the backlog.
        // (Until it holds still: a connection just answered may still be closing.)
        let mut n = usize::MAX;
        while n != lowest_free() {
            n = lowest_free();
            prlimit(n);
            std::thread::sleep(Duration::from_millis(100));
        }
        let cpu = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let f: Vec<u64> =
                stat.rsplit(')').next().unwrap().split_whitespace().filter_map(|v| v.parse().ok()).collect();
            // utime and stime, in clock ticks (fields 14 and 15 of the line).
            f[10] + f[11]
        };
        // The accept already waiting holds a descriptor it reserved: one more client gets in.
        // Kept open, so the next accept finds none at all.
        let mut first = UnixStream::connect(&e.control).unwrap();
        first.write_all(b"status\n").unwrap();
        first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        assert!(first.read(&mut buf).is_ok_and(|n| n > 0), "the client that got the reserved descriptor is answered");
        let mut conn = UnixStream::connect(&e.control).unwrap();
        conn.write_all(b"status\n").unwrap();
        let before = cpu();
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let r = conn.read(&mut buf);
        assert!(r.is_err(), "no answer while no descriptor is free: {r:?}");
        let spent = cpu() - before;
        assert!(spent < 20, "the engine waits for a descriptor instead of spinning ({spent} ticks in 1 s)");
        prlimit(1024); // the soft limit only: the hard one stays
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = conn.read(&mut buf).expect("the waiting client is answered once descriptors are free");
        assert!(String::from_utf8_lossy(&buf[..n]).contains("\"ok\":true"));
        drop(first);
        assert_eq!(e.ctl(&["vm", "add", &spec]).0, 0, "and a VM can be added again");
    });
}

#[test]
fn capture_all_takes_both_directions_as_pcapng_with_reasons() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "capall", &c, "");
        // The file is opened before anything is asked: a path that cannot be made fails at
        // once, with no capture left behind in the engine.
        let t0 = std::time::Instant::now();
        let (code, _, err) = e.ctl(&["capture", "t", "--all", "/nonexistent/dir/x.pcapng", "--timeout", "5"]);
        assert_eq!(code, 1, "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2), "failed before waiting");
        assert_eq!(e.ctl(&["capture", "t", "--all", "/tmp/x", "--dropped", "/tmp/y"]).0, 2, "one file only");
        assert_eq!(e.ctl(&["capture", "t", "--all", "/tmp/x", "--snaplen", "10"]).0, 2, "snaplen below 64");
        // Traffic both ways and a blocked frame, while the capture runs.
        let out = e.dir.join("all.pcapng");
        let (frames_out, blocked) = (vm.udp(c.endpoint(), &[7u8; 200]), vm.udp(ep([8, 8, 4, 4], 53), b"x"));
        let end = match &vm.end {
            VmEnd::Dgram(s) => s.try_clone().unwrap(),
            VmEnd::Stream(_) => unreachable!(),
        };
        let traffic = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(20));
                let _ = end.send(&frames_out);
                let _ = end.send(&blocked);
            }
        });
        let echo = std::thread::spawn(move || {
            for _ in 0..10 {
                if let Some((d, from)) = c.recv(Duration::from_secs(2)) {
                    let _ = c.sock.send_to(&d, from);
                }
            }
        });
        let (code, text, err) = e.ctl(&[
            "capture",
            "t",
            "--all",
            out.to_str().unwrap(),
            "--count",
            "12",
            "--snaplen",
            "64",
            "--timeout",
            "5",
        ]);
        traffic.join().unwrap();
        echo.join().unwrap();
        assert_eq!(code, 0, "{err}");
        assert!(text.contains("12 frame(s) of t"), "{text}");
        let (snaplen, frames) = omerta_it::read_pcapng(&std::fs::read(&out).unwrap());
        assert_eq!((snaplen, frames.len()), (64, 12), "the header's snaplen is what was kept");
        let forwarded_out = frames.iter().filter(|f| !f.to_vm && f.comment.is_none()).count();
        let dropped = frames.iter().filter(|f| f.comment.as_deref() == Some("dropped: not_allowed")).count();
        let to_vm = frames.iter().filter(|f| f.to_vm).count();
        assert!(
            forwarded_out > 0 && dropped > 0 && to_vm > 0,
            "both ways, forwarded and dropped: {forwarded_out} out, {dropped} dropped, {to_vm} to the VM"
        );
        assert!(frames.iter().all(|f| f.caplen <= 64), "cut at the snaplen");
        assert!(frames.iter().any(|f| f.len > 64 && f.caplen == 64), "a long frame cut, its length kept");
        // Real tools read it.
        let tcpdump = std::process::Command::new("tcpdump").args(["-n", "-r"]).arg(&out).output();
        if let Ok(o) = tcpdump {
            assert!(o.status.success(), "tcpdump -r: {}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 12);
        }
    });
}

/// An HTTP GET of `path` on 127.0.0.1:`port`: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: omerta\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

#[test]
fn the_metrics_endpoint_serves_what_omertactl_metrics_shows_to_prometheus() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
        sys::set_inheritable(theirs.as_fd()).unwrap();
        let spec = format!("name=t,handle=fd:{},consumer={}", theirs.as_raw_fd(), c.endpoint());
        let e = EngineProc::start(
            ns,
            "metrics",
            &["--vm".into(), spec, "--metrics-listen".into(), format!("127.0.0.1:{port}")],
        );
        let vm = SyntheticVm { end: VmEnd::Dgram(UnixDatagram::from(ours)), id: engine::VmIdentity::default() };
        vm.send(&vm.udp(c.endpoint(), b"x"));
        c.recv(WAIT).expect("forwarded");
        vm.send(&vm.udp(ep([8, 8, 8, 8], 53), b"y"));
        e.wait_json("published", &["stats", "t"], 5, |s| s[0]["forwarded_udp"] == 1 && s[0]["dropped"] == 1);
        let (status, body) = http_get(port, "/metrics");
        assert!(status.ends_with("200 OK"), "{status}");
        let (_, text, _) = e.ctl(&["metrics"]);
        assert_eq!(body, text, "the scrape is the text of omertactl metrics");
        // A Prometheus text parser reads it.
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| match &s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => *v,
                    other => panic!("{name}: {other:?}"),
                })
        };
        assert_eq!(value("omerta_forwarded_udp_total", &[("vm", "t")]), Some(1.0), "{body}");
        assert_eq!(value("omerta_drops_total", &[("vm", "t"), ("reason", "not_allowed")]), Some(1.0));
        assert_eq!(value("omerta_vm_up", &[("vm", "t")]), Some(1.0));
        // The state is a value, so the VM's label set stays the same all its life.
        assert_eq!(value("omerta_vm_state", &[("vm", "t")]), Some(1.0));
        assert!(!body.contains("state=\""), "no state label: {body}");
        // The per-frame latency is a histogram with _sum and _count, buckets ending in +Inf.
        let hist = scrape
            .samples
            .iter()
            .find(|s| s.metric == "omerta_frame_latency_seconds" && s.labels.get("direction") == Some("vm_to_host"))
            .unwrap_or_else(|| panic!("no latency histogram: {body}"));
        let prometheus_parse::Value::Histogram(buckets) = &hist.value else { panic!("{:?}", hist.value) };
        assert!(buckets.last().is_some_and(|b| b.less_than.is_infinite() && b.count >= 1.0), "{buckets:?}");
        // Cumulative, ending at the count: what histogram_quantile needs.
        assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "cumulative: {buckets:?}");
        let count: Option<f64> = body
            .lines()
            .find_map(|l| l.strip_prefix("omerta_frame_latency_seconds_count{vm=\"t\",direction=\"vm_to_host\"} "))
            .and_then(|v| v.trim().parse().ok());
        let inf = buckets.last().map(|b| b.count);
        assert!(count.is_some() && count == inf, "+Inf bucket {inf:?} equals _count {count:?}");
        assert!(body.contains("omerta_frame_latency_seconds_sum{vm=\"t\",direction=\"vm_to_host\"}"), "{body}");
        assert!(body.contains("omerta_frame_latency_seconds_count{vm=\"t\",direction=\"vm_to_host\"} "), "{body}");
        // Nothing else is served.
        assert!(http_get(port, "/").0.contains("404"));
        // A client that connects and says nothing holds the endpoint for its deadline only.
        let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t0 = std::time::Instant::now();
        let (status, _) = http_get(port, "/metrics");
        assert!(status.ends_with("200 OK"), "{status}");
        assert!(t0.elapsed() < Duration::from_secs(9), "served after the silent client's deadline: {:?}", t0.elapsed());
        drop(silent);
        let (code, err) = e.stop();
        assert_eq!(code, Some(0), "{err}");
    });
}

#[test]
fn omertactl_answers_json_everywhere_and_text_in_human_units() {
    sealed(|ns| {
        let c = Consumer::new(ns);
        let (e, vm, _keep) = engine_with_vm(ns, "human", &c, "");
        for _ in 0..3 {
            vm.send(&vm.udp(c.endpoint(), &[1u8; 1000]));
        }
        vm.send(&vm.udp(ep([8, 8, 8, 8], 53), b"x"));
        e.wait_json("published", &["stats", "t"], 5, |s| s[0]["frames_from_vm"] == 4);
        // Errors are JSON with --json, wherever it stands, with the exit status in them.
        for (args, status) in [
            (vec!["--json", "vm", "show", "nope"], 3),
            (vec!["vm", "show", "nope", "--json"], 3),
            (vec!["--json", "vm", "frobnicate"], 2),
            (vec!["allow", "add", "t", "not-an-endpoint", "--json"], 2),
        ] {
            let (code, out, err) = e.ctl(&args);
            assert_eq!(code, status, "{args:?}: {err}");
            let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{args:?}: not JSON: {out} {err}"));
            assert_eq!(
                (v["ok"].as_bool(), v["status"].as_u64()),
                (Some(false), Some(u64::try_from(status).unwrap())),
                "{v}"
            );
            assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
        // Every command answers JSON with it, before or after its words.
        for args in [
            vec!["status", "--json"],
            vec!["vm", "stop", "t", "--json"],
            vec!["vm", "restart", "t", "--json"],
            vec!["allow", "list", "t", "--json"],
            vec!["metrics", "--json"],
            vec!["log", "t", "--json"],
        ] {
            let (code, out, err) = e.ctl(&args);
            if args[1] == "restart" {
                // An fd handle cannot be reopened: refused, as JSON.
                assert_eq!(code, 4, "{err}");
            } else {
                assert_eq!(code, 0, "{args:?}: {err}");
            }
            assert!(serde_json::from_str::<Value>(&out).is_ok(), "{args:?}: not JSON: {out}");
        }
        // Text for people: durations, RFC 3339 times, bytes with units.
        let (_, status, _) = e.ctl(&["status"]);
        assert!(status.contains(" up ") && status.contains(" s,"), "{status}");
        let (_, log, _) = e.ctl(&["log", "t"]);
        let first = log.lines().next().unwrap_or_default();
        let time = first.split(' ').next().unwrap_or_default();
        assert!(time.len() == 24 && time.as_bytes()[10] == b'T' && time.ends_with('Z'), "{log}");
        let (_, stats, _) = e.ctl(&["stats", "t"]);
        assert!(stats.lines().any(|l| l.contains("bytes_from_vm") && l.contains(" KiB)")), "{stats}");
    });
}
