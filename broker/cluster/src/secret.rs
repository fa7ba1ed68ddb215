//! The cluster secret, the one thing every member shares. It is never used as a key itself:
//! [`Secret::derive_key`] derives one key per purpose (HKDF-SHA256 with a label) — the Noise
//! pre-shared key that authenticates and encrypts every inter-node TCP link ([`super::link`])
//! and the ChaCha20-Poly1305 key that seals every gossip datagram ([`super::gossip`]). A pod of
//! another cluster, or anything else that can reach the cluster port without the secret,
//! cannot join, inject routes or gossip, replay captured traffic, or read forwarded messages.
//!
//! A node holds a [`KeyRing`] so the secret can rotate without downtime: the primary secret,
//! which it dials and seals with, and a few accepted ones, which it also answers and opens
//! with. Keys are named in logs and the admin API only by their [`Secret::fingerprint`].

use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::ClusterError;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    /// Constant-time comparison, so comparing rings says nothing about a key's bytes.
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for Secret {}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Label of the key derived for fingerprints: a fingerprint reveals nothing of the other keys.
const FINGERPRINT_LABEL: &[u8] = b"corvid-cluster-key-fingerprint-v1";

/// Shortest cluster secret accepted.
pub const MIN_SECRET: usize = 16;

impl Secret {
    /// Reads the secret file (trailing whitespace ignored); it must hold at least 16 bytes.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        match Self::load_optional(path)? {
            Some(s) => Ok(s),
            None => Err(ClusterError::Secret(format!(
                "{}: the cluster secret must be at least {MIN_SECRET} bytes",
                path.display()
            ))),
        }
    }

    /// Reads a secret file that may be absent or empty (`None`: an accepted key's file
    /// outside a rotation); anything else must be a valid secret.
    pub fn load_optional(path: &Path) -> Result<Option<Self>, ClusterError> {
        let raw = match std::fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ClusterError::Secret(format!("{}: {e}", path.display()))),
        };
        let trimmed = raw.trim_ascii_end().to_vec();
        if trimmed.is_empty() {
            return Ok(None);
        }
        if trimmed.len() < MIN_SECRET {
            return Err(ClusterError::Secret(format!(
                "{}: the cluster secret must be at least {MIN_SECRET} bytes",
                path.display()
            )));
        }
        Ok(Some(Secret(trimmed)))
    }

    /// A short public name of this key for logs and the admin API (16 hex digits of a key
    /// derived for that purpose): equal fingerprints mean equal secrets, and it cannot be
    /// turned back into the secret or any key derived from it.
    pub fn fingerprint(&self) -> String {
        self.derive_key(FINGERPRINT_LABEL)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
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
}

/// Most keys a ring holds: the primary and [`corvid_config::MAX_ACCEPTED_SECRETS`] accepted
/// ones; a responder tries each once per handshake, so this bounds that work.
pub const MAX_KEYS: usize = 1 + corvid_config::MAX_ACCEPTED_SECRETS;

/// The keys a node holds: the primary (dial links, seal gossip) first, then the accepted ones
/// (also answer links and open gossip with), without duplicates, at most [`MAX_KEYS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<Secret>,
}

impl KeyRing {
    /// A ring of `primary` and `accepted` (duplicates of an earlier key dropped; keys beyond
    /// [`MAX_KEYS`] are refused).
    pub fn new(primary: Secret, accepted: Vec<Secret>) -> Result<Self, ClusterError> {
        let mut keys = vec![primary];
        for k in accepted {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        if keys.len() > MAX_KEYS {
            return Err(ClusterError::Secret(format!(
                "at most {MAX_KEYS} cluster secrets (one primary, {} accepted)",
                MAX_KEYS - 1
            )));
        }
        Ok(KeyRing { keys })
    }

    /// A ring of one key (tests, and clusters that never rotated).
    pub fn single(primary: Secret) -> Self {
        KeyRing {
            keys: vec![primary],
        }
    }

    /// Reads the primary secret file and the accepted ones (an accepted file that is missing
    /// or empty is skipped; one that holds a too-short key fails the whole load).
    pub fn load(primary: &Path, accepted: &[PathBuf]) -> Result<Self, ClusterError> {
        let first = Secret::load(primary)?;
        let mut more = Vec::with_capacity(accepted.len());
        for p in accepted {
            if let Some(s) = Secret::load_optional(p)? {
                more.push(s);
            }
        }
        KeyRing::new(first, more)
    }

    /// The key this node dials links and seals gossip with.
    pub fn primary(&self) -> &Secret {
        &self.keys[0]
    }

    /// Every key, the primary first: the order a responder tries them in.
    pub fn keys(&self) -> &[Secret] {
        &self.keys
    }

    /// The primary's fingerprint.
    pub fn primary_fingerprint(&self) -> String {
        self.primary().fingerprint()
    }

    /// The accepted keys' fingerprints (without the primary).
    pub fn accepted_fingerprints(&self) -> Vec<String> {
        self.keys[1..].iter().map(Secret::fingerprint).collect()
    }
}

/// Which key of a ring authenticated a handshake or datagram, as the `key` label of
/// `corvid_cluster_key_used_total`.
pub fn key_label(index: usize) -> &'static str {
    if index == 0 {
        "primary"
    } else {
        "accepted"
    }
}

/// Which keys authenticate what: `corvid_cluster_key_used_total{key, via}` and the time an
/// accepted (non-primary) key was last used, so an operator sees when the old key of a
/// rotation is no longer used by anyone and can be removed.
#[derive(Debug)]
pub struct KeyUsage {
    counter: prometheus::IntCounterVec,
    /// Unix second an accepted key last authenticated something (0: never).
    last_accepted: std::sync::atomic::AtomicU64,
}

impl KeyUsage {
    /// Usage counted in `counter` (labels `key`, `via`).
    pub fn new(counter: prometheus::IntCounterVec) -> Self {
        KeyUsage {
            counter,
            last_accepted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records that key `index` of the ring authenticated something arriving `via`
    /// (`link_in`, `link_out`, `gossip`).
    pub fn record(&self, index: usize, via: &str) {
        self.counter
            .with_label_values(&[key_label(index), via])
            .inc();
        if index != 0 {
            self.last_accepted.store(
                crate::session::unix_now(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Unix second an accepted key was last used, if ever.
    pub fn last_accepted(&self) -> Option<u64> {
        match self
            .last_accepted
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            t => Some(t),
        }
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
    fn a_ring_puts_the_primary_first_drops_duplicates_and_is_bounded() {
        let k = |i: u8| Secret::from_bytes(&[b'k'; 20].map(|b| b + i));
        let ring = KeyRing::new(k(0), vec![k(1), k(0), k(1), k(2)]).expect("ring");
        assert_eq!(ring.keys().len(), 3);
        assert_eq!(ring.primary(), &k(0));
        assert_eq!(ring.primary_fingerprint(), k(0).fingerprint());
        assert_eq!(
            ring.accepted_fingerprints(),
            vec![k(1).fingerprint(), k(2).fingerprint()]
        );
        assert!(KeyRing::new(k(0), (1..=MAX_KEYS as u8).map(k).collect()).is_err());
        assert!(KeyRing::new(k(0), (1..MAX_KEYS as u8).map(k).collect()).is_ok());
        assert_eq!(key_label(0), "primary");
        assert_eq!(key_label(2), "accepted");
    }

    #[test]
    fn fingerprints_name_a_key_without_revealing_it() {
        let a = Secret::from_bytes(b"0123456789abcdef-a");
        let fp = a.fingerprint();
        assert_eq!(fp.len(), 16);
        assert_eq!(fp, Secret::from_bytes(b"0123456789abcdef-a").fingerprint());
        assert_ne!(fp, Secret::from_bytes(b"0123456789abcdef-b").fingerprint());
        let hex = |k: [u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        for label in [
            &b"corvid-cluster-link-noise-psk-v1"[..],
            b"corvid-cluster-gossip-aead-v1",
        ] {
            assert!(!hex(a.derive_key(label)).contains(&fp));
        }
    }

    #[test]
    fn ring_files_skip_missing_or_empty_accepted_keys_and_refuse_short_ones() {
        let dir = std::env::temp_dir().join(format!("corvid-ring-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        let write = |name: &str, body: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        let primary = write("secret", b"primary-secret-0123456789\n");
        let accepted = write("accepted", b"accepted-secret-0123456789\n");
        let empty = write("empty", b"\n");
        let short = write("short", b"too-short\n");
        let missing = dir.join("missing");
        let ring =
            KeyRing::load(&primary, &[missing.clone(), empty.clone(), accepted]).expect("ring");
        assert_eq!(ring.keys().len(), 2);
        assert_eq!(
            ring.accepted_fingerprints(),
            vec![Secret::from_bytes(b"accepted-secret-0123456789").fingerprint()]
        );
        assert!(KeyRing::load(&primary, &[short]).is_err());
        assert!(KeyRing::load(&missing, &[]).is_err());
        assert!(KeyRing::load(&empty, &[]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
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
