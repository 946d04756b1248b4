//! The strict grammar every field from a peer (or the CLI) meets before it is used. Each
//! checker returns the value typed, or an [`Invalid`] whose one-line message quotes at most a
//! short, printable prefix of what was sent. It uses only [`crate::text`] (no circle with
//! `net`, which uses it).
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::text::{b64, printable};

/// The only login a VM is made with.
pub const SSH_USER: &str = "omerta";
/// Longest SSH public key line accepted.
pub const MAX_SSH_KEY: usize = 256;

/// Why a field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not `IP:PORT`.
    #[error("'{0}': not IP:PORT")]
    NotEndpoint(String),
    /// An endpoint nobody can send to.
    #[error("'{0}': not an endpoint others can reach (a unicast IPv4 address and a port from 1)")]
    Unreachable(String),
    /// Not a WireGuard key.
    #[error("'{0}': not a WireGuard key (32 bytes of base64)")]
    WgKey(String),
    /// An SSH public key, and what is wrong with it.
    #[error("the SSH public key {0}")]
    SshKey(String),
    /// Another login than `omerta`.
    #[error("'{0}': the only SSH user is omerta")]
    SshUser(String),
    /// Not a tunnel address.
    #[error("'{0}': not a tunnel address (a private IPv4 address)")]
    TunnelIp(String),
    /// Two tunnel addresses that do not pair.
    #[error("the tunnel addresses {0} and {1} must differ and share a /24")]
    TunnelPair(Ipv4Addr, Ipv4Addr),
    /// Not a VM ID.
    #[error("'{0}': not a VM ID")]
    VmId(String),
    /// Not an SSH fingerprint.
    #[error("'{0}': not an SSH fingerprint")]
    Fingerprint(String),
}

/// `IP:PORT` exactly: dotted-quad IPv4, port 1 to 65535, nothing before or after.
pub fn endpoint(s: &str) -> Result<SocketAddrV4, Invalid> {
    let bad = || Invalid::NotEndpoint(printable(s, 40));
    if s.len() > 21 || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b':') {
        return Err(bad());
    }
    let ep: SocketAddrV4 = s.parse().map_err(|_| bad())?;
    if ep.port() == 0 || ep.ip().is_unspecified() || ep.ip().is_broadcast() || ep.ip().is_multicast() {
        return Err(Invalid::Unreachable(printable(s, 40)));
    }
    Ok(ep)
}

/// A WireGuard public key: 32 bytes in standard base64 (44 characters).
pub fn wg_key(s: &str) -> Result<String, Invalid> {
    if api::keys::valid_wg_key(s) {
        Ok(s.to_string())
    } else {
        Err(Invalid::WgKey(printable(s, 48)))
    }
}

/// One `ssh-ed25519 BASE64 [comment]` line; returns `ssh-ed25519 BASE64` (the comment, if any,
/// is letters, digits and `@._-` only, and is dropped).
pub fn ssh_public_key(s: &str) -> Result<String, Invalid> {
    let bad = |why: &str| Invalid::SshKey(why.to_string());
    if s.len() > MAX_SSH_KEY {
        return Err(bad(&format!("is over {MAX_SSH_KEY} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("holds a control character (one line only)"));
    }
    let words: Vec<&str> = s.split(' ').collect();
    let (t, k) = match words.as_slice() {
        [t, k] => (*t, *k),
        [t, k, c] if !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c)) => (*t, *k),
        _ => return Err(bad("is not 'ssh-ed25519 BASE64 [comment]'")),
    };
    if t != "ssh-ed25519" {
        return Err(bad("is not of type ssh-ed25519"));
    }
    // The wire form: string "ssh-ed25519", string of 32 bytes.
    let blob = b64(k).ok_or_else(|| bad("is not base64"))?;
    if blob.len() != 51 || blob[..15] != *b"\0\0\0\x0bssh-ed25519" || blob[15..19] != [0, 0, 0, 32] {
        return Err(bad("does not decode to an Ed25519 key"));
    }
    let line = format!("{t} {k}");
    ssh_key::PublicKey::from_openssh(&line).map_err(|e| bad(&format!("is unreadable: {e}")))?;
    Ok(line)
}

/// The login: `omerta` only.
pub fn ssh_user(s: &str) -> Result<(), Invalid> {
    if s == SSH_USER {
        Ok(())
    } else {
        Err(Invalid::SshUser(printable(s, 32)))
    }
}

/// A tunnel address: a dotted-quad private IPv4 address, nothing else (no prefix, no
/// `0.0.0.0`, no network or broadcast address of its /24).
pub fn tunnel_ip(s: &str) -> Result<Ipv4Addr, Invalid> {
    let bad = || Invalid::TunnelIp(printable(s, 40));
    if s.len() > 15 || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let ip: Ipv4Addr = s.parse().map_err(|_| bad())?;
    let last = ip.octets()[3];
    if !ip.is_private() || last == 0 || last == 255 {
        return Err(bad());
    }
    Ok(ip)
}

/// The consumer's and the VM's tunnel addresses: both valid, distinct, in one /24.
pub fn tunnel_pair(consumer: &str, vm: &str) -> Result<(Ipv4Addr, Ipv4Addr), Invalid> {
    let (c, v) = (tunnel_ip(consumer)?, tunnel_ip(vm)?);
    if c == v || c.octets()[..3] != v.octets()[..3] {
        return Err(Invalid::TunnelPair(c, v));
    }
    Ok((c, v))
}

/// A VM ID: 16 lowercase hex characters (the provider makes them).
pub fn vm_id(s: &str) -> Result<String, Invalid> {
    if crate::text::valid_id(s) {
        Ok(s.to_string())
    } else {
        Err(Invalid::VmId(printable(s, 40)))
    }
}

/// An SSH host key fingerprint as OpenSSH prints it: `SHA256:` and 43 base64 characters.
pub fn fingerprint(s: &str) -> Result<String, Invalid> {
    let ok = s.len() == 50
        && s.starts_with("SHA256:")
        && s[7..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if ok {
        Ok(s.to_string())
    } else {
        Err(Invalid::Fingerprint(printable(s, 60)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJJaCgxwgG8k2yq9OFDQ4zYmkBrj3AnqmsVC6WxQ9YU";

    #[test]
    fn what_a_hostile_peer_sends_is_refused() {
        assert!(endpoint("192.0.2.2:51900").is_ok());
        for bad in
            ["192.0.2.2:51900,mode=direct", "192.0.2.2:51900\n", "0.0.0.0:1", "192.0.2.2:0", " 192.0.2.2:1", "../x:1"]
        {
            assert!(endpoint(bad).is_err(), "{bad:?}");
        }
        assert!(ssh_public_key(KEY).is_ok());
        assert!(ssh_public_key(&format!("{KEY} alice@laptop")).is_ok());
        for bad in [
            format!("{KEY}\nssh-ed25519 AAAA"),
            format!("{KEY} a,mode=direct"),
            format!("{KEY} ../../etc"),
            format!("ssh-ed25519 {}", "A".repeat(400)),
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ".to_string(),
            format!("command=\"x\" {KEY}"),
        ] {
            assert!(ssh_public_key(&bad).is_err(), "{bad:?}");
        }
        assert!(ssh_user("omerta").is_ok() && ssh_user("root").is_err() && ssh_user("omerta\n").is_err());
        assert!(tunnel_pair("10.77.3.1", "10.77.3.2").is_ok());
        for (c, v) in [
            ("0.0.0.0/0", "10.0.0.2"),
            ("10.1.1.1", "10.1.2.2"),
            ("10.1.1.1", "10.1.1.1"),
            ("8.8.8.8", "8.8.8.9"),
            ("10.1.1.0", "10.1.1.2"),
        ] {
            assert!(tunnel_pair(c, v).is_err(), "{c} {v}");
        }
        assert!(wg_key(&"A".repeat(43)).is_err());
        assert!(wg_key(&format!("{}=", "A".repeat(43))).is_ok());
        assert!(wg_key(&"A".repeat(400)).is_err());
        assert!(vm_id("../etc/passwd").is_err() && vm_id("0123456789abcdef").is_ok());
    }
}
