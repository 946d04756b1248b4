//! `--check`: the configuration verified against this host beyond its syntax, then printed.
use std::path::PathBuf;
use std::process::ExitCode;

use engine::config::VmConfig;
use engine::worker::Backend;

use super::users::handle_dir;

/// Checks `vms` and `image_dirs` on this host and prints the backend and every VM: what would
/// fail at start is refused here too, in one line (exit status 2).
pub fn check(vms: &[VmConfig], image_dirs: &[PathBuf], backend: Backend) -> ExitCode {
    if let Err(e) = on_host(vms, image_dirs) {
        return super::usage(&e);
    }
    println!("backend {}", backend.name());
    for vm in vms {
        println!(
            "vm {}: handle {}, {} at {}/{} via {}, mtu {}, mode {}, consumers {}, bind {}, cpu {}",
            vm.name,
            vm.handle,
            vm.identity.mac,
            vm.identity.ip,
            vm.identity.prefix_len,
            vm.identity.gateway_ip,
            vm.identity.mtu,
            vm.mode.name(),
            vm.consumers.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            vm.bind,
            vm.cpu.map_or_else(|| "any".to_string(), |c| c.to_string()),
        );
        if let Some(dir) = handle_dir(&vm.handle).filter(|d| !d.exists()) {
            println!("vm {}: {} does not exist yet; the engine makes it at start", vm.name, dir.display());
        }
    }
    ExitCode::SUCCESS
}

/// What `--check` verifies against this host beyond the syntax: each `cpu=` is one the engine
/// may run on, each `bind=` address is one of the host's (binding port 0 there and letting
/// go), each `--image-dir` exists.
fn on_host(vms: &[VmConfig], image_dirs: &[PathBuf]) -> Result<(), String> {
    let cpus = sys::allowed_cpus();
    for vm in vms {
        if let Some(c) = vm.cpu.filter(|c| !cpus.contains(c)) {
            return Err(format!("vm '{}': cpu={c} is not one this process may use ({cpus:?})", vm.name));
        }
        let probe = std::net::SocketAddrV4::new(*vm.bind.ip(), 0);
        if let Err(e) = std::net::UdpSocket::bind(probe) {
            return Err(format!("vm '{}': bind={}: {e}", vm.name, vm.bind.ip()));
        }
    }
    if let Some(d) = image_dirs.iter().find(|d| !d.is_dir()) {
        return Err(format!("--image-dir {}: not an existing directory", d.display()));
    }
    Ok(())
}
