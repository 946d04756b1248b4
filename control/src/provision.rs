//! The keys the engine makes for a cloud-image VM: its WireGuard key pair and its SSH host
//! key, from the OS CSPRNG, with well-kept crates (boringtun's x25519, RustCrypto's ssh-key);
//! no cryptography of our own. Only the public halves and the host key's fingerprint leave the
//! engine (in `vm show`); the private halves go into the VM's seed and nowhere else.
#![forbid(unsafe_code)]

use base64::Engine as _;

/// A VM's keys. `Debug` shows the public halves only.
#[derive(Clone, PartialEq, Eq)]
pub struct VmKeys {
    /// WireGuard private key (base64), for the seed only.
    pub wg_private: String,
    /// WireGuard public key (base64).
    pub wg_public: String,
    /// SSH host key, OpenSSH private key format, for the seed only.
    pub host_private: String,
    /// SSH host key, `ssh-ed25519 AAAA...`.
    pub host_public: String,
    /// Its fingerprint, `SHA256:...` (what `ssh-keygen -l` prints), to hand to the consumer.
    pub host_fingerprint: String,
}

impl std::fmt::Debug for VmKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKeys")
            .field("wg_public", &self.wg_public)
            .field("host_public", &self.host_public)
            .finish_non_exhaustive()
    }
}

/// Why no key could be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The OS gave no random bytes.
    #[error("the OS random source: {0}")]
    Random(getrandom::Error),
    /// The SSH key could not be written out.
    #[error("SSH host key: {0}")]
    Ssh(#[from] ssh_key::Error),
    /// The other side's endpoint-proof key is not one.
    #[error("proof key: {0}")]
    Proof(&'static str),
}

fn random32() -> Result<[u8; 32], KeyError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(KeyError::Random)?;
    Ok(b)
}

/// A WireGuard key pair (private, public), base64 as `wg` reads it.
pub fn wg_keypair() -> Result<(String, String), KeyError> {
    let secret = boringtun::x25519::StaticSecret::from(random32()?);
    let public = boringtun::x25519::PublicKey::from(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok((b64.encode(secret.to_bytes()), b64.encode(public.as_bytes())))
}

/// Fresh keys for a VM.
pub fn generate() -> Result<VmKeys, KeyError> {
    let (wg_private, wg_public) = wg_keypair()?;
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&random32()?);
    let key = ssh_key::PrivateKey::from(pair);
    let host_private = key.to_openssh(ssh_key::LineEnding::LF)?.to_string();
    let public = key.public_key().to_openssh()?;
    let host_public = public.split(' ').take(2).collect::<Vec<_>>().join(" ");
    let host_fingerprint = key.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string();
    Ok(VmKeys { wg_private, wg_public, host_private, host_public, host_fingerprint })
}

/// The field rules of keys, shared with the control API (which checks a request's keys).
pub use api::keys::{ssh_public_key, valid_wg_key};

/// Which side of a rental's endpoint-proof exchange we are (the key binds both public keys in
/// one order: the consumer's first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofSide {
    /// The renter, whose tunnel sends the proofs.
    Consumer,
    /// The engine, which checks them.
    Engine,
}

/// Our half of a rental's endpoint-proof exchange (X25519, made for this rental alone). Its
/// `Debug` shows nothing.
pub struct ProofSecret(boringtun::x25519::StaticSecret);

impl std::fmt::Debug for ProofSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofSecret(..)")
    }
}

impl ProofSecret {
    /// A fresh pair: the secret, and the public half in base64 for the other side.
    pub fn generate() -> Result<(Self, String), KeyError> {
        let secret = boringtun::x25519::StaticSecret::from(random32()?);
        let public = boringtun::x25519::PublicKey::from(&secret);
        Ok((Self(secret), base64::engine::general_purpose::STANDARD.encode(public.as_bytes())))
    }

    /// The rental's proof key, from our secret and the other side's public half (base64).
    /// A low-order public key (one that would make the key known to anyone) is refused.
    pub fn key(&self, theirs: &str, we: ProofSide) -> Result<engine::proof::Key, KeyError> {
        let theirs = api::keys::wg_key_bytes(theirs).ok_or(KeyError::Proof("not 32 bytes of base64"))?;
        let theirs = boringtun::x25519::PublicKey::from(theirs);
        let shared = self.0.diffie_hellman(&theirs);
        if !shared.was_contributory() {
            return Err(KeyError::Proof("a low-order point"));
        }
        let ours = boringtun::x25519::PublicKey::from(&self.0);
        let (c, e) = match we {
            ProofSide::Consumer => (ours.as_bytes(), theirs.as_bytes()),
            ProofSide::Engine => (theirs.as_bytes(), ours.as_bytes()),
        };
        Ok(engine::proof::derive(shared.as_bytes(), c, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_well_formed_and_the_seed_accepts_them() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a.wg_private, b.wg_private);
        assert_ne!(a.host_private, b.host_private);
        assert!(valid_wg_key(&a.wg_private) && valid_wg_key(&a.wg_public));
        assert!(a.host_public.starts_with("ssh-ed25519 AAAA"), "{}", a.host_public);
        assert!(a.host_fingerprint.starts_with("SHA256:"), "{}", a.host_fingerprint);
        assert_eq!(ssh_public_key(&format!("{} a@b", a.host_public)).unwrap(), a.host_public);
        // The public half is the one the private half makes.
        let back = ssh_key::PrivateKey::from_openssh(&a.host_private).unwrap();
        assert_eq!(back.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string(), a.host_fingerprint);
        let shown = format!("{a:?}");
        assert!(!shown.contains(&a.wg_private) && !shown.contains("PRIVATE"), "{shown}");
    }

    #[test]
    fn bad_public_keys_are_refused() {
        assert!(!valid_wg_key("AAAA"));
        assert!(!valid_wg_key(&"A".repeat(44)));
        assert!(ssh_public_key("ssh-ed25519").is_err());
        assert!(ssh_public_key("ssh-ed25519 AAAAnotakey").is_err());
        assert!(ssh_public_key("ssh-dss AAAAB3NzaC1kc3M=").is_err());
    }

    #[test]
    fn both_sides_of_a_proof_exchange_reach_one_key_and_a_low_order_point_is_refused() {
        let (c, c_pub) = ProofSecret::generate().unwrap();
        let (e, e_pub) = ProofSecret::generate().unwrap();
        let kc = c.key(&e_pub, ProofSide::Consumer).unwrap();
        assert_eq!(kc, e.key(&c_pub, ProofSide::Engine).unwrap());
        // Sides swapped: another key (the order binds who is who).
        assert_ne!(kc, c.key(&e_pub, ProofSide::Engine).unwrap());
        let zero = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert!(matches!(c.key(&zero, ProofSide::Consumer), Err(KeyError::Proof(_))));
        assert!(c.key("short", ProofSide::Consumer).is_err());
    }
}
