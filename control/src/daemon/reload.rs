//! SIGHUP: the configuration file read again (the `--vm` flags still over it) and its
//! differences applied to the VMs it made; VMs added through the control socket are never
//! touched.
use std::path::PathBuf;

use engine::config::VmConfig;

use super::users::{handle_dir, make_own_dir};
use crate::config;
use crate::registry::Registry;

/// The VMs the configuration (the file and the `--vm` flags) describes, as last applied: what
/// SIGHUP compares the file with. VMs added through the control socket are not among them and
/// a reload never touches them.
#[derive(Debug)]
pub struct Configured {
    path: Option<PathBuf>,
    flags: Vec<config::VmDesc>,
    vms: Vec<VmConfig>,
}

impl Configured {
    /// The file at `path` and the `--vm` `flags`, before any VM is running.
    pub fn new(path: Option<PathBuf>, flags: Vec<config::VmDesc>) -> Self {
        Configured { path, flags, vms: Vec::new() }
    }

    /// Records `vms` as the configured VMs now running.
    pub fn running(&mut self, vms: &[VmConfig]) {
        self.vms = vms.to_vec();
    }

    /// The names of the configured VMs.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vms.iter().map(|v| v.name.as_str())
    }
}

/// SIGHUP: reads the file again (the `--vm` flags still apply over it) and makes the
/// configured VMs what it says: new ones added, gone ones removed, changed allowlists set in
/// place, other changes applied by removing and adding the VM again. Only VMs this
/// configuration made and that still run as it made them are touched: one removed or replaced
/// through the control socket since is the control socket's. `Err((why, nothing_changed))`:
/// a file that does not read, parse or validate, or a change that cannot be applied, changes
/// nothing (`true`); a failure while applying says what was done and what failed (`false`).
pub fn reload(registry: &mut Registry, c: &mut Configured) -> Result<String, (String, bool)> {
    use api::Request;
    let refuse = |why: String| (why, true);
    let path = c.path.clone().ok_or_else(|| refuse("no --config file to reload".into()))?;
    let text = std::fs::read_to_string(&path).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    let file = config::parse_file(&text).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    let new = config::merge(&file.vms, &c.flags).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    // Ours: the configured VMs that still run with the configuration we gave them.
    let mut ours: Vec<VmConfig> = c.vms.iter().filter(|o| registry.config_of(&o.name) == Some(*o)).cloned().collect();
    let old_of = |ours: &[VmConfig], name: &str| ours.iter().find(|o| o.name == name).cloned();
    // Everything that cannot be applied is refused before anything changes.
    for vm in &new {
        match old_of(&ours, &vm.name) {
            None if registry.config_of(&vm.name).is_some() => {
                return Err(refuse(format!("vm '{}' exists already (not from the configuration)", vm.name)))
            }
            None if is_fd(&vm.handle) => {
                return Err(refuse(format!(
                    "vm '{}': an inherited fd handle exists only at start; a reload cannot add one",
                    vm.name
                )))
            }
            Some(o) if !same_but_consumers(&o, vm) && (is_fd(&o.handle) || is_fd(&vm.handle)) => {
                return Err(refuse(format!(
                    "vm '{}': has an inherited fd handle, so a reload cannot restart it",
                    vm.name
                )))
            }
            _ => {}
        }
    }
    let (mut added, mut removed, mut lists, mut restarted, mut failed) = (0, 0, 0, 0, Vec::new());
    let gone: Vec<String> =
        ours.iter().filter(|o| !new.iter().any(|v| v.name == o.name)).map(|o| o.name.clone()).collect();
    for name in gone {
        if registry.handle(Request::VmRemove(name.clone())).is_ok() {
            removed += 1;
        }
        ours.retain(|x| x.name != name);
    }
    for vm in &new {
        match old_of(&ours, &vm.name) {
            Some(o) if o == *vm => {}
            Some(o) if same_but_consumers(&o, vm) => {
                match registry.handle(Request::AllowSet(vm.name.clone(), vm.consumers.clone())) {
                    Ok(_) => {
                        lists += 1;
                        ours.retain(|x| x.name != vm.name);
                        ours.push(vm.clone());
                    }
                    Err(e) => failed.push(format!("vm '{}': {}", vm.name, e.message)),
                }
            }
            existing => {
                if existing.is_some() {
                    let _ = registry.handle(Request::VmRemove(vm.name.clone()));
                    ours.retain(|x| x.name != vm.name);
                }
                // A failure here shows as the add's own (its socket cannot be bound).
                if let Some(dir) = handle_dir(&vm.handle) {
                    let _ = make_own_dir(&dir);
                }
                match registry.add(vm.clone()) {
                    Ok(()) => {
                        if existing.is_some() {
                            restarted += 1;
                        } else {
                            added += 1;
                        }
                        ours.push(vm.clone());
                    }
                    Err(e) => failed.push(e.message),
                }
            }
        }
    }
    // What runs now as the configuration made it: the base of the next reload.
    c.vms = ours;
    let done = format!("{added} added, {removed} removed, {lists} allowlist(s) set, {restarted} restarted");
    if failed.is_empty() {
        Ok(done)
    } else {
        Err((format!("{done}; failed: {}", failed.join("; ")), false))
    }
}

fn is_fd(h: &engine::config::HandleSpec) -> bool {
    matches!(h, engine::config::HandleSpec::DgramFd(_) | engine::config::HandleSpec::StreamFd(_))
}

/// True when `a` and `b` differ at most in their consumers.
fn same_but_consumers(a: &VmConfig, b: &VmConfig) -> bool {
    let mut a = a.clone();
    a.consumers.clone_from(&b.consumers);
    a == *b
}
