//! The datagrams between daemons.
//!
//! Each is `nonce(12) ‖ ciphertext ‖ tag(16)`: ChaCha20-Poly1305 under the network key, over
//! the JSON `{"envelope": "<envelope JSON>", "signature": "<base64>"}`, the signature being the
//! sender's Ed25519 signature of the envelope's exact bytes. The envelope is
//! `{messageId, fromPeerId, publicKey, toPeerId, hopCount, timestamp, payload}`, the payload a
//! message tagged by its `type`. A receiver drops what does not decrypt, parse or verify,
//! what is not for it, what relays (`hopCount` > 0) and what is stale (±[`MAX_SKEW_S`]);
//! replays, rates and paths are [`crate::admit`]'s.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Largest datagram sent or read.
pub const MAX_DATAGRAM: usize = 8192;
/// A message older or newer than this many seconds is stale.
pub const MAX_SKEW_S: u64 = 120;
/// A VM's size, as asked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirements {
    /// vCPUs.
    pub cpu_cores: u32,
    /// `x86_64` (the only one offered here).
    #[serde(default)]
    pub cpu_architecture: Arch,
    /// Memory.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Disk (the overlay's room).
    #[serde(rename = "storageMB")]
    pub storage_mb: u32,
    /// GPUs: none are offered.
    #[serde(default)]
    pub gpu: bool,
}

/// A CPU architecture.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Arch {
    /// The one this provider runs.
    #[default]
    #[serde(rename = "x86_64")]
    X86_64,
    /// Asked for, never offered here.
    #[serde(rename = "arm64")]
    Arm64,
}

impl Default for Requirements {
    fn default() -> Self {
        Self { cpu_cores: 2, cpu_architecture: Arch::X86_64, memory_mb: 2048, storage_mb: 4096, gpu: false }
    }
}

/// `vm_request`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmRequest {
    /// The consumer's ID for this request, echoed in the answer.
    pub request_id: String,
    /// The size.
    pub requirements: Requirements,
    /// The consumer's WireGuard public key.
    pub consumer_public_key: String,
    /// The consumer's WireGuard endpoint (its IP must be the datagram's source).
    pub consumer_endpoint: String,
    /// The consumer's tunnel address.
    #[serde(rename = "consumerVPNIP")]
    pub consumer_vpn_ip: String,
    /// The VM's tunnel address, proposed by the consumer.
    #[serde(rename = "vmVPNIP")]
    pub vm_vpn_ip: String,
    /// `ssh-ed25519 BASE64 [comment]`.
    pub ssh_public_key: String,
    /// `omerta`.
    pub ssh_user: String,
    /// Minutes without heartbeat answers before the provider reclaims the VM.
    #[serde(default)]
    pub timeout_minutes: Option<u32>,
    /// Nothing is started (both daemons in dry run).
    #[serde(default)]
    pub dry_run: bool,
    /// The consumer's endpoint-proof public key (X25519, base64), made for this request. With
    /// it the consumer may be behind NAT: `consumerEndpoint` is not checked, and the VM's
    /// endpoint is learned from the consumer's proofs to `vmPort` (docs/mesh.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_proof_key: Option<String>,
}

/// `vm_created`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmCreated {
    /// The request answered.
    pub request_id: String,
    /// The VM's ID (the provider's choice).
    pub vm_id: String,
    /// The VM's tunnel address.
    #[serde(rename = "vmIP")]
    pub vm_ip: String,
    /// The VM's WireGuard public key (made by the provider's engine).
    pub vm_public_key: String,
    /// The VM's SSH host key, `ssh-ed25519 BASE64`.
    pub ssh_host_key: String,
    /// Its fingerprint, `SHA256:...`.
    pub ssh_host_fingerprint: String,
    /// Seconds without heartbeat answers before the provider reclaims it.
    #[serde(default, rename = "heartbeatTimeoutSeconds")]
    pub heartbeat_timeout_s: Option<u64>,
    /// The provider's UDP port for this VM (its WireGuard, at the provider's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_port: Option<u16>,
    /// The engine's endpoint-proof public key, for a request that gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_proof_key: Option<String>,
}

/// The messages, dispatched on `type`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// "I am here" (keepalive); answered by `hello_ack` the first time.
    Hello {
        /// Whether the sender wants a hello back.
        reply: bool,
    },
    /// Reachability probe.
    Ping {
        /// Echoed.
        nonce: String,
    },
    /// Its answer.
    Pong {
        /// As received.
        nonce: String,
    },
    /// A consumer asks for a VM.
    VmRequest(Box<VmRequest>),
    /// The provider made it.
    VmCreated(Box<VmCreated>),
    /// A request, a VM or a release failed.
    VmError {
        /// The request, when answering one.
        #[serde(default, rename = "requestId")]
        request_id: Option<String>,
        /// The VM, when known.
        #[serde(default, rename = "vmId")]
        vm_id: Option<String>,
        /// Why.
        error: String,
    },
    /// The consumer is done with a VM.
    VmRelease {
        /// Which.
        #[serde(rename = "vmId")]
        vm_id: String,
    },
    /// It is gone (also for a VM the provider did not know).
    VmReleased {
        /// Which.
        #[serde(rename = "vmId")]
        vm_id: String,
    },
    /// The provider's list of a consumer's VMs.
    VmHeartbeat {
        /// The VMs.
        #[serde(rename = "vmIds")]
        vm_ids: Vec<String>,
        /// When.
        timestamp: u64,
    },
    /// The VMs of that list the consumer still wants.
    VmHeartbeatResponse {
        /// The VMs.
        #[serde(rename = "vmIds")]
        vm_ids: Vec<String>,
    },
    /// The consumer's WireGuard endpoint moved.
    VmEndpointUpdate {
        /// Which VM.
        #[serde(rename = "vmId")]
        vm_id: String,
        /// The new endpoint (its IP must be the datagram's source).
        #[serde(rename = "consumerEndpoint")]
        consumer_endpoint: String,
    },
    /// A rented VM's guest was paused, or runs again: the provider's host ran out of room
    /// for its disk (it goes on by itself when there is room).
    VmStatus {
        /// Which VM.
        #[serde(rename = "vmId")]
        vm_id: String,
        /// `paused` or `running`.
        state: RunState,
        /// Why, when paused.
        #[serde(default)]
        reason: String,
    },
}

/// A rented VM's guest, as `vm_status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Paused by its provider's host.
    Paused,
    /// Running.
    Running,
}

impl Message {
    /// Its `type`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::VmRequest(_) => "vm_request",
            Message::VmCreated(_) => "vm_created",
            Message::VmError { .. } => "vm_error",
            Message::VmRelease { .. } => "vm_release",
            Message::VmReleased { .. } => "vm_released",
            Message::VmHeartbeat { .. } => "vm_heartbeat",
            Message::VmHeartbeatResponse { .. } => "vm_heartbeat_response",
            Message::VmEndpointUpdate { .. } => "vm_endpoint_update",
            Message::VmStatus { .. } => "vm_status",
        }
    }
}

/// The signed part of a datagram.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// 16 hex characters, random.
    pub message_id: String,
    /// The sender's peer ID: derived from `public_key`.
    pub from_peer_id: String,
    /// The sender's Ed25519 public key, base64.
    pub public_key: String,
    /// The receiver's peer ID.
    pub to_peer_id: String,
    /// Always 0: nothing is relayed.
    pub hop_count: u8,
    /// Seconds since the epoch.
    pub timestamp: u64,
    /// The message.
    pub payload: Message,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    envelope: String,
    signature: String,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drop {
    /// Over [`MAX_DATAGRAM`] or under a nonce and a tag.
    Size(usize),
    /// Another network key, or damage.
    Decrypt,
    /// Not the JSON of a signed envelope.
    Malformed(String),
    /// The signature, or the peer ID against the key, does not match.
    Signature,
    /// Addressed to another peer.
    NotForUs,
    /// `hopCount` is not 0.
    Relayed,
    /// Outside ±[`MAX_SKEW_S`].
    Stale(u64),
}

impl std::fmt::Display for Drop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drop::Size(n) => write!(f, "a datagram of {n} bytes"),
            Drop::Decrypt => f.write_str("Failed to decrypt message"),
            Drop::Malformed(why) => write!(f, "a malformed message ({why})"),
            Drop::Signature => f.write_str("a bad signature"),
            Drop::NotForUs => f.write_str("a message for another peer"),
            Drop::Relayed => f.write_str("a relayed message"),
            Drop::Stale(t) => write!(f, "a stale message (timestamp {t})"),
        }
    }
}

/// Seals `payload` from `me` to `to` under the network key (the OS's randomness makes its
/// message ID and nonce).
pub fn seal(key: &[u8; 32], me: &SigningKey, to: &str, payload: Message) -> Result<Vec<u8>, crate::RandomError> {
    seal_at(key, me, to, payload, crate::now_s(), 0)
}

/// [`seal`] with the timestamp and hop count given (tests make stale and relayed messages).
pub fn seal_at(
    key: &[u8; 32],
    me: &SigningKey,
    to: &str,
    payload: Message,
    timestamp: u64,
    hop_count: u8,
) -> Result<Vec<u8>, crate::RandomError> {
    let id = crate::random::<8>()?;
    let nonce = crate::random::<12>()?;
    Ok(seal_fixed(key, me, to, payload, timestamp, hop_count, u64::from_be_bytes(id), nonce))
}

/// [`seal_at`] with the message ID and the AEAD nonce given (the fuzz target's sessions are
/// reproducible).
#[allow(clippy::too_many_arguments)]
pub fn seal_fixed(
    key: &[u8; 32],
    me: &SigningKey,
    to: &str,
    payload: Message,
    timestamp: u64,
    hop_count: u8,
    message_id: u64,
    nonce: [u8; 12],
) -> Vec<u8> {
    let public = me.verifying_key().to_bytes();
    let env = Envelope {
        message_id: format!("{message_id:016x}"),
        from_peer_id: crate::net::peer_id(&public),
        public_key: base64::engine::general_purpose::STANDARD.encode(public),
        to_peer_id: to.into(),
        hop_count,
        timestamp,
        payload,
    };
    let envelope = serde_json::to_string(&env).unwrap_or_default();
    let signature = base64::engine::general_purpose::STANDARD.encode(me.sign(envelope.as_bytes()).to_bytes());
    let plain = serde_json::to_vec(&Signed { envelope, signature }).unwrap_or_default();
    let sealed = ChaCha20Poly1305::new(key.into()).encrypt(Nonce::from_slice(&nonce), plain.as_slice());
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed.unwrap_or_default());
    out
}

/// Opens a datagram meant for `me` (a peer ID), checking everything (see the module doc):
/// [`unseal`], then [`Unverified::verify`].
pub fn open(key: &[u8; 32], me: &str, data: &[u8], now: u64) -> Result<(Envelope, [u8; 32]), Drop> {
    unseal(key, data)?.verify(me, now)
}

/// A datagram decrypted and parsed, its signature not yet checked: who it claims to be from
/// is known before the costly check (admission charges it to that peer when it comes from
/// that peer's address).
#[derive(Debug)]
pub struct Unverified {
    signed: Signed,
    env: Envelope,
}

impl Unverified {
    /// The peer ID it claims (unproven).
    pub fn claimed(&self) -> &str {
        &self.env.from_peer_id
    }

    /// Checks the signature, the peer ID against the key, the addressee, the hop count, the
    /// skew and the message ID's form.
    pub fn verify(self, me: &str, now: u64) -> Result<(Envelope, [u8; 32]), Drop> {
        let Unverified { signed, env } = self;
        let public: [u8; 32] =
            crate::text::b64(&env.public_key).and_then(|b| b.try_into().ok()).ok_or(Drop::Signature)?;
        let verifying = VerifyingKey::from_bytes(&public).map_err(|_| Drop::Signature)?;
        let sig: [u8; 64] =
            crate::text::b64(&signed.signature).and_then(|b| b.try_into().ok()).ok_or(Drop::Signature)?;
        verifying
            .verify_strict(signed.envelope.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| Drop::Signature)?;
        if crate::net::peer_id(&public) != env.from_peer_id {
            return Err(Drop::Signature);
        }
        if env.to_peer_id != me {
            return Err(Drop::NotForUs);
        }
        if env.hop_count != 0 {
            return Err(Drop::Relayed);
        }
        if env.timestamp.abs_diff(now) > MAX_SKEW_S {
            return Err(Drop::Stale(env.timestamp));
        }
        if !crate::net::valid_id(&env.message_id) {
            return Err(Drop::Malformed("a message ID".into()));
        }
        Ok((env, public))
    }
}

/// Decrypts and parses a datagram (size, AEAD, JSON): what decrypts was sealed by a member.
pub fn unseal(key: &[u8; 32], data: &[u8]) -> Result<Unverified, Drop> {
    parse(&decrypt(key, data)?)
}

/// Decrypts a datagram (size, AEAD): its plaintext, sealed by a member.
pub fn decrypt(key: &[u8; 32], data: &[u8]) -> Result<Vec<u8>, Drop> {
    if data.len() > MAX_DATAGRAM || data.len() < 12 + 16 {
        return Err(Drop::Size(data.len()));
    }
    let (nonce, body) = data.split_at(12);
    ChaCha20Poly1305::new(key.into()).decrypt(Nonce::from_slice(nonce), body).map_err(|_| Drop::Decrypt)
}

/// Parses a plaintext as a signed envelope (JSON).
pub fn parse(plain: &[u8]) -> Result<Unverified, Drop> {
    let signed: Signed = serde_json::from_slice(plain).map_err(|e| Drop::Malformed(short(&e)))?;
    let env: Envelope = serde_json::from_str(&signed.envelope).map_err(|e| Drop::Malformed(short(&e)))?;
    Ok(Unverified { signed, env })
}

/// The checks of [`open`] after decryption: `plain` is what the AEAD gave (fuzzed directly).
pub fn open_plain(me: &str, plain: &[u8], now: u64) -> Result<(Envelope, [u8; 32]), Drop> {
    parse(plain)?.verify(me, now)
}

/// A serde error's first line, bounded (it may quote input: only its position and kind).
fn short(e: &serde_json::Error) -> String {
    format!("{:?} at line {} column {}", e.classify(), e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> (SigningKey, String) {
        let k = SigningKey::from_bytes(&crate::random::<32>().unwrap());
        let id = crate::net::peer_id(&k.verifying_key().to_bytes());
        (k, id)
    }

    #[test]
    fn a_sealed_message_opens_only_under_its_key_for_its_peer() {
        let key = crate::random::<32>().unwrap();
        let (a, _) = node();
        let (_, b_id) = node();
        let now = crate::now_s();
        let d = seal(&key, &a, &b_id, Message::Ping { nonce: "1".into() }).unwrap();
        let (env, _) = open(&key, &b_id, &d, now).unwrap();
        assert_eq!(env.payload, Message::Ping { nonce: "1".into() });
        assert_eq!(open(&crate::random::<32>().unwrap(), &b_id, &d, now).unwrap_err(), Drop::Decrypt);
        assert_eq!(open(&key, "0000000000000000", &d, now).unwrap_err(), Drop::NotForUs);
        let stale = seal_at(&key, &a, &b_id, Message::Hello { reply: false }, now - 121, 0).unwrap();
        assert!(matches!(open(&key, &b_id, &stale, now), Err(Drop::Stale(_))));
        let relayed = seal_at(&key, &a, &b_id, Message::Hello { reply: false }, now, 1).unwrap();
        assert_eq!(open(&key, &b_id, &relayed, now).unwrap_err(), Drop::Relayed);
        let mut flipped = d.clone();
        flipped[20] ^= 1;
        assert_eq!(open(&key, &b_id, &flipped, now).unwrap_err(), Drop::Decrypt);
    }

    #[test]
    fn a_forged_sender_or_signature_is_refused() {
        let key = crate::random::<32>().unwrap();
        let (a, _) = node();
        let (_, b_id) = node();
        let (_, c_id) = node();
        let public = a.verifying_key().to_bytes();
        let env = Envelope {
            message_id: "00112233445566ff".into(),
            from_peer_id: c_id,
            public_key: base64::engine::general_purpose::STANDARD.encode(public),
            to_peer_id: b_id.clone(),
            hop_count: 0,
            timestamp: crate::now_s(),
            payload: Message::Hello { reply: false },
        };
        let envelope = serde_json::to_string(&env).unwrap();
        let signature = base64::engine::general_purpose::STANDARD.encode(a.sign(envelope.as_bytes()).to_bytes());
        let plain = serde_json::to_vec(&Signed { envelope, signature }).unwrap();
        let nonce = [7u8; 12];
        let mut d = nonce.to_vec();
        d.extend(ChaCha20Poly1305::new((&key).into()).encrypt(Nonce::from_slice(&nonce), plain.as_slice()).unwrap());
        assert_eq!(open(&key, &b_id, &d, crate::now_s()).unwrap_err(), Drop::Signature);
    }

    #[test]
    fn messages_dispatch_on_their_type() {
        let released: Message = serde_json::from_str(r#"{"type":"vm_released","vmId":"0123456789abcdef"}"#).unwrap();
        assert_eq!(released, Message::VmReleased { vm_id: "0123456789abcdef".into() });
        let release: Message = serde_json::from_str(r#"{"type":"vm_release","vmId":"0123456789abcdef"}"#).unwrap();
        assert_eq!(release.kind(), "vm_release");
        assert!(serde_json::from_str::<Message>(r#"{"vmId":"0123456789abcdef"}"#).is_err());
        assert!(serde_json::from_str::<Message>(r#"{"type":"vm_release","vmId":"x","extra":1}"#).is_err());
    }

    #[test]
    fn any_bytes_are_dropped_without_a_panic() {
        let key = crate::random::<32>().unwrap();
        let mut x: u32 = 1;
        for len in 0..600 {
            let d = crate::fuzzing::noise(&mut x, len);
            assert!(open(&key, "0000000000000000", &d, 0).is_err());
        }
        assert!(matches!(open(&key, "x", &vec![0; MAX_DATAGRAM + 1], 0), Err(Drop::Size(_))));
    }
}
