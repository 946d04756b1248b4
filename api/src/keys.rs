//! The rules a key from a request meets before it is used: a WireGuard public key and an
//! OpenSSH public key.
use base64::Engine as _;

/// A WireGuard public key as given: 32 bytes in standard base64.
pub fn valid_wg_key(s: &str) -> bool {
    wg_key_bytes(s).is_some()
}

/// A WireGuard key's 32 bytes, from its standard base64 (`None` if it is not one).
pub fn wg_key_bytes(s: &str) -> Option<[u8; 32]> {
    if s.len() != 44 {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()?.try_into().ok()
}

/// An SSH public key as given (`TYPE BASE64 [comment]`), normalised to `TYPE BASE64`: the key
/// must decode; options and the comment are dropped.
pub fn ssh_public_key(s: &str) -> Result<String, String> {
    let mut words = s.split_whitespace();
    let (Some(t), Some(b)) = (words.next(), words.next()) else {
        return Err("an SSH public key is 'TYPE BASE64 [comment]'".into());
    };
    let line = format!("{t} {b}");
    if !hv::cloud::valid_ssh_public_key(&line) {
        return Err(format!("'{}': not an SSH public key of a known type", t.chars().take(32).collect::<String>()));
    }
    ssh_key::PublicKey::from_openssh(&line).map_err(|e| format!("SSH public key: {e}"))?;
    Ok(line)
}
