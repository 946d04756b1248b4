//! The Debian package, built from this tree as `make deb` builds it, checked by lintian, then
//! installed, driven, upgraded and purged under a real systemd: the provider image booted under
//! QEMU runs `tests/package/run.sh` from a second disk (no network; VMs with datagram handles and
//! a stand-in VMM), and each of its steps is an assertion here.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use omerta_it::{boot_provider, private_netns, workspace_bin, GuestSlot};

/// The steps of `run.sh`, in order: each must print `OMERTA-STEP <name> ok`.
const STEPS: [&str; 14] = [
    "boot", "install", "ready", "flags", "reload", "metrics", "threads", "journal", "mesh", "restart", "direct",
    "upgrade", "stop", "purge",
];

/// `scripts/deb.sh` on this build into `out` with `env`: the package's path.
fn deb(out: &Path, env: &[(&str, &str)]) -> PathBuf {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = workspace_bin("omertactl").parent().unwrap().to_path_buf();
    let o = Command::new(top.join("scripts/deb.sh"))
        .env("DEB_BUILT", &built)
        .env("DEB_OUT", out)
        .envs(env.iter().copied())
        .output()
        .expect("run scripts/deb.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "scripts/deb.sh: {text}");
    let path = text.lines().find_map(|l| l.strip_prefix("deb: ")?.split(' ').next()).expect("the package's path");
    PathBuf::from(path)
}

/// `dpkg-deb ARGS DEB`'s output.
fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let o = Command::new("dpkg-deb").args(args).arg(deb).output().expect("dpkg-deb");
    assert!(o.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_package_installs_reloads_upgrades_and_purges_under_systemd() {
    if !omerta_it::require_commands(&["lintian", "dpkg-shlibdeps", "mkfs.ext4", "qemu-img"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("omerta-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("units")).unwrap();
    // The package as an operator gets it: lintian finds no error or warning (deb.sh fails
    // otherwise), its version is the workspace's, its units are the repository's.
    let version = env!("CARGO_PKG_VERSION");
    let old = deb(&files, &[]);
    let rebuilt = format!("{version}+rebuild1");
    let new = deb(&files, &[("DEB_VERSION", &rebuilt), ("DEB_LINTIAN", "0")]);
    assert_eq!(old.file_name().unwrap().to_string_lossy(), format!("omerta_{version}_amd64.deb"));
    assert_eq!(dpkg_deb(&["-f"], &old).lines().find_map(|l| l.strip_prefix("Version: ")), Some(version));
    assert_eq!(dpkg_deb(&["-f"], &new).lines().find_map(|l| l.strip_prefix("Version: ")), Some(rebuilt.as_str()));
    let listing = dpkg_deb(&["-c"], &old);
    for path in [
        "./usr/bin/omerta-engine",
        "./usr/bin/omertactl",
        "./usr/bin/omertad",
        "./usr/bin/omerta",
        "./usr/share/man/man8/omerta-engine.8.gz",
        "./usr/lib/systemd/system/omerta-engine.service",
        "./usr/lib/systemd/system/omerta-launcher.service",
        "./usr/lib/systemd/system/omertad@.service",
        "./usr/lib/sysusers.d/omerta.conf",
        "./usr/lib/tmpfiles.d/omerta.conf",
        "./usr/lib/sysctl.d/90-omerta.conf",
        "./etc/omerta/engine.toml",
        "./usr/share/doc/omerta/copyright",
        "./usr/share/doc/omerta/THIRD-PARTY.gz",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "the package lacks {path}:\n{listing}");
    }
    let _ = std::fs::remove_dir_all(files.join("build"));
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for u in ["omerta-engine.service", "omerta-launcher.service", "omertad@.service"] {
        std::fs::copy(top.join("packaging/systemd").join(u), files.join("units").join(u)).unwrap();
    }
    std::fs::copy(top.join("tests/package/run.sh"), files.join("run.sh")).unwrap();
    std::fs::write(files.join("versions"), format!("{version} {rebuilt}\n")).unwrap();

    let console = private_netns(move |ns| {
        let _slot = GuestSlot::take();
        let (mut vm, guest_dir) = boot_provider(ns, &files, Duration::from_secs(900), "package")?;
        // Progress, as the guest's steps finish (a few minutes under TCG).
        let t0 = Instant::now();
        let mut said = 0;
        while vm.try_wait().is_none() && t0.elapsed() < Duration::from_secs(905) {
            std::thread::sleep(Duration::from_secs(2));
            let text = vm.console();
            let steps: Vec<&str> = text.lines().filter(|l| l.starts_with("OMERTA-STEP ")).collect();
            for s in &steps[said.min(steps.len())..] {
                eprintln!("package: {} (at {} s)", s.trim(), t0.elapsed().as_secs());
            }
            said = steps.len();
        }
        let exit = vm.wait();
        let console = vm.console();
        let _ = std::fs::remove_dir_all(guest_dir);
        Some((exit, console))
    })
    .flatten();
    let _ = std::fs::remove_dir_all(&dir);
    let Some((exit, console)) = console else { return };
    let tail: String =
        console.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(
        console.contains("OMERTA-PKGTEST-BOOTED"),
        "the provider image never ran its test hook ({exit:?}):\n{tail}"
    );
    for s in STEPS {
        let line = console.lines().find(|l| l.starts_with(&format!("OMERTA-STEP {s} ")));
        assert!(line.is_some_and(|l| l.contains(" ok ")), "step {s} failed ({line:?}):\n{console}");
    }
    assert!(console.contains("OMERTA-PKGTEST-END rc=0"), "the guest's run did not end well ({exit:?}):\n{tail}");
}
