//! Small text helpers every module may use: the ID grammar, base64 decoding and printing a
//! peer's string safely. A leaf: it imports nothing of this crate.
use base64::Engine as _;

/// Whether `s` is a network, peer or VM ID (16 lowercase hex characters).
pub fn valid_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Decodes standard or URL-safe base64, padded or not; `None` if it is none of them.
pub fn b64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .ok()
}

/// At most `max` characters of `s`, control characters replaced: safe to print in an error.
pub fn printable(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect()
}
