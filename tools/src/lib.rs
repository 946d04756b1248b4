//! Helper programs for tests and demos: `omerta-guest` (inside a test VM), `omerta-consumer`
//! (a userspace WireGuard peer on boringtun, playing the consumer), `omerta-mkinitramfs`.
//! None of them is part of the data plane. This library holds what they share with the tests:
//! WireGuard keys in the base64 form `wg` uses.
#![forbid(unsafe_code)]

use boringtun::x25519::{PublicKey, StaticSecret};

/// Standard base64 with padding (what `wg` reads and prints).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = [c[0], c.get(1).copied().unwrap_or(0), c.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64; `None` on bad input.
pub fn unbase64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | u32::from(val(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// A WireGuard key pair from 32 seed bytes: (private, public), both base64.
pub fn wg_keypair(seed: [u8; 32]) -> (String, String) {
    let secret = StaticSecret::from(seed);
    let public = PublicKey::from(&secret);
    (base64(&secret.to_bytes()), base64(public.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_known_value() {
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
        for n in 0..40u8 {
            let v: Vec<u8> = (0..n).collect();
            assert_eq!(unbase64(&base64(&v)).unwrap(), v);
        }
        let (private, public) = wg_keypair([7; 32]);
        assert_eq!((private.len(), public.len()), (44, 44));
    }
}
