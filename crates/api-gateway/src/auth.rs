//! Bearer secrets: the admin token and the client keys.
//!
//! Only a SHA-256 digest of the configured secret is kept in memory, and a presented
//! token is compared by digest in constant time, so neither the secret nor how much of
//! it a guess got right leaks through memory dumps, logs or timing.

use std::sync::{Arc, LazyLock};

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

/// The client name of a request with the admin token, reserved.
pub const ADMIN_CLIENT: &str = "admin";
/// The client name of a request without a key where none is needed, reserved.
pub const ANONYMOUS_CLIENT: &str = "anonymous";

/// The two reserved names, shared: naming a caller allocates nothing.
pub static ADMIN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(ADMIN_CLIENT));
pub static ANONYMOUS: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(ANONYMOUS_CLIENT));

/// `API_KEYS`: named client keys. Empty means client routes are open (anonymous).
#[derive(Debug, Clone, Default)]
pub struct ClientKeys {
    /// Names shared: every request of a client carries its name to its event.
    keys: Vec<(Arc<str>, BearerSecret)>,
}

/// The longest client name: names become metric labels and event fields.
pub const MAX_CLIENT_NAME: usize = 32;
pub const MIN_CLIENT_KEY_BYTES: usize = 16;

impl ClientKeys {
    /// `name:key[,name:key...]`. Names are 1 to 32 of `a-z 0-9 - _`, each once; keys
    /// at least 16 bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(Arc<str>, BearerSecret)> = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, key)) = pair.split_once(':') else {
                return Err("each entry must be name:key".to_owned());
            };
            let valid_name = !name.is_empty()
                && name.len() <= MAX_CLIENT_NAME
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_name {
                return Err(format!(
                    "client name {name:?} must be 1 to {MAX_CLIENT_NAME} of a-z, 0-9, - and _"
                ));
            }
            if name == ANONYMOUS_CLIENT || name == ADMIN_CLIENT {
                return Err(format!("client name {name:?} is reserved"));
            }
            if key.len() < MIN_CLIENT_KEY_BYTES {
                // The key itself is never echoed back.
                return Err(format!(
                    "the key of {name:?} must be at least {MIN_CLIENT_KEY_BYTES} bytes"
                ));
            }
            if keys.iter().any(|(existing, _)| &**existing == name) {
                return Err(format!("client name {name:?} appears twice"));
            }
            keys.push((Arc::from(name), BearerSecret::new(key)));
        }
        if keys.is_empty() {
            return Err("no name:key entries".to_owned());
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The client whose key `presented` is. Every key is compared, match or not, so
    /// the time taken does not tell which one (or how many) came close.
    pub fn identify(&self, presented: &str) -> Option<&Arc<str>> {
        let mut found = None;
        for (name, secret) in &self.keys {
            if secret.matches(presented) && found.is_none() {
                found = Some(name);
            }
        }
        found
    }

    /// The names, as every request of each client shares them.
    pub fn named(&self) -> impl Iterator<Item = &Arc<str>> {
        self.keys.iter().map(|(name, _)| name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(name, _)| &**name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_identify_their_client_and_refuse_bad_config() {
        let keys =
            ClientKeys::parse("mobile:key-mobile-0123456789, web:key-web-0123456789ab").unwrap();
        let name = |token| keys.identify(token).map(|name| name.to_string());
        assert_eq!(name("key-web-0123456789ab").as_deref(), Some("web"));
        assert_eq!(name("key-mobile-0123456789").as_deref(), Some("mobile"));
        assert_eq!(keys.identify("key-web-0123456789a"), None);
        for bad in [
            "mobile",
            "Mobile:key-mobile-0123456789",
            "mobile:short",
            "a:key-0123456789abcdef,a:key-0123456789abcdeg",
            "admin:key-0123456789abcdef",
            "",
        ] {
            let error = ClientKeys::parse(bad).expect_err(bad);
            assert!(!error.contains("0123456789"), "no key echoed: {error}");
        }
    }

    #[test]
    fn only_the_secret_itself_matches() {
        let secret = BearerSecret::new("admin-token-0123456789");
        assert!(secret.matches("admin-token-0123456789"));
        assert!(!secret.matches("admin-token-012345678"));
        assert!(!secret.matches(""));
        assert!(!format!("{secret:?}").contains("admin"));
    }
}
