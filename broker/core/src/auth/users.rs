//! The users file: one `username:PHC-hash` line per user (argon2, pbkdf2 or bcrypt), as
//! mounted from a Kubernetes Secret. Re-read whenever its modification time, size or inode
//! changes, so a rotated Secret takes effect without a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use password_hash::{PasswordHash, PasswordVerifier};

use super::{Refusal, Verdict};

/// Verifications at once until [`UsersFile::with_max_concurrent_hashes`] says otherwise.
const DEFAULT_CONCURRENT_HASHES: usize = 4;

/// Identity of one version of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<Stamp>,
    users: Arc<HashMap<String, String>>,
}

/// A users file, loaded lazily and reloaded on change.
#[derive(Debug)]
pub struct UsersFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
    /// Verifications running at once: hashing is slow on purpose, and unbounded it would take
    /// every blocking thread (and CPU) for password guessing.
    hashing: tokio::sync::Semaphore,
}

impl UsersFile {
    /// A users file at `path` (read on first use).
    pub fn new(path: PathBuf) -> Self {
        UsersFile {
            path,
            loaded: Mutex::new(Loaded::default()),
            hashing: tokio::sync::Semaphore::new(DEFAULT_CONCURRENT_HASHES),
        }
    }

    /// The same file with at most `n` (at least 1) verifications at once.
    pub fn with_max_concurrent_hashes(mut self, n: usize) -> Self {
        self.hashing = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// The current users, re-reading the file if it changed. A file that cannot be read
    /// keeps the last good contents (and logs); never read yet means no users.
    fn current(&self) -> Arc<HashMap<String, String>> {
        let stamp = std::fs::metadata(&self.path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            Stamp {
                mtime: m.modified().ok(),
                len: m.len(),
                ino: m.ino(),
            }
        });
        let mut l = self.loaded.lock();
        if stamp.is_some() && stamp != l.stamp {
            match std::fs::read_to_string(&self.path) {
                Ok(text) => {
                    let users = parse(&text);
                    tracing::info!(path = %self.path.display(), users = users.len(), "users file loaded");
                    l.users = Arc::new(users);
                    l.stamp = stamp;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read users file; keeping the previous contents");
                }
            }
        } else if stamp.is_none() && l.stamp.is_some() {
            tracing::warn!(path = %self.path.display(), "users file disappeared; keeping the previous contents");
        }
        l.users.clone()
    }

    /// Checks a user name and password: a known user with the right password is admitted,
    /// with a wrong one refused; an unknown user (or no user name) goes to the next source.
    pub(crate) async fn verify(&self, username: Option<&str>, password: Option<&[u8]>) -> Verdict {
        let Some(user) = username else {
            return Verdict::Ignore;
        };
        let users = self.current();
        let Some(hash) = users.get(user).cloned() else {
            return Verdict::Ignore;
        };
        let password = password.unwrap_or_default().to_vec();
        // Password hashing is deliberately slow: keep it off the async workers, a bounded
        // number at a time.
        let Ok(_permit) = self.hashing.acquire().await else {
            return Verdict::Deny(Refusal::BadCredentials);
        };
        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false);
        if ok {
            Verdict::Allow(Vec::new())
        } else {
            Verdict::Deny(Refusal::BadCredentials)
        }
    }
}

/// Parses `username:hash` lines; blank lines and `#` comments are skipped.
fn parse(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((u, h)) if !u.is_empty() && h.starts_with('$') => {
                out.insert(u.to_string(), h.trim().to_string());
            }
            _ => tracing::warn!(
                line = n + 1,
                "users file: ignoring a line that is not username:$hash"
            ),
        }
    }
    out
}

/// Verifies `password` against a PHC string (`$argon2id$…`, `$pbkdf2-sha256$…`) or a bcrypt
/// hash (`$2b$…`).
pub fn verify_hash(hash: &str, password: &[u8]) -> bool {
    if hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$") {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let alg = parsed.algorithm.as_str();
    if alg.starts_with("argon2") {
        argon2::Argon2::default()
            .verify_password(password, &parsed)
            .is_ok()
    } else if alg.starts_with("pbkdf2") {
        pbkdf2::Pbkdf2.verify_password(password, &parsed).is_ok()
    } else {
        false
    }
}

/// Hashes a password as an argon2id PHC string (for `corvid-broker passwd`).
pub fn hash_password(password: &[u8]) -> Result<String, password_hash::Error> {
    use password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&fastrand_salt())?;
    Ok(argon2::Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

fn fastrand_salt() -> [u8; 16] {
    let mut s = [0u8; 16];
    for b in &mut s {
        *b = fastrand::u8(..);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_all_three_schemes() {
        let a = hash_password(b"pw").expect("argon2");
        assert!(verify_hash(&a, b"pw"));
        assert!(!verify_hash(&a, b"px"));
        let b = bcrypt::hash("pw", 4).expect("bcrypt");
        assert!(verify_hash(&b, b"pw"));
        assert!(!verify_hash(&b, b"px"));
        use password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        // Few rounds: unoptimized test builds are slow, and the rounds are in the PHC string.
        let params = pbkdf2::Params {
            rounds: 1000,
            output_length: 32,
        };
        let p = pbkdf2::Pbkdf2
            .hash_password_customized(b"pw", None, None, params, &salt)
            .expect("pbkdf2")
            .to_string();
        assert!(p.starts_with("$pbkdf2"), "{p}");
        assert!(verify_hash(&p, b"pw"));
        assert!(!verify_hash(&p, b"px"));
        assert!(!verify_hash("$unknown$x", b"pw"));
        assert!(!verify_hash("plain", b"plain"));
    }

    #[test]
    fn parses_lines() {
        let u = parse("# users\n\nann:$argon2id$x\nbad line\nbob:$2b$04$y\n:$x\n");
        assert_eq!(u.len(), 2);
        assert_eq!(u.get("ann").map(String::as_str), Some("$argon2id$x"));
    }
}
