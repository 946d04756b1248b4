//! The grammar's every error, and the file and flag forms agreeing.
use super::*;

fn err(spec: &str) -> String {
    vm_from_spec(spec).unwrap_err().to_string()
}

#[test]
fn defaults_and_full_spec() {
    let vm = vm_from_spec("name=vm0,handle=fd:3,consumer=203.0.113.7:51820").unwrap();
    assert_eq!(vm.identity, VmIdentity::default());
    assert_eq!(vm.mode, Mode::Filtered);
    assert_eq!(vm.handle, HandleSpec::DgramFd(3));
    assert_eq!(vm.bind, "0.0.0.0:0".parse().unwrap());
    let vm = vm_from_spec(
        "name=b,handle=dgram:/tmp/e.sock,peer=/tmp/q.sock,consumer=203.0.113.7:1+198.51.100.2:2,mode=sampled,\
         sample-rate=0.05,seed=7,cpu=1,mac=52:54:00:00:00:02,ip=192.168.50.10/24,gateway=192.168.50.1,mtu=1400,\
         bind=127.0.0.1,allow-special=yes",
    )
    .unwrap();
    assert_eq!(vm.consumers.len(), 2);
    assert_eq!(vm.mode, Mode::Sampled(SampleRate::new(0.05).unwrap()));
    assert_eq!(vm.handle, HandleSpec::Dgram { path: "/tmp/e.sock".into(), peer: Some("/tmp/q.sock".into()) });
    assert_eq!((vm.cpu, vm.seed, vm.identity.mtu), (Some(1), Some(7), 1400));
    assert_eq!(vm.bind, "127.0.0.1:0".parse().unwrap());
    assert!(!vm.busy_poll);
    assert!(vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,busy-poll=yes").unwrap().busy_poll);
    assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,busy-poll=maybe").contains("busy-poll=maybe"));
    // Adaptive polling: 50 µs after traffic by default, 0 to 1000 µs per VM.
    assert_eq!(vm.spin, std::time::Duration::from_micros(50));
    let spin = |v: &str| vm_from_spec(&format!("name=a,handle=fd:3,consumer=203.0.113.7:1,spin-us={v}"));
    assert_eq!(spin("0").unwrap().spin, std::time::Duration::ZERO);
    assert_eq!(spin("1000").unwrap().spin, std::time::Duration::from_millis(1));
    assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,spin-us=1001").contains("spin-us"));
    // DHCP: on by default with an hour's lease; off, or another lease, per VM.
    assert_eq!(vm.dhcp, Some(3600));
    assert_eq!(vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,dhcp=no").unwrap().dhcp, None);
    assert_eq!(vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,dhcp-lease=120").unwrap().dhcp, Some(120));
    assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,dhcp-lease=59").contains("dhcp-lease=59"));
    assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,dhcp=sometimes").contains("dhcp=sometimes"));
}

/// seed: testSamplingRateConfigurable
#[test]
fn sampling_rate_configurable() {
    let vm = vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled,sample-rate=0.05").unwrap();
    let Mode::Sampled(rate) = vm.mode else { panic!("not sampled") };
    assert_eq!(rate.get(), 0.05);
    let vm = vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled").unwrap();
    assert_eq!(vm.mode, Mode::Sampled(SampleRate::DEFAULT));
    assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled,sample-rate=0").contains("not in (0, 1]"));
}

#[test]
fn errors_are_one_line_and_name_the_key() {
    let cases = [
        ("handle=fd:3,consumer=203.0.113.7:1", "name is required"),
        ("name=a,consumer=203.0.113.7:1", "handle= is required"),
        ("name=a,handle=tcp:1,consumer=203.0.113.7:1", "handle=tcp:1"),
        ("name=a,handle=fd:-1,consumer=203.0.113.7:1", "not a file descriptor"),
        ("name=a,handle=fd:3", "at least one consumer"),
        ("name=a,handle=fd:3,consumer=127.0.0.1:5", "loopback"),
        ("name=a,handle=fd:3,consumer=nope", "consumer=nope"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=bridge", "mode=bridge"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=direct", "direct"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,mtu=100", "MTU 100"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,ip=10.0.9.9/24", "gateway 10.0.2.2"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,colour=red", "unknown key 'colour'"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,sample-rate=0.5", "only with mode=sampled"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,peer=/x", "only with handle=dgram"),
        ("name=a b,handle=fd:3,consumer=203.0.113.7:1", "name is required"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,oops", "not key=value"),
        ("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled,seed=7", "seed= makes the sampling predictable"),
    ];
    for (spec, want) in cases {
        let e = err(spec);
        assert!(e.contains(want), "{spec}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    assert!(vm_from_spec("name=a,handle=fd:3,consumer=127.0.0.1:5,allow-special=yes").is_ok());
}

#[test]
fn file_and_flags_merge() {
    let file = parse_file(
        r#"
backend = "portable"
[[vm]]
name = "vm0"
handle = "fd:3"
consumer = ["203.0.113.7:51820", "198.51.100.2:51820"]
mtu = 1400
allow_special = false
"#,
    )
    .unwrap();
    assert_eq!(file.backend.as_deref(), Some("portable"));
    let flag = |s: &str| VmDesc::from_pairs(&split_spec(s).unwrap()).unwrap();
    let flags =
        vec![flag("name=vm0,mtu=1300,consumer=203.0.113.9:1"), flag("name=vm1,handle=fd:4,consumer=203.0.113.7:2")];
    let vms = merge(&file.vms, &flags).unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].identity.mtu, 1300, "the flag overrides the file");
    assert_eq!(vms[0].consumers, vec!["203.0.113.9:1".parse().unwrap()]);
    // Two flags for one VM, whether or not the file names it, are refused (never merged).
    for name in ["vm0", "vm9"] {
        let twice = [flag(&format!("name={name},mtu=1300")), flag(&format!("name={name},mtu=1400"))];
        let e = merge(&file.vms, &twice).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("described twice"), "{e}");
    }
    assert!(merge(&file.vms, &[flag("name=vm1,handle=fd:3,consumer=203.0.113.7:2")])
        .unwrap_err()
        .to_string()
        .contains("used by another VM"));
    for bad in ["backend = 3", "[[vm]]\nname = { a = 1 }", "vm = 3", "this is not toml"] {
        assert!(parse_file(bad).is_err() || merge(&parse_file(bad).unwrap().vms, &[]).is_err(), "{bad}");
    }
}

#[test]
fn file_values_are_typed_and_errors_name_the_line() {
    let ok = parse_file(
        "[[vm]]\nname = \"a\"\nhandle = \"dgram:/run/a.sock\"\nconsumer = \"203.0.113.7:51820\"\nmode = \"sampled\"\nsample-rate = 0.5\nmac = \"52:54:00:00:00:09\"\nbusy_poll = true\n",
    )
    .unwrap();
    let vm = ok.vms[0].validate().unwrap();
    assert_eq!(vm.mode, Mode::Sampled(SampleRate::new(0.5).unwrap()));
    assert_eq!(vm.identity.mac.to_string(), "52:54:00:00:00:09");
    assert!(vm.busy_poll);
    let cases = [
        ("[[vm]]\nname = \"a\"\nmtu = \"big\"\n", "line 3 (mtu)"),
        ("[[vm]]\nname = \"a\"\ncolour = 1\n", "colour"),
        ("[[vm]]\nname = \"a\"\nconsumer = [\"nope\"]\n", "consumer 'nope'"),
        ("[[vm]]\nname = \"a\"\nmac = \"zz\"\n", "'zz'"),
        ("[[vm]]\nname = \"a\"\nhandle = \"tcp:1\"\n", "'tcp:1'"),
        ("[[vm]]\nname = \"a\"\nmode = \"bridge\"\n", "line 3"),
        ("backend = 3\n", "line 1"),
        ("bogus = 1\n", "bogus"),
    ];
    for (text, want) in cases {
        let e = parse_file(text).unwrap_err().to_string();
        assert!(e.starts_with("config file: ") && e.contains(want), "{text:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn a_vm_start_is_read_key_by_key_and_checked_before_any_handle_exists() {
    let base = "name=g,consumer=198.51.100.7:51820";
    let g = GuestStart::parse(&format!("{base},kernel=k,initrd=i,memory=256,firewall=no,mode=conntrack")).unwrap();
    assert_eq!(
        (g.kernel.as_str(), g.initrd.as_str(), g.memory_mib, g.firewall, g.direct),
        ("k", "i", 256, false, false)
    );
    assert_eq!(g.boot_timeout, None);
    let vm = g.validate().unwrap();
    assert_eq!(vm.name(), "g");
    assert_eq!(vm.config().mode.name(), "conntrack");
    let cfg = vm.attach(HandleSpec::DgramFd(9));
    assert_eq!(cfg.handle, HandleSpec::DgramFd(9));
    let d =
        GuestStart::parse(&format!("{base},kernel=k,initrd=i,mode=direct,rogue-interval=7,boot-timeout=9")).unwrap();
    assert!(d.direct);
    assert_eq!((d.rogue_interval.as_secs(), d.boot_timeout.map(|t| t.as_secs())), (7, Some(9)));
    let err = |spec: &str| GuestStart::parse(spec).and_then(|g| g.validate().map(|_| ())).unwrap_err().to_string();
    assert_eq!(err(&format!("{base},initrd=i")), "vm start needs kernel=PATH");
    assert_eq!(err(&format!("{base},kernel=k")), "vm start needs initrd=PATH");
    assert_eq!(err(&format!("{base},kernel=k,initrd=i,memory=lots")), "memory=lots: not a number of MiB");
    assert_eq!(err(&format!("{base},kernel=k,initrd=i,boot-timeout=0")), "boot-timeout=0: 1 to 3600 seconds");
    assert_eq!(err(&format!("{base},kernel=k,initrd=i,rogue-interval=9999")), "rogue-interval=9999: 1 to 3600 seconds");
    assert_eq!(
        err(&format!("{base},kernel=k,initrd=i,handle=dgram:/x")),
        "vm start makes the VM's handle itself; drop handle="
    );
    assert!(err("name=g,kernel=k,initrd=i").contains("at least one consumer"));
    assert!(err(&format!("{base},kernel=k,initrd=i,colour=red")).contains("unknown key 'colour'"));
}
