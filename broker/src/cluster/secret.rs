//! The cluster secret, the one thing every member shares. It is never used as a key itself:
//! [`Secret::derive_key`] derives one key per purpose (HKDF-SHA256 with a label) — the Noise
//! pre-shared key that authenticates and encrypts every inter-node TCP link ([`super::link`])
//! and the ChaCha20-Poly1305 key that seals every gossip datagram ([`super::gossip`]). A pod of
//! another cluster, or anything else that can reach the cluster port without the secret,
//! cannot join, inject routes or gossip, replay captured traffic, or read forwarded messages.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::ClusterError;

type HmacSha256 = Hmac<Sha256>;

/// Length of the truncated tags appended to gossip datagrams.
pub const TAG_LEN: usize = 16;

/// The shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the secret file (trailing whitespace ignored); it must hold at least 16 bytes.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let raw = std::fs::read(path)
            .map_err(|e| ClusterError::Secret(format!("{}: {e}", path.display())))?;
        let trimmed = raw.trim_ascii_end().to_vec();
        if trimmed.len() < 16 {
            return Err(ClusterError::Secret(format!(
                "{}: the cluster secret must be at least 16 bytes",
                path.display()
            )));
        }
        Ok(Secret(trimmed))
    }

    /// A secret from bytes (tests).
    pub fn from_bytes(b: &[u8]) -> Self {
        Secret(b.to_vec())
    }

    /// A 32-byte key for one purpose, `label` (HKDF-SHA256: extract with a fixed salt, expand
    /// with the label), so link and gossip keys differ and neither reveals the secret.
    pub fn derive_key(&self, label: &[u8]) -> [u8; 32] {
        let mut extract = hmac_with(b"corvid-cluster-kdf-v1");
        extract.update(&self.0);
        let prk = extract.finalize().into_bytes();
        let mut expand = hmac_with(&prk);
        expand.update(label);
        expand.update(&[1u8]);
        let mut key = [0u8; 32];
        key.copy_from_slice(&expand.finalize().into_bytes()[..32]);
        key
    }

    fn mac(&self) -> HmacSha256 {
        hmac_with(&self.0)
    }

    /// Full tag over the concatenation of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut m = self.mac();
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }

    /// Constant-time check of a full or truncated tag.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = self.mac();
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        if tag.len() < TAG_LEN {
            return false;
        }
        m.verify_truncated_left(tag).is_ok()
    }
}

/// An HMAC-SHA256 keyed with `key` (HMAC accepts keys of any length).
fn hmac_with(key: &[u8]) -> HmacSha256 {
    match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // `new_from_slice` only fails for fixed-size-key MACs; HMAC takes any key.
    panic!("HMAC rejected a key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_with_the_same_secret() {
        let a = Secret::from_bytes(b"0123456789abcdef-a");
        let b = Secret::from_bytes(b"0123456789abcdef-b");
        let t = a.tag(&[b"hello", b"world"]);
        assert!(a.verify(&[b"hello", b"world"], &t));
        assert!(a.verify(&[b"hello", b"world"], &t[..TAG_LEN]));
        assert!(!b.verify(&[b"hello", b"world"], &t));
        assert!(!a.verify(&[b"helloworld"], &t));
        assert!(!a.verify(&[b"hello", b"world"], &t[..4]));
    }

    #[test]
    fn derived_keys_differ_by_label_and_secret() {
        let a = Secret::from_bytes(b"0123456789abcdef-a");
        let b = Secret::from_bytes(b"0123456789abcdef-b");
        assert_eq!(a.derive_key(b"link"), a.derive_key(b"link"));
        assert_ne!(a.derive_key(b"link"), a.derive_key(b"gossip"));
        assert_ne!(a.derive_key(b"link"), b.derive_key(b"link"));
        assert!(!a
            .derive_key(b"link")
            .windows(16)
            .any(|w| w == &b"0123456789abcdef"[..]));
    }
}
