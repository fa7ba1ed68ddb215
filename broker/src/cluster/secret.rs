//! The cluster secret: every inter-node byte stream and gossip datagram is authenticated with
//! an HMAC-SHA256 keyed by it, so a pod of another cluster, or anything else that can reach the
//! port, cannot join, inject routes or read forwarded messages' routing.

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

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        match <HmacSha256 as KeyInit>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        }
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
}
