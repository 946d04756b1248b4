//! Every request the daemon makes to the engine's control socket, through the engine's typed
//! control API (`api`): requests built by its encoder, answers read as its reply types, never
//! by string keys.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use api::reply::Reply;
use api::{Client, ClientError, ImageStart, Request};

/// Why the engine did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request could not be encoded (a field the protocol refuses).
    #[error("{0}")]
    Encode(String),
    /// Nothing answers on the control socket.
    #[error("no engine answers at {} ({source})", .socket.display())]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: ClientError,
    },
    /// The engine has no VM of that name.
    #[error("the engine has no such VM: {0}")]
    NotFound(String),
    /// The engine answered with another failure (refused, busy, failed inside).
    #[error("the engine refused: {0}")]
    Refused(String),
    /// The connection failed midway, or the answer made no sense.
    #[error("the engine: {0}")]
    Io(ClientError),
    /// The answer lacks a field.
    #[error("the engine's answer lacks {0}")]
    Lacks(&'static str),
}

/// The engine's control socket.
#[derive(Debug, Clone)]
pub(super) struct Engine {
    socket: PathBuf,
}

/// A cloud-image VM to start.
#[derive(Debug, Clone)]
pub(super) struct ImageVm<'a> {
    /// The engine's name for it.
    pub name: &'a str,
    /// The image directory (in the engine's `--image-dir`).
    pub image: &'a str,
    /// The consumer's WireGuard endpoint: its only destination.
    pub consumer: SocketAddrV4,
    /// The consumer's WireGuard public key.
    pub consumer_key: &'a str,
    /// The consumer's endpoint-proof public key: `consumer` is then not allowlisted, the
    /// engine learns the endpoint from proofs.
    pub proof_key: Option<&'a str>,
    /// The consumer's SSH public key, `ssh-ed25519 BASE64`.
    pub ssh_key: &'a str,
    /// The VM's tunnel address (a /24).
    pub vm_ip: Ipv4Addr,
    /// The consumer's tunnel address.
    pub consumer_ip: Ipv4Addr,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Seconds it has to boot (the engine's default when `None`).
    pub boot_timeout_s: Option<u64>,
    /// Its host UDP port (`None`: one the kernel picks).
    pub port: Option<u16>,
    /// Its disk in MB (`None`: the image's size).
    pub disk_mb: Option<u32>,
}

/// The public halves of a started VM's keys, as the engine made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StartedVm {
    /// Its WireGuard public key.
    pub wireguard_public_key: String,
    /// Its SSH host key, `ssh-ed25519 BASE64 [comment]`.
    pub ssh_host_key: String,
    /// The host key's fingerprint.
    pub ssh_host_fingerprint: String,
    /// Its host UDP port, as the engine reports it.
    pub port: Option<u16>,
    /// The engine's endpoint-proof public key, for a proof rental.
    pub proof_key: Option<String>,
}

/// A VM's state as the engine reports it (the control API's own type).
pub(super) use api::VmState;

/// The engine's control socket when none is named (`omertactl`'s).
pub(super) fn default_socket() -> PathBuf {
    api::default_socket_path()
}

/// What an engine's failure means to the daemon: only "no such VM" says a VM is gone (busy,
/// refused or failed inside say nothing of it).
fn classify(e: ClientError) -> EngineError {
    match e {
        ClientError::Unsendable(f) => EngineError::Encode(f.message),
        ClientError::Failed(f) if f.code == api::ErrorCode::NotFound => EngineError::NotFound(f.message),
        ClientError::Failed(f) => EngineError::Refused(f.message),
        e => EngineError::Io(e),
    }
}

impl Engine {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// One request; its typed answer.
    fn request(&self, req: &Request) -> Result<Reply, EngineError> {
        let mut c = Client::connect(&self.socket)
            .map_err(|source| EngineError::Unreachable { socket: self.socket.clone(), source })?;
        c.call(req).map_err(classify)
    }

    /// A request answered with a VM.
    fn vm(&self, req: &Request) -> Result<api::reply::Vm, EngineError> {
        match self.request(req)? {
            Reply::Vm(v) => Ok(*v),
            _ => Err(EngineError::Lacks("the VM")),
        }
    }

    /// `vm start image=...`: boots the VM; the public halves of the keys the engine made.
    pub fn start_image(&self, vm: &ImageVm<'_>) -> Result<StartedVm, EngineError> {
        let mut spec = ImageStart::new(vm.name, vm.image, vm.consumer.into(), vm.consumer_key, vm.ssh_key);
        spec.tunnel = (vm.vm_ip, 24);
        spec.consumer_tunnel = vm.consumer_ip;
        spec.cpus = vm.cpus;
        spec.memory_mib = vm.memory_mib;
        spec.boot_timeout_s = vm.boot_timeout_s;
        // The guest names its consumer at an alias on its link: when the consumer's endpoint
        // moves (vm_endpoint_update), the engine follows and the guest needs to learn nothing.
        spec.alias = true;
        spec.port = vm.port;
        spec.disk_mb = vm.disk_mb;
        if let Some(k) = vm.proof_key {
            spec.proof_key = Some(k.into());
            spec.consumer = None;
        }
        let vm = self.vm(&Request::VmStartImage(Box::new(spec)))?;
        let port = vm.port;
        let cloud = vm.guest.and_then(|g| g.cloud).ok_or(EngineError::Lacks("the VM's keys"))?;
        Ok(StartedVm {
            wireguard_public_key: cloud.wireguard_public_key,
            ssh_host_key: cloud.ssh_host_key,
            ssh_host_fingerprint: cloud.ssh_host_fingerprint,
            proof_key: cloud.proof_key,
            port,
        })
    }

    /// `vm show`: the VM's state.
    pub fn vm_state(&self, name: &str) -> Result<VmState, EngineError> {
        Ok(self.vm(&Request::VmShow(name.into()))?.state)
    }

    /// `vm show`: the VM's state, and why its guest is paused (its host out of room).
    pub fn vm_status(&self, name: &str) -> Result<(VmState, Option<String>), EngineError> {
        let vm = self.vm(&Request::VmShow(name.into()))?;
        Ok((vm.state, vm.guest.and_then(|g| g.paused)))
    }

    /// `vm resume`: a kept guest (its VMM ended with its launcher: a reboot) boots again from
    /// its disk.
    pub fn resume(&self, name: &str) -> Result<(), EngineError> {
        self.request(&Request::VmResume(name.into())).map(|_| ())
    }

    /// `vm remove`: stops the VM and forgets it.
    pub fn remove(&self, name: &str) -> Result<(), EngineError> {
        self.request(&Request::VmRemove(name.into())).map(|_| ())
    }

    /// `allow set`: the VM's only destination becomes `endpoint`.
    pub fn allow_set(&self, name: &str, endpoint: SocketAddrV4) -> Result<(), EngineError> {
        self.request(&Request::AllowSet(name.into(), vec![endpoint.into()])).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_such_vm_says_a_vm_is_gone() {
        let failed = |code| ClientError::Failed(api::Failure { code, message: "m".into() });
        assert!(matches!(classify(failed(api::ErrorCode::NotFound)), EngineError::NotFound(_)));
        for code in
            [api::ErrorCode::Busy, api::ErrorCode::Refused, api::ErrorCode::Internal, api::ErrorCode::BadRequest]
        {
            assert!(matches!(classify(failed(code)), EngineError::Refused(_)), "{code:?}");
        }
    }
}
