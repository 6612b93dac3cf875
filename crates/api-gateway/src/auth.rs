//! Bearer secrets: the admin token (and, later, client keys).
//!
//! Only a SHA-256 digest of the configured secret is kept in memory, and a presented
//! token is compared by digest in constant time, so neither the secret nor how much of
//! it a guess got right leaks through memory dumps, logs or timing.

use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct BearerSecret {
    digest: [u8; 32],
}

impl BearerSecret {
    pub fn new(secret: &str) -> Self {
        Self {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the secret.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let difference = self
            .digest
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl std::fmt::Debug for BearerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secret_itself_matches() {
        let secret = BearerSecret::new("admin-token-0123456789");
        assert!(secret.matches("admin-token-0123456789"));
        assert!(!secret.matches("admin-token-012345678"));
        assert!(!secret.matches(""));
        assert!(!format!("{secret:?}").contains("admin"));
    }
}
