//! Networks, node identities, invite links and the state directory.
//!
//! A network is a random 32-byte key and a name; its ID is the hex of the first 8 bytes of
//! SHA-256(key). A node's identity is an Ed25519 key made once per user; its peer ID is the
//! hex of the first 8 bytes of SHA-256(public key). State lives under `$OMERTA_HOME` or
//! `~/.omerta` (directory 0700, keys 0600).
use std::fs;
use std::net::SocketAddrV4;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
pub use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::text::b64;
pub use crate::text::{printable, valid_id};
use crate::RandomError;

/// The start of every invite link.
pub const INVITE_PREFIX: &str = "omerta://join/";
/// Longest invite link read.
pub const MAX_INVITE: usize = 4096;
/// Most bootstrap peers in an invite.
pub const MAX_BOOTSTRAP: usize = 16;

/// The 16-hex-character ID of some bytes: the first 8 bytes of their SHA-256.
pub fn short_id(bytes: &[u8]) -> String {
    crate::hex(&Sha256::digest(bytes)[..8])
}

/// A network's ID.
pub fn network_id(key: &[u8; 32]) -> String {
    short_id(key)
}

/// A peer's ID.
pub fn peer_id(public: &[u8; 32]) -> String {
    short_id(public)
}

/// Why the state directory, a stored network or a file in it could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No place for the state directory.
    #[error("neither OMERTA_HOME nor HOME is set")]
    NoHome,
    /// A link where a directory must be.
    #[error("{}: is a symbolic link", .0.display())]
    Symlink(PathBuf),
    /// A file where a directory must be.
    #[error("{}: not a directory", .0.display())]
    NotDir(PathBuf),
    /// Another user's directory.
    #[error("{} belongs to uid {uid}, not to this user: refusing to use it (set OMERTA_HOME to a directory of your own)", .dir.display())]
    Foreign {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The identity file is damaged.
    #[error("{}: not base64", .0.display())]
    IdentityNotBase64(PathBuf),
    /// The identity file holds no 32-byte key.
    #[error("{}: not a 32-byte key", .0.display())]
    IdentityLength(PathBuf),
    /// Not a network ID.
    #[error("'{0}' is not a network ID (16 hex characters)")]
    NotNetworkId(String),
    /// No such network stored.
    #[error("network {0} is unknown here (omerta network join LINK)")]
    UnknownNetwork(String),
    /// A stored network's JSON is damaged.
    #[error("{}: {source}", .path.display())]
    Json {
        /// Which.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A network could not be encoded.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// A network could not be forgotten.
    #[error("{0}")]
    Remove(std::io::Error),
    /// A stored network does not check.
    #[error(transparent)]
    Invite(#[from] InviteError),
    /// No randomness.
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// Why an invite link, a stored network or a bootstrap entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// Too long.
    #[error("an invite link is at most {MAX_INVITE} characters")]
    TooLong,
    /// Not an invite link.
    #[error("an invite link starts with omerta://join/")]
    Prefix,
    /// Not base64.
    #[error("the invite link is damaged (not base64)")]
    NotBase64,
    /// Not the JSON of an invite.
    #[error("the invite link is damaged (its JSON: {0})")]
    Json(serde_json::Error),
    /// A bad key.
    #[error("the network key is not 32 bytes of base64")]
    Key,
    /// A bad name.
    #[error("'{0}': a network name is 1 to 64 letters, digits, spaces, '-', '_' or '.'")]
    Name(String),
    /// Too many bootstrap peers.
    #[error("at most {MAX_BOOTSTRAP} bootstrap peers")]
    TooManyPeers,
    /// A bad bootstrap entry of an invite.
    #[error("a bootstrap peer of the invite: {0}")]
    Bootstrap(Box<InviteError>),
    /// Not `peerId@IP:PORT`.
    #[error("'{0}': not peerId@IP:PORT")]
    NotBootstrap(String),
    /// Not a peer ID.
    #[error("'{0}': not a peer ID")]
    NotPeerId(String),
    /// A bad endpoint.
    #[error(transparent)]
    Endpoint(#[from] crate::check::Invalid),
    /// No randomness (a new network's key).
    #[error(transparent)]
    Random(#[from] RandomError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io { path: path.to_path_buf(), source }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Home {
    /// Its path.
    pub dir: PathBuf,
}

impl Home {
    /// `$OMERTA_HOME`, else `~/.omerta`; made 0700 if missing, narrowed to 0700 if wider.
    pub fn open() -> Result<Self, HomeError> {
        let dir = match std::env::var_os("OMERTA_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => PathBuf::from(h).join(".omerta"),
                None => return Err(HomeError::NoHome),
            },
        };
        let home = Self { dir };
        home.private_dir(&home.dir)?;
        Ok(home)
    }

    /// Makes `d` (0700) or narrows it to 0700; refuses one of another user (a root daemon
    /// given a user's home would otherwise let that user drive it and redirect its writes).
    pub fn private_dir(&self, d: &Path) -> Result<(), HomeError> {
        use std::os::unix::fs::MetadataExt;
        match fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() => return Err(HomeError::Symlink(d.into())),
            Ok(m) if !m.is_dir() => return Err(HomeError::NotDir(d.into())),
            Ok(m) if effective_uid().is_some_and(|me| me != m.uid()) => {
                return Err(HomeError::Foreign { dir: d.into(), uid: m.uid() })
            }
            Ok(m) => {
                if m.permissions().mode() & 0o077 != 0 {
                    fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io(d))?;
                }
            }
            Err(_) => fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(io(d))?,
        }
        Ok(())
    }

    /// A subdirectory, made private.
    pub fn sub(&self, name: &str) -> Result<PathBuf, HomeError> {
        let d = self.dir.join(name);
        self.private_dir(&d)?;
        Ok(d)
    }

    /// The node's identity, made on first use.
    pub fn identity(&self) -> Result<SigningKey, HomeError> {
        let path = self.dir.join("identity.key");
        match fs::read_to_string(&path) {
            Ok(s) => {
                let b = b64(s.trim()).ok_or_else(|| HomeError::IdentityNotBase64(path.clone()))?;
                let seed: [u8; 32] = b.try_into().map_err(|_| HomeError::IdentityLength(path.clone()))?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::from_bytes(&crate::random::<32>()?);
                let text = base64::engine::general_purpose::STANDARD.encode(key.to_bytes());
                write_private(&path, format!("{text}\n").as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn network_path(&self, id: &str) -> Result<PathBuf, HomeError> {
        if !valid_id(id) {
            return Err(HomeError::NotNetworkId(printable(id, 40)));
        }
        Ok(self.sub("networks")?.join(format!("{id}.json")))
    }

    /// Stores a network (0600), returning its ID.
    pub fn save_network(&self, n: &Network) -> Result<String, HomeError> {
        let id = network_id(&n.key);
        let json = serde_json::to_vec_pretty(&n.invite()).map_err(HomeError::Encode)?;
        write_private(&self.network_path(&id)?, &json)?;
        Ok(id)
    }

    /// A stored network.
    pub fn network(&self, id: &str) -> Result<Network, HomeError> {
        let path = self.network_path(id)?;
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HomeError::UnknownNetwork(id.to_string()),
            _ => io(&path)(e),
        })?;
        let inv: Invite =
            serde_json::from_str(&text).map_err(|source| HomeError::Json { path: path.clone(), source })?;
        Ok(Network::from_invite(inv)?)
    }

    /// Every stored network, by ID.
    pub fn networks(&self) -> Result<Vec<(String, Network)>, HomeError> {
        let mut out = Vec::new();
        let dir = self.sub("networks")?;
        for e in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").filter(|id| valid_id(id)) {
                out.push((id.to_string(), self.network(id)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Forgets a network; `false` if it was not stored.
    pub fn remove_network(&self, id: &str) -> Result<bool, HomeError> {
        match fs::remove_file(self.network_path(id)?) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HomeError::Remove(e)),
        }
    }
}

/// This process's effective uid (from `/proc/self/status`; `None` where it cannot be read).
pub fn effective_uid() -> Option<u32> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Writes `data` to `path` with mode 0600, atomically (`control::state::write_atomic`: a new
/// file of a random name, synced and renamed into place; never through a link).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), HomeError> {
    control::state::write_atomic(path, data, 0o600).map_err(io(path))
}

/// A bootstrap peer: `peerId@IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    /// Its peer ID.
    pub peer: [u8; 16],
    /// Its daemon's UDP endpoint.
    pub endpoint: SocketAddrV4,
}

impl Bootstrap {
    /// Reads `peerId@IP:PORT`.
    pub fn parse(s: &str) -> Result<Self, InviteError> {
        let (id, ep) = s.split_once('@').ok_or_else(|| InviteError::NotBootstrap(printable(s, 80)))?;
        if !valid_id(id) {
            return Err(InviteError::NotPeerId(printable(id, 40)));
        }
        let endpoint = crate::check::endpoint(ep)?;
        let mut peer = [0u8; 16];
        peer.copy_from_slice(id.as_bytes());
        Ok(Self { peer, endpoint })
    }

    /// Its peer ID.
    pub fn peer_id(&self) -> &str {
        std::str::from_utf8(&self.peer).unwrap_or_default()
    }
}

impl std::fmt::Display for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.peer_id(), self.endpoint)
    }
}

/// The JSON of an invite link (and of a stored network).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Invite {
    /// The network key, base64.
    pub network_key: String,
    /// Its name.
    pub network_name: String,
    /// `peerId@IP:PORT` entries.
    pub bootstrap_peers: Vec<String>,
    /// Seconds since the epoch (0 when absent).
    #[serde(default)]
    pub created_at: u64,
}

/// A network as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Its key: the secret every member holds.
    pub key: [u8; 32],
    /// Its name.
    pub name: String,
    /// Where its daemons are first looked for.
    pub bootstrap: Vec<Bootstrap>,
    /// Seconds since the epoch.
    pub created_at: u64,
}

impl Network {
    /// A new network with a random key.
    pub fn create(name: &str, bootstrap: Vec<Bootstrap>) -> Result<Self, InviteError> {
        check_name(name)?;
        Ok(Self { key: crate::random::<32>()?, name: name.into(), bootstrap, created_at: crate::now_s() })
    }

    /// Its ID.
    pub fn id(&self) -> String {
        network_id(&self.key)
    }

    /// Its invite's JSON.
    pub fn invite(&self) -> Invite {
        Invite {
            network_key: base64::engine::general_purpose::STANDARD.encode(self.key),
            network_name: self.name.clone(),
            bootstrap_peers: self.bootstrap.iter().map(ToString::to_string).collect(),
            created_at: self.created_at,
        }
    }

    /// Its invite link: a secret, since it carries the key.
    pub fn link(&self) -> String {
        let json = serde_json::to_vec(&self.invite()).unwrap_or_default();
        format!("{INVITE_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(json))
    }

    /// Reads an invite link, checking every field.
    pub fn from_link(link: &str) -> Result<Self, InviteError> {
        let link = link.trim();
        if link.len() > MAX_INVITE {
            return Err(InviteError::TooLong);
        }
        let body = link.strip_prefix(INVITE_PREFIX).ok_or(InviteError::Prefix)?;
        let json = b64(body).ok_or(InviteError::NotBase64)?;
        let inv: Invite = serde_json::from_slice(&json).map_err(InviteError::Json)?;
        Self::from_invite(inv)
    }

    /// Checks an invite's fields.
    pub fn from_invite(inv: Invite) -> Result<Self, InviteError> {
        let key: [u8; 32] = b64(&inv.network_key).and_then(|k| k.try_into().ok()).ok_or(InviteError::Key)?;
        check_name(&inv.network_name)?;
        if inv.bootstrap_peers.len() > MAX_BOOTSTRAP {
            return Err(InviteError::TooManyPeers);
        }
        let bootstrap = inv
            .bootstrap_peers
            .iter()
            .map(|b| Bootstrap::parse(b).map_err(|e| InviteError::Bootstrap(Box::new(e))))
            .collect::<Result<_, _>>()?;
        Ok(Self { key, name: inv.network_name, bootstrap, created_at: inv.created_at })
    }
}

fn check_name(name: &str) -> Result<(), InviteError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
    if ok {
        Ok(())
    } else {
        Err(InviteError::Name(printable(name, 64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_first_eight_bytes_of_sha256_in_hex() {
        // SHA-256 of 32 zero bytes starts 66687aadf862bd77.
        assert_eq!(network_id(&[0; 32]), "66687aadf862bd77");
        assert!(valid_id("66687aadf862bd77"));
        assert!(!valid_id("66687AADF862BD77") && !valid_id("66687aadf862bd7") && !valid_id("../../etc/passwd"));
    }

    #[test]
    fn an_invite_link_round_trips_and_damage_is_refused() {
        let boot = Bootstrap::parse("75af67f14ec0f9ba@192.0.2.1:9999").unwrap();
        let n = Network::create("test", vec![boot]).unwrap();
        let back = Network::from_link(&n.link()).unwrap();
        assert_eq!(back, n);
        assert_eq!(back.id(), n.id());
        let link = n.link();
        assert!(Network::from_link(&link[..link.len() - 8]).is_err());
        assert!(Network::from_link("https://example.com/").is_err());
        assert!(Network::from_link(&format!("{INVITE_PREFIX}{}", "A".repeat(MAX_INVITE))).is_err());
        for bad in [
            "x@192.0.2.1:9999",
            "75af67f14ec0f9ba@192.0.2.1",
            "75af67f14ec0f9ba@host:1",
            "75af67f14ec0f9ba@192.0.2.1:0",
        ] {
            assert!(Bootstrap::parse(bad).is_err(), "{bad}");
        }
        assert!(Network::create("a\nb", vec![]).is_err());
    }

    #[test]
    fn the_home_is_private_and_the_identity_is_made_once() {
        let dir = std::env::temp_dir().join(format!("omerta-home-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let home = Home { dir: dir.clone() };
        home.private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let a = home.identity().unwrap();
        let b = home.identity().unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(fs::metadata(dir.join("identity.key")).unwrap().permissions().mode() & 0o777, 0o600);
        let n = Network::create("lab", vec![]).unwrap();
        let id = home.save_network(&n).unwrap();
        assert_eq!(home.network(&id).unwrap(), n);
        assert_eq!(
            fs::metadata(dir.join("networks").join(format!("{id}.json"))).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(home.network("../x").is_err());
        assert!(home.remove_network(&id).unwrap());
        assert!(!home.remove_network(&id).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
