//! The state files, so that a restarted daemon cleans up what a dead one left:
//! `provider/<network>.json` (the VMs this node provides), `vms/active.json` (the VMs it
//! rents, every network's) and `known_hosts` (the rented VMs' pinned host keys). Each file has
//! a writer lock of its own; every write goes through a renamed temporary file (0600).
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::ipc::RentalState;
use crate::net::{Home, HomeError};

/// A VM this node provides (as `provider/<network>.json` holds it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Rental {
    pub vm_id: String,
    pub engine_name: String,
    pub consumer: String,
    pub endpoint: String,
    pub vm_ip: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub started: u64,
    pub dry_run: bool,
    pub state: RentalState,
    #[serde(skip)]
    pub last_ack: Option<Instant>,
    /// When this daemon made it (`None` for a predecessor's).
    #[serde(skip)]
    pub since: Option<Instant>,
    /// The last endpoint change applied.
    #[serde(skip)]
    pub last_update: Option<Instant>,
    /// Why the engine says its guest is paused, as last told to its consumer.
    #[serde(skip)]
    pub paused: Option<String>,
    /// Since when booting its kept guest again has failed (a reboot's `vm resume`): tried
    /// again each heartbeat round, ended after its heartbeat timeout.
    #[serde(skip)]
    pub resume_failing: Option<Instant>,
    pub timeout_s: u64,
    /// When its consumer last answered a heartbeat (unix seconds; written when it moved by
    /// [`ACK_SAVED_EVERY`] or more): a restarted daemon counts the silence from there.
    #[serde(default)]
    pub last_ack_s: u64,
    /// Its host UDP port at the engine (from `--port-range`; `None`: one the kernel picked).
    #[serde(default)]
    pub port: Option<u16>,
    /// The engine learns the consumer's endpoint from its proofs (`endpoint` is what the
    /// request said; `vm_endpoint_update` does not apply).
    #[serde(default)]
    pub proof: bool,
}

/// How far `Rental::last_ack_s` moves before the file is written again.
pub(super) const ACK_SAVED_EVERY: u64 = 30;

/// What the consumer remembers on disk (`vms/active.json`), to clean up after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ActiveVm {
    pub network: String,
    pub vm_id: String,
    pub provider: String,
    pub vm_ip: String,
    pub interface: String,
    pub created: u64,
    /// A dry run's lease (no tunnel).
    #[serde(default)]
    pub dry_run: bool,
    /// What brings its tunnel back after a restart (none from a daemon before this version:
    /// its tunnel is removed).
    #[serde(default)]
    pub kept: Option<KeptTunnel>,
}

/// A rented VM's tunnel as a restarted daemon makes it again: its keys (the file is 0600)
/// and addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeptTunnel {
    /// `iface` (a WireGuard interface) or `user` (a userspace tunnel).
    pub kind: String,
    /// Our WireGuard private key (base64).
    pub private: String,
    /// The VM's WireGuard public key (base64).
    pub vm_public: String,
    pub consumer_ip: Ipv4Addr,
    /// Our tunnel's UDP port.
    pub port: u16,
    /// Our address toward the provider when it was made.
    pub endpoint_ip: Ipv4Addr,
    /// The provider's UDP port for the VM.
    #[serde(default)]
    pub vm_port: Option<u16>,
    /// Where a userspace tunnel dials and proves its endpoint (the provider's address, the
    /// VM's port).
    #[serde(default)]
    pub vm_endpoint: Option<std::net::SocketAddrV4>,
    /// The rental's endpoint-proof key (hex; the key derived, not the exchange's secret).
    #[serde(default)]
    pub proof: Option<String>,
    /// The VM's SSH host key fingerprint.
    pub fingerprint: String,
}

/// An exclusive lock on `PATH.lock` (0600), waited for up to 5 s; released when the file
/// is dropped.
fn lock_beside(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path.with_extension("lock"))?;
    let end = Instant::now() + std::time::Duration::from_secs(5);
    while !sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(&f))? {
        if Instant::now() > end {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "another daemon holds its lock"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(f)
}

fn guard(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A state file's entries, each read on its own: one that does not parse (written by another
/// version, or edited by hand) costs only itself, never the whole list (a crashed
/// predecessor's VMs must still be found and cleaned up). Nothing is dropped silently: a file
/// that does not parse as a whole (torn, damaged) is renamed `NAME.corrupt-<unix s>`, the
/// entries that do not parse are kept in `NAME.rejected-<unix s>`, each said in one line.
fn read_list<T: serde::de::DeserializeOwned>(path: Option<&Path>) -> Vec<T> {
    let Some(path) = path else { return Vec::new() };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            ::engine::warn!("state file {}: {e}: its entries are not read", path.display());
            return Vec::new();
        }
    };
    let entries: Vec<serde_json::Value> = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            control::state::quarantine(
                path,
                "corrupt",
                &format!("does not parse ({e}); the VMs it names are not acted on"),
            );
            return Vec::new();
        }
    };
    let mut rejected = Vec::new();
    let mut kept = Vec::new();
    for (i, v) in entries.into_iter().enumerate() {
        match serde_json::from_value::<T>(v.clone()) {
            Ok(t) => kept.push(t),
            Err(e) => {
                let id = v.get("vm_id").and_then(serde_json::Value::as_str).map(|s| crate::net::printable(s, 32));
                ::engine::error!(
                    "state file {}: entry {i}{} does not parse ({e}): kept aside, not acted on",
                    path.display(),
                    id.map(|id| format!(" (VM {id})")).unwrap_or_default()
                );
                rejected.push(v);
            }
        }
    }
    if !rejected.is_empty() {
        let to = control::state::quarantine_path(path, "rejected");
        let saved = serde_json::to_vec_pretty(&rejected).map_err(|e| e.to_string());
        match saved.and_then(|j| crate::net::write_private(&to, &j).map_err(|e| e.to_string())) {
            Ok(()) => {
                ::engine::error!("state file {}: {} entries kept in {}", path.display(), rejected.len(), to.display())
            }
            Err(e) => ::engine::error!(
                "state file {}: the entries that do not parse cannot be kept aside: {e}",
                path.display()
            ),
        }
    }
    kept
}

/// `provider/<network>.json`.
#[derive(Debug)]
pub(super) struct RentalFile {
    home: Home,
    network: String,
    writing: Mutex<()>,
}

impl RentalFile {
    pub fn new(home: &Home, network: &str) -> Self {
        Self { home: home.clone(), network: network.into(), writing: Mutex::new(()) }
    }

    /// Its path (the directory made if missing).
    fn path(&self) -> Option<PathBuf> {
        self.home.sub("provider").ok().map(|d| d.join(format!("{}.json", self.network)))
    }

    /// What a predecessor left.
    pub fn load(&self) -> Vec<Rental> {
        read_list(self.path().as_deref())
    }

    /// Writes the list `snapshot` gives, taken under the writer lock (so the last writer
    /// writes the newest list).
    pub fn save(&self, snapshot: impl FnOnce() -> Vec<Rental>) {
        let _writing = guard(&self.writing);
        let list = snapshot();
        if let (Some(p), Ok(json)) = (self.path(), serde_json::to_vec_pretty(&list)) {
            if let Err(e) = crate::net::write_private(&p, &json) {
                ::engine::warn!("saving the rentals: {e}");
            }
        }
    }
}

/// `vms/active.json`: every network's rented VMs, this network's entries replaced on save.
#[derive(Debug)]
pub(super) struct LeaseFile {
    home: Home,
    network: String,
    writing: Mutex<()>,
}

impl LeaseFile {
    pub fn new(home: &Home, network: &str) -> Self {
        Self { home: home.clone(), network: network.into(), writing: Mutex::new(()) }
    }

    /// Its path (the directory made if missing).
    fn path(&self) -> Option<PathBuf> {
        self.home.sub("vms").ok().map(|d| d.join("active.json"))
    }

    /// This network's entries a predecessor left.
    pub fn load(&self) -> Vec<ActiveVm> {
        read_list::<ActiveVm>(self.path().as_deref()).into_iter().filter(|a| a.network == self.network).collect()
    }

    /// Replaces this network's entries with those `snapshot` gives (other networks' stay).
    pub fn save(&self, snapshot: impl FnOnce() -> Vec<ActiveVm>) {
        let _writing = guard(&self.writing);
        let Some(path) = self.path() else { return };
        // Every network's daemon of this home rewrites the file: one at a time, across
        // processes too (a lock file beside it), or one would drop another's leases.
        let _held = match lock_beside(&path) {
            Ok(f) => f,
            Err(e) => return ::engine::warn!("saving the active VMs: {e}; not saved"),
        };
        let mut all: Vec<ActiveVm> = read_list(Some(&path));
        all.retain(|a| a.network != self.network);
        all.extend(snapshot());
        if let Ok(json) = serde_json::to_vec_pretty(&all) {
            if let Err(e) = crate::net::write_private(&path, &json) {
                ::engine::warn!("saving the active VMs: {e}");
            }
        }
    }
}

/// `known_hosts`: one line per rented VM, `IP KEY`.
#[derive(Debug)]
pub(super) struct KnownHosts {
    path: PathBuf,
    writing: Mutex<()>,
}

impl KnownHosts {
    pub fn new(home: &Home) -> Self {
        Self { path: home.dir.join("known_hosts"), writing: Mutex::new(()) }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lines of `ip` (a released VM's address may be another VM's tomorrow).
    pub fn unpin(&self, ip: Ipv4Addr) -> Result<(), HomeError> {
        let _writing = guard(&self.writing);
        let Ok(old) = std::fs::read_to_string(&self.path) else { return Ok(()) };
        let prefix = format!("{ip} ");
        let text: String = old.lines().filter(|l| !l.starts_with(&prefix)).map(|l| format!("{l}\n")).collect();
        crate::net::write_private(&self.path, text.as_bytes())
    }

    /// Writes `ip KEY`, replacing earlier lines for that address.
    pub fn pin(&self, ip: Ipv4Addr, key: &str) -> Result<(), HomeError> {
        let _writing = guard(&self.writing);
        let old = std::fs::read_to_string(&self.path).unwrap_or_default();
        let prefix = format!("{ip} ");
        let mut text: String = old.lines().filter(|l| !l.starts_with(&prefix)).map(|l| format!("{l}\n")).collect();
        text.push_str(&format!("{ip} {key}\n"));
        crate::net::write_private(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rental_state_is_written_as_before() {
        assert_eq!(serde_json::to_string(&RentalState::Booting).unwrap(), "\"booting\"");
        assert_eq!(serde_json::to_string(&RentalState::Ready).unwrap(), "\"ready\"");
        assert_eq!(serde_json::from_str::<RentalState>("\"ready\"").unwrap(), RentalState::Ready);
        assert!(serde_json::from_str::<RentalState>("\"gone\"").is_err());
        assert_eq!(serde_json::to_string(&RentalState::Starting).unwrap(), "\"starting\"");
    }

    #[test]
    fn a_lease_of_an_older_daemon_reads_without_its_keys_and_a_new_one_with_them() {
        let old =
            r#"{"network":"n","vm_id":"v","provider":"p","vm_ip":"10.50.1.2","interface":"wg01234567","created":1}"#;
        let a: ActiveVm = serde_json::from_str(old).unwrap();
        assert!(a.kept.is_none() && !a.dry_run);
        let kept = KeptTunnel {
            kind: "user".into(),
            private: "k".repeat(43) + "=",
            vm_public: "v".repeat(43) + "=",
            consumer_ip: Ipv4Addr::new(10, 50, 1, 1),
            port: 51900,
            endpoint_ip: Ipv4Addr::new(192, 168, 1, 5),
            vm_port: Some(40000),
            vm_endpoint: Some("203.0.113.9:40000".parse().unwrap()),
            proof: Some(crate::hex(&[7; 32])),
            fingerprint: "SHA256:x".into(),
        };
        let a = ActiveVm { kept: Some(kept), ..a };
        let back: ActiveVm = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let k = back.kept.unwrap();
        assert_eq!(
            (k.port, k.vm_endpoint, k.proof.as_deref().and_then(crate::unhex32)),
            (51900, Some("203.0.113.9:40000".parse().unwrap()), Some([7; 32]))
        );
        assert_eq!(crate::unhex32(&"0".repeat(63)), None);
        assert_eq!(crate::unhex32(&"zz".repeat(32)), None);
    }

    #[test]
    fn one_entry_that_does_not_parse_costs_only_itself() {
        let dir = std::env::temp_dir().join(format!("omerta-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("list.json");
        let good = |id: &str, state: &str| {
            format!(
                r#"{{"vm_id":"{id}","engine_name":"mesh-{id}","consumer":"c","endpoint":"203.0.113.7:51820","vm_ip":"10.99.0.2","cpus":1,"memory_mb":1024,"disk_mb":0,"started":1,"dry_run":true,"state":"{state}","timeout_s":60}}"#
            )
        };
        std::fs::write(&path, format!("[{},{},{}]", good("a", "ready"), good("b", "gone"), good("c", "booting")))
            .unwrap();
        let got: Vec<Rental> = read_list(Some(&path));
        let ids: Vec<&str> = got.iter().map(|r| r.vm_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"], "the entry with an unknown state is skipped, the others kept");
        // ... and kept aside, not lost.
        let aside = |what: &str| {
            std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains(&format!("list.json.{what}-")))
        };
        let rejected = std::fs::read_to_string(aside("rejected").expect("the rejected entry kept")).unwrap();
        assert!(rejected.contains("\"b\"") && !rejected.contains("\"a\""), "{rejected}");
        // A torn file: moved aside whole, nothing read from it.
        let torn = format!("[{},{}", good("a", "ready"), &good("c", "booting")[..40]);
        std::fs::write(&path, &torn).unwrap();
        assert!(read_list::<Rental>(Some(&path)).is_empty());
        assert!(!path.exists(), "the torn file is moved aside");
        assert_eq!(std::fs::read_to_string(aside("corrupt").expect("the torn file kept")).unwrap(), torn);
        // No file: nothing, and nothing said.
        assert!(read_list::<Rental>(Some(&path)).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
