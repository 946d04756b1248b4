//! The `omerta-engine` binary as a user runs it.
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use omerta_it::{workspace_bin, Consumer, SyntheticVm, VmEnd};

#[test]
fn help_documents_every_key_and_bad_input_is_one_line() {
    omerta_it::private_netns(|| {
        let out = Command::new(workspace_bin("omerta-engine")).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for (key, _) in control::config::KEYS {
            assert!(help.contains(&format!("  {key}=")), "--help lacks {key}=");
        }
        for args in [
            vec!["--vm", "name=a,handle=fd:3"],
            vec!["--vm", "name=a,handle=fd:3,consumer=127.0.0.1:9"],
            vec!["--vm", "name=a,handle=fd:3,consumer=203.0.113.7:1,mode=nope"],
            vec!["--backend", "dpdk", "--vm", "name=a,handle=fd:3,consumer=203.0.113.7:1"],
            vec!["--no-control"],
        ] {
            let out = Command::new(workspace_bin("omerta-engine")).args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err}");
            assert!(!err.contains("panicked"));
        }
    });
}

#[test]
fn omertactl_refuses_a_request_it_cannot_encode_before_connecting() {
    // No engine listens at this path: a request that would not read back as itself is bad
    // usage (2), said in one line, not "the engine is not running" (5).
    let nowhere = std::env::temp_dir().join(format!("omerta-nowhere-{}.sock", std::process::id()));
    for args in [vec!["vm", "show", "a b"], vec!["vm", "add", "name=a,\nhandle=fd:3"], vec!["stats", ""]] {
        let out = Command::new(workspace_bin("omertactl")).arg("--socket").arg(&nowhere).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    let out = Command::new(workspace_bin("omertactl")).arg("--socket").arg(&nowhere).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(5), "a good request meets the missing engine");
}

#[test]
fn config_file_with_flag_override() {
    omerta_it::private_netns(|| {
        let dir = std::env::temp_dir().join(format!("omerta-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("engine.toml");
        std::fs::write(
        &file,
        "backend = \"portable\"\n[[vm]]\nname = \"vm0\"\nhandle = \"fd:3\"\nconsumer = [\"203.0.113.7:51820\"]\nmtu = 1400\n",
    )
    .unwrap();
        let out = Command::new(workspace_bin("omerta-engine"))
            .arg("--config")
            .arg(&file)
            .args(["--vm", "name=vm0,mode=conntrack", "--check"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            text.contains("vm vm0: handle fd:3")
                && text.contains("mode conntrack")
                && text.contains("203.0.113.7:51820"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(dir);
    });
}

#[test]
fn engine_binary_forwards_and_stops_cleanly_on_sigterm() {
    // In a private namespace: the harness's consumer lives there, and the engine can send
    // nowhere else.
    omerta_it::private_netns(|| {
        let (ours, theirs) = engine::io::socketpair(libc::SOCK_DGRAM).unwrap();
        engine::io::set_inheritable(std::os::fd::AsFd::as_fd(&theirs)).unwrap();
        let c = Consumer::new();
        let child = Command::new(workspace_bin("omerta-engine"))
            .args(["--vm", &format!("name=demo,handle=fd:{},consumer={}", theirs.as_raw_fd(), c.endpoint())])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(theirs);
        let vm = SyntheticVm {
            end: VmEnd::Dgram(std::os::unix::net::UnixDatagram::from(ours)),
            id: engine::VmIdentity::default(),
        };
        let mut got = None;
        for _ in 0..50 {
            vm.send(&vm.udp(c.endpoint(), b"through the binary"));
            if let Some((d, _)) = c.recv(Duration::from_millis(100)) {
                got = Some(d);
                break;
            }
        }
        assert_eq!(got.as_deref(), Some(&b"through the binary"[..]));
        // End only the process this test started, by its pid.
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("vm demo: frames_from_vm=") && err.contains(" forwarded_udp="),
            "final counters are logged: {err}"
        );
        let _ = std::io::stderr().flush();
    });
}

#[test]
fn the_harness_is_the_only_way_in() {
    // Engines, workers and guests start only through the harness, which refuses to start
    // them outside a private network namespace: no test file starts one around it.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"));
    for f in ["cli.rs", "control.rs", "dataplane.rs", "realvm.rs", "security.rs"] {
        let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if code.contains("banned") {
                continue;
            }
            for banned in ["worker::spawn(", "Command::new(\"qemu", "hv::new()", "unshare("] {
                assert!(!code.contains(banned), "tests/{f}:{}: starts something around the harness: {line}", n + 1);
            }
        }
    }
}

/// A cloud image start as the mesh daemon would send it.
fn image_spec() -> String {
    let s = control::protocol::ImageStart::new(
        "a",
        "/img",
        "203.0.113.7:51820".parse().unwrap(),
        "wD0XJIBI8Cw+U9mDnz+jNyTXQqTpIiaCjBj8kgNTmTE=",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKJGb+MXI3isFSgCCTF1+ZyLntVeIuD9X/phPoWvNPhk",
    );
    s.to_string()
}

#[test]
fn control_protocol_doc_agrees_with_the_parser_and_omertactl() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/control-protocol.md")).unwrap();
    // Every request the doc's table shows parses (placeholders filled in).
    let mut seen = 0;
    let requests =
        doc.split("## Requests").nth(1).and_then(|r| r.split("## Replies").next()).expect("a Requests section");
    for line in requests.lines().filter(|l| l.starts_with("| `")) {
        let req = line.trim_start_matches("| `").split('`').next().unwrap();
        let filled = req
            .replace("[NAME]", "vm0")
            .replace("NAME", "vm0")
            .replace("EP[,EP...]", "203.0.113.7:51820")
            .replace("EP", "203.0.113.7:51820")
            .replace("IMAGE-SPEC", &image_spec())
            .replace("SPEC", "name=a,handle=dgram:/x")
            .replace("COUNT", "5")
            .replace("SNAPLEN", "128");
        assert!(control::protocol::parse(&filled).is_ok(), "documented request '{req}' does not parse");
        seen += 1;
    }
    assert!(seen >= 17, "found {seen} documented requests");
    // Every omertactl command is documented, and every documented exit status is in --help.
    let help = Command::new(workspace_bin("omertactl")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in ["status", "vm", "allow", "stats", "latency", "log", "metrics", "capture"] {
        assert!(help.contains(&format!("  {cmd} ")), "omertactl --help lacks {cmd}");
        assert!(doc.contains(&format!("`omertactl {cmd}")), "docs/control-protocol.md lacks omertactl {cmd}");
    }
    for code in ["2 bad usage", "3 not found", "4 refused", "5 engine not running"] {
        assert!(help.contains(code), "omertactl --help lacks exit status {code}");
    }
}
