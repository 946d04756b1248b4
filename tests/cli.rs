//! The `omerta-engine` binary as a user runs it.
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use omerta_it::{workspace_bin, Consumer, SyntheticVm, VmEnd};

#[test]
fn help_documents_every_key_and_bad_input_is_one_line() {
    omerta_it::private_netns(|ns| {
        let out = Command::new(omerta_it::engine_bin(ns)).arg("--help").output().unwrap();
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
            let out = Command::new(omerta_it::engine_bin(ns)).args(&args).output().unwrap();
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
    omerta_it::private_netns(|ns| {
        let dir = std::env::temp_dir().join(format!("omerta-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("engine.toml");
        std::fs::write(
        &file,
        "backend = \"portable\"\n[[vm]]\nname = \"vm0\"\nhandle = \"fd:3\"\nconsumer = [\"203.0.113.7:51820\"]\nmtu = 1400\n",
    )
    .unwrap();
        let out = Command::new(omerta_it::engine_bin(ns))
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

/// `omerta-engine ARGS --vm name=NAME,handle=fd:N,consumer=C` with the VM on a socketpair:
/// the child (stderr piped) and the VM's end. In a private namespace only.
fn engine_on_socketpair(
    ns: &omerta_it::Netns,
    name: &str,
    args: &[&str],
    c: &Consumer,
) -> (std::process::Child, SyntheticVm) {
    let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
    sys::set_inheritable(std::os::fd::AsFd::as_fd(&theirs)).unwrap();
    let child = Command::new(omerta_it::engine_bin(ns))
        .args(args)
        .args(["--vm", &format!("name={name},handle=fd:{},consumer={}", theirs.as_raw_fd(), c.endpoint())])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(theirs);
    let vm = SyntheticVm {
        end: VmEnd::Dgram(std::os::unix::net::UnixDatagram::from(ours)),
        id: engine::VmIdentity::default(),
    };
    (child, vm)
}

/// Sends `payload` from the VM to `c` every 100 ms until it arrives (5 s at most): what arrived.
fn forward_one(vm: &SyntheticVm, c: &Consumer, payload: &[u8]) -> Option<Vec<u8>> {
    for _ in 0..50 {
        vm.send(&vm.udp(c.endpoint(), payload));
        if let Some((d, _)) = c.recv(Duration::from_millis(100)) {
            return Some(d);
        }
    }
    None
}

#[test]
fn engine_binary_forwards_and_stops_cleanly_on_sigterm() {
    // In a private namespace: the harness's consumer lives there, and the engine can send
    // nowhere else.
    omerta_it::private_netns(|ns| {
        let c = Consumer::new(ns);
        let (child, vm) = engine_on_socketpair(ns, "demo", &[], &c);
        let got = forward_one(&vm, &c, b"through the binary");
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
    // Engines, workers and guests start only through the harness, whose helpers take the
    // proof of a private network namespace: no test file starts one around it (perf's
    // engine-process helper, which the harness wraps, included).
    const BANNED: [&str; 7] = [
        "worker::spawn(",
        "Command::new(\"qemu",
        "hv::new()",
        "unshare(",
        "engine_proc::",
        "Dut::start",
        "EngineProc::launch(",
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"));
    for f in ["cli.rs", "cloud.rs", "control.rs", "dataplane.rs", "mesh.rs", "package.rs", "realvm.rs", "security.rs"] {
        let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        // This test's own lines name what it looks for.
        let mut this_test = false;
        for (n, line) in text.lines().enumerate() {
            this_test = (this_test || line.starts_with("fn the_harness_is_the_only_way_in()")) && line != "}";
            let code = line.split("//").next().unwrap_or_default();
            if this_test {
                continue;
            }
            for banned in BANNED {
                assert!(!code.contains(banned), "tests/{f}:{}: starts something around the harness: {line}", n + 1);
            }
        }
    }
}

/// A cloud image start as the mesh daemon would send it.
fn image_spec() -> String {
    let s = api::ImageStart::new(
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
            .replace("SNAPLEN", "128")
            .replace(" [all]", " all");
        assert!(api::parse(&filled).is_ok(), "documented request '{req}' does not parse");
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

/// True for an RFC 3339 UTC time as the logs write it: `2026-12-06T17:00:00.123Z`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn every_binary_has_version_help_and_status_2_for_bad_usage() {
    omerta_it::private_netns(|ns| {
        for (bin, bad) in [
            ("omerta-engine", vec!["--bogus"]),
            ("omertactl", vec!["--bogus"]),
            ("omertactl", vec!["vm", "frobnicate"]),
            ("omertad", vec!["start", "--bogus"]),
            ("omerta", vec!["--bogus"]),
        ] {
            let path = if bin == "omerta-engine" { omerta_it::engine_bin(ns) } else { workspace_bin(bin) };
            let v = Command::new(&path).arg("--version").output().unwrap();
            assert!(v.status.success(), "{bin} --version: {:?}", v.status);
            assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("{bin} {}", env!("CARGO_PKG_VERSION")));
            let h = Command::new(&path).arg("--help").output().unwrap();
            assert!(h.status.success() && String::from_utf8_lossy(&h.stdout).starts_with("Usage: "), "{bin} --help");
            assert!(String::from_utf8_lossy(&h.stdout).contains("--version"), "{bin} --help names --version");
            let out = Command::new(&path).args(&bad).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{bin} {bad:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    });
}

#[test]
fn log_lines_carry_their_level_when_stderr_is_the_journal() {
    // systemd names the journal's stream in JOURNAL_STREAM (DEV:INO of the unit's stderr): a
    // line then starts with its syslog priority, which journald keeps as the entry's level.
    omerta_it::private_netns(|ns| {
        use std::os::unix::fs::MetadataExt as _;
        let path = std::env::temp_dir().join(format!("omerta-journal-{}", std::process::id()));
        let run = |journal: bool| {
            let f = std::fs::File::create(&path).unwrap();
            let m = f.metadata().unwrap();
            let stream =
                if journal { format!("{}:{}", m.dev(), m.ino()) } else { format!("{}:{}", m.dev(), m.ino() + 1) };
            let vm = "name=a,handle=dgram:/nonexistent-omerta/a.sock,consumer=203.0.113.7:51820";
            let st = Command::new(omerta_it::engine_bin(ns))
                .args(["--vm", vm, "--check", "-v"])
                .env("JOURNAL_STREAM", stream)
                .stdout(Stdio::null())
                .stderr(f)
                .status()
                .unwrap();
            assert!(st.success(), "{}", std::fs::read_to_string(&path).unwrap_or_default());
            std::fs::read_to_string(&path).unwrap()
        };
        let journal = run(true);
        assert!(journal.lines().any(|l| l.starts_with("<7>") && l.contains(" DEBUG ")), "{journal}");
        assert!(journal.lines().all(|l| l.starts_with('<')), "{journal}");
        // Another stream than its stderr (a child that inherited the variable): plain lines.
        let plain = run(false);
        assert!(plain.lines().any(|l| l.contains(" DEBUG ")) && !plain.contains("<7>"), "{plain}");
        let _ = std::fs::remove_file(&path);
    });
}

#[test]
fn engine_check_verifies_this_host_and_flags_beat_the_environment() {
    omerta_it::private_netns(|ns| {
        let dir = std::env::temp_dir().join(format!("omerta-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let vm = |extra: &str| {
            format!("name=a,handle=dgram:{}/not-yet/a.sock,consumer=203.0.113.7:51820,mtu=1400{extra}", dir.display())
        };
        let run = |args: &[&str], env: &[(&str, &str)]| {
            Command::new(omerta_it::engine_bin(ns)).envs(env.iter().copied()).args(args).output().unwrap()
        };
        let cpu = sys::allowed_cpus()[0];
        let good = vm(&format!(",cpu={cpu},bind=127.0.0.1"));
        // --backend wins over OMERTA_BACKEND (whose bad value is then never read).
        let out = run(&["--vm", &good, "--check", "--backend", "portable"], &[("OMERTA_BACKEND", "bogus")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for want in ["backend portable", "mtu 1400", &format!("cpu {cpu}"), "bind 127.0.0.1:0", "does not exist yet"] {
            assert!(text.contains(want), "--check prints {want:?}: {text}");
        }
        // Without the flag, the environment decides.
        let out = run(&["--vm", &good, "--check"], &[("OMERTA_BACKEND", "portable")]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("backend portable"));
        let twice = [vm(""), vm(",mtu=1300")];
        let (cpu999, bind_absent) = (vm(",cpu=999"), vm(",bind=192.0.2.1"));
        type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
        let bad: Vec<Case> = vec![
            (vec!["--vm", &cpu999, "--check"], vec![], "cpu=999"),
            (vec!["--vm", &bind_absent, "--check"], vec![], "bind=192.0.2.1"),
            (vec!["--vm", &good, "--image-dir", "/nonexistent/images", "--check"], vec![], "--image-dir"),
            (vec!["--vm", &twice[0], "--vm", &twice[1], "--check"], vec![], "described twice"),
            (vec!["--vm", &good, "--check"], vec![("OMERTA_LOG", "loud")], "OMERTA_LOG"),
            (vec!["--vm", &good, "--check", "--log-format", "xml"], vec![], "--log-format"),
            (vec!["--vm", &good, "--check", "-q", "-v"], vec![], "contradict"),
            (vec!["--vm", &good, "--check", "--backend", "dpdk"], vec![], "--backend"),
        ];
        for (args, env, needle) in bad {
            let out = run(&args, &env);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
            assert!(err.contains(needle), "{args:?}: {needle:?} in {err}");
        }
        assert!(!dir.exists(), "--check makes nothing");
    });
}

#[test]
fn engine_logs_rfc3339_text_or_json_lines_at_the_level_asked() {
    omerta_it::private_netns(|ns| {
        for flags in [vec![], vec!["--log-format", "json", "-v"], vec!["-q"]] {
            let c = Consumer::new(ns);
            let args: Vec<&str> = flags.iter().copied().chain(["--no-control"]).collect();
            let (child, vm) = engine_on_socketpair(ns, "logs", &args, &c);
            // Running: a datagram went through.
            let through = forward_one(&vm, &c, b"x").is_some();
            assert!(through, "{flags:?}: nothing forwarded");
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{flags:?}: {err}");
            let json = flags.contains(&"json");
            let mut levels = Vec::new();
            for line in err.lines() {
                if json {
                    let v: serde_json::Value =
                        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                    assert!(is_rfc3339(v["time"].as_str().unwrap_or("")), "{line}");
                    assert_eq!(v["program"], "omerta-engine", "{line}");
                    assert!(v["msg"].is_string(), "{line}");
                    levels.push(v["level"].as_str().unwrap_or("").to_uppercase());
                } else {
                    let mut w = line.split(' ');
                    assert!(is_rfc3339(w.next().unwrap_or("")), "{line}");
                    assert_eq!(w.next(), Some("omerta-engine"), "{line}");
                    levels.push(w.next().unwrap_or("").to_string());
                }
            }
            let has = |l: &str| levels.iter().any(|x| x == l);
            match flags.first().copied() {
                None => assert!(has("INFO") && !has("DEBUG"), "{err}"),
                Some("-q") => assert!(!has("INFO") && !has("DEBUG"), "-q: warnings and errors only: {err}"),
                _ => assert!(has("DEBUG") && has("INFO"), "-v: debug lines too: {err}"),
            }
        }
    });
}

#[test]
fn sighup_reloads_the_config_file_and_systemd_hears_readiness() {
    use omerta_it::EngineProc;
    omerta_it::private_netns(|ns| {
        // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
        let ndir = std::env::temp_dir().join(format!("omerta-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&ndir);
        std::fs::create_dir_all(&ndir).unwrap();
        control::launcher::give_to_engine_user(&ndir).unwrap();
        let npath = ndir.join("notify");
        let manager = std::os::unix::net::UnixDatagram::bind(&npath).unwrap();
        control::launcher::give_to_engine_user(&npath).unwrap();
        manager.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let next = || {
            let mut b = [0u8; 256];
            let n = manager.recv(&mut b).expect("a notification from the engine");
            String::from_utf8_lossy(&b[..n]).into_owned()
        };
        let file = ndir.join("engine.toml");
        let vm = |name: &str, consumer: &str| {
            format!(
                "[[vm]]\nname = \"{name}\"\nhandle = \"dgram:{}/{name}.sock\"\nconsumer = [\"{consumer}\"]\n",
                ndir.display()
            )
        };
        std::fs::write(&file, vm("a", "203.0.113.7:51820")).unwrap();
        let npath_s = npath.to_string_lossy().into_owned();
        let e = EngineProc::start_env(
            ns,
            "reload",
            &["--config".into(), file.to_string_lossy().into_owned()],
            &[("NOTIFY_SOCKET", &npath_s)],
        );
        assert!(next().starts_with("READY=1"), "ready once the configured VM runs");
        e.wait_json("vm a running", &["vm", "show", "a"], 10, |v| v["state"] == "running");
        // A VM of the control socket's: a reload never touches it.
        assert_eq!(e.add_vm("c", "consumer=203.0.113.9:1").0, 0);
        let hup = || {
            Command::new("kill").args(["-HUP", &e.pid().to_string()]).status().unwrap();
            assert_eq!(next(), "RELOADING=1");
            assert!(next().starts_with("READY=1"));
        };
        // a's allowlist changes, b is new.
        std::fs::write(&file, vm("a", "203.0.113.8:51820") + &vm("b", "203.0.113.7:2")).unwrap();
        hup();
        let allow = e.json(&["allow", "list", "a"]);
        assert_eq!(allow["allow"], serde_json::json!(["203.0.113.8:51820"]), "{allow}");
        e.wait_json("vm b running", &["vm", "show", "b"], 10, |v| v["state"] == "running");
        // A file that does not parse changes nothing, and the engine lives on.
        std::fs::write(&file, "[[vm]]\nname = 3\n").unwrap();
        hup();
        let names = |v: serde_json::Value| {
            let mut n: Vec<String> =
                v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
            n.sort();
            n
        };
        assert_eq!(names(e.json(&["vm", "list"])), ["a", "b", "c"]);
        // a removed from the file: removed; c stays.
        std::fs::write(&file, vm("b", "203.0.113.7:2")).unwrap();
        hup();
        assert_eq!(names(e.json(&["vm", "list"])), ["b", "c"]);
        // b replaced through the control socket is the socket's now: a reload neither removes
        // nor changes it, and says why it changed nothing.
        assert_eq!(e.json(&["vm", "remove", "b"])["state"], "removed");
        assert_eq!(e.add_vm("b", "consumer=203.0.113.9:9").0, 0);
        std::fs::write(&file, vm("b", "203.0.113.7:3")).unwrap();
        hup();
        assert_eq!(e.json(&["allow", "list", "b"])["allow"], serde_json::json!(["203.0.113.9:9"]));
        // An inherited fd handle exists only at start: a reload cannot add one.
        std::fs::write(&file, "[[vm]]\nname = \"f\"\nhandle = \"fd:3\"\nconsumer = [\"203.0.113.7:4\"]\n").unwrap();
        hup();
        assert_eq!(names(e.json(&["vm", "list"])), ["b", "c"]);
        let (code, err) = e.stop();
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("SIGHUP: configuration reloaded: 1 added, 0 removed, 1 allowlist(s) set"), "{err}");
        assert!(err.contains("the running configuration is kept") && err.contains("line 2"), "{err}");
        assert!(err.contains("vm 'b' exists already (not from the configuration)"), "{err}");
        assert!(err.contains("vm 'f': an inherited fd handle exists only at start"), "{err}");
        assert_eq!(next(), "STOPPING=1");
        let _ = std::fs::remove_dir_all(ndir);
    });
}

/// Words of `text` joined by single spaces (a rendered man page wraps and indents).
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn man_pages_say_what_help_says_and_the_systemd_units_verify() {
    if !omerta_it::require_commands(&["man", "systemd-analyze"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("omerta-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("man8")).unwrap();
    let bins = ["omerta-engine", "omertactl", "omertad", "omerta"];
    // The pages as `make man` makes them, read back as `man` shows them.
    let bin_dir = workspace_bin("omertactl").parent().unwrap().to_path_buf();
    for b in bins {
        let page = Command::new(bin_dir.join("omerta-man")).arg(bin_dir.join(b)).arg("8").output().unwrap();
        assert!(page.status.success(), "omerta-man {b}: {}", String::from_utf8_lossy(&page.stderr));
        let path = dir.join(format!("man8/{b}.8"));
        std::fs::write(&path, &page.stdout).unwrap();
        let shown = Command::new("man").env("MANWIDTH", "300").arg("-l").arg(&path).output().unwrap();
        assert!(shown.status.success(), "man -l {b}.8: {}", String::from_utf8_lossy(&shown.stderr));
        let shown = words(&String::from_utf8_lossy(&shown.stdout));
        // Every line of the top help and of each command's help is in the page.
        let help = |args: &[&str]| {
            let o = Command::new(bin_dir.join(b)).args(args).arg("--help").output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let mut helps = vec![help(&[])];
        if b != "omerta-engine" {
            helps.push(help(&[if b == "omertad" { "start" } else { "vm" }]));
        }
        for h in helps {
            for line in h.lines().map(words).filter(|l| !l.is_empty()) {
                assert!(shown.contains(&line), "{b}.8 lacks the help line {line:?}");
            }
        }
        assert!(shown.contains(&format!("{b} {}", env!("CARGO_PKG_VERSION"))), "{b}.8 names its version");
    }
    // The units, their programs at this build's binaries: systemd-analyze finds no fault (an
    // unknown or misspelt directive is a line on stderr), and the man pages they name exist.
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let mut names = Vec::new();
    for u in ["omerta-engine.service", "omerta-launcher.service", "omertad@.service"] {
        let text = std::fs::read_to_string(units.join(u)).unwrap();
        std::fs::write(dir.join(u), text.replace("/usr/bin/", &format!("{}/", bin_dir.display()))).unwrap();
        names.push(if u.contains('@') { dir.join("omertad@net1.service") } else { dir.join(u) });
    }
    std::fs::copy(dir.join("omertad@.service"), dir.join("omertad@net1.service")).unwrap();
    let out = Command::new("systemd-analyze").env("MANPATH", &dir).arg("verify").args(&names).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
    // What the operator relies on: readiness, reload, and root limited to the launcher's needs.
    let engine = std::fs::read_to_string(units.join("omerta-engine.service")).unwrap();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RuntimeDirectory=omerta",
        "SystemCallFilter=",
    ] {
        assert!(engine.lines().any(|l| l.starts_with(want)), "omerta-engine.service: {want}");
    }
    let caps = engine.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).unwrap_or_default();
    for held in ["CAP_SETUID", "CAP_SETGID", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
        assert!(caps.split(' ').any(|c| c == held), "the launcher needs {held}");
    }
    // The unit-wide system call filter denies only what nothing of the unit calls: never
    // seccomp (the engine's per-thread filters, QEMU's sandbox), rings, namespaces, threads.
    let denied_groups = engine
        .lines()
        .find_map(|l| l.strip_prefix("SystemCallFilter=~"))
        .expect("a deny-list system call filter")
        .split_whitespace()
        .collect::<Vec<_>>();
    let mut denied = String::new();
    for g in &denied_groups {
        let o = Command::new("systemd-analyze").args(["syscall-filter", g]).output().unwrap();
        assert!(o.status.success(), "systemd-analyze syscall-filter {g}");
        denied.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    let denied: Vec<&str> = denied.split_whitespace().collect();
    for needed in [
        "seccomp",
        "io_uring_setup",
        "io_uring_enter",
        "unshare",
        "setns",
        "mount",
        "clone3",
        "prctl",
        "setresuid",
        "setgroups",
        "sched_setaffinity",
        "mbind",
        "kill",
    ] {
        assert!(!denied.contains(&needed), "omerta-engine.service denies {needed}, which the engine or QEMU calls");
    }
    for never in ["CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO", "CAP_BPF", "CAP_SYS_BOOT", "CAP_MKNOD"] {
        assert!(!caps.contains(never), "{never} is in no program's needs (sys/src/confine_linux.rs)");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_demos_explain_every_result_line_their_guest_prints() {
    // The guest helper's result words (tools/src/bin/omerta-guest.rs) mean nothing to a new
    // user: each one a demo's guest prints is explained by a line the demo echoes.
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (script, words) in [
        ("scripts/demo-small.sh", &["PING-REPLIES", "REPLY:", "NO-REPLY", "SENT", "RAW-SENT"][..]),
        ("scripts/demo.sh", &["sent"][..]),
    ] {
        let text = std::fs::read_to_string(top.join(script)).unwrap();
        let explained: String =
            text.lines().filter(|l| l.trim_start().starts_with("echo")).collect::<Vec<_>>().join("\n");
        for w in words {
            assert!(explained.contains(w), "{script} prints {w} without a line that says what it means");
        }
    }
}
