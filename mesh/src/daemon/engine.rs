//! Every request the daemon makes to the engine's control socket, typed: the one file that
//! knows the engine's protocol (`control::protocol`, `control::client`) and the shape of its
//! answers. The requests are built only through the protocol's typed encoder, never by
//! formatting strings.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use control::client::{Client, ClientError};
use control::protocol::{ImageStart, Request};
use serde_json::Value;

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
    /// The engine answered with a failure.
    #[error("the engine refused: {0}")]
    Refused(String),
    /// The connection failed midway.
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
}

/// A VM's state as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum VmState {
    /// Its guest is still booting.
    Booting,
    /// Its guest is up.
    Ready,
    /// Anything else (failed, stopped, unknown): the engine's word for it.
    Other(String),
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::Booting => f.write_str("booting"),
            VmState::Ready => f.write_str("ready"),
            VmState::Other(s) => f.write_str(s),
        }
    }
}

/// The engine's control socket when none is named (`omertactl`'s).
pub(super) fn default_socket() -> PathBuf {
    control::client::default_socket_path()
}

impl Engine {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// One request, typed; its result.
    fn request(&self, req: &Request) -> Result<Value, EngineError> {
        let line = req.line().map_err(|f| EngineError::Encode(f.message))?;
        let mut c = Client::connect(&self.socket)
            .map_err(|source| EngineError::Unreachable { socket: self.socket.clone(), source })?;
        match c.request(&line) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => Err(EngineError::Refused(f.message)),
            Err(e) => Err(EngineError::Io(e)),
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
        let v = self.request(&Request::VmStartImage(Box::new(spec)))?;
        let cloud = &v["guest"]["cloud"];
        let s = |k: &'static str| cloud[k].as_str().map(str::to_string).ok_or(EngineError::Lacks(k));
        Ok(StartedVm {
            wireguard_public_key: s("wireguard_public_key")?,
            ssh_host_key: s("ssh_host_key")?,
            ssh_host_fingerprint: s("ssh_host_fingerprint")?,
        })
    }

    /// `vm show`: the VM's state.
    pub fn vm_state(&self, name: &str) -> Result<VmState, EngineError> {
        let v = self.request(&Request::VmShow(name.into()))?;
        Ok(match v["state"].as_str().unwrap_or("") {
            "booting" => VmState::Booting,
            "ready" => VmState::Ready,
            other => VmState::Other(other.to_string()),
        })
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
