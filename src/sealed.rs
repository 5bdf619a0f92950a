//! Sealed account definitions: the text of an account stored in PostgreSQL (`inboxd account
//! add`) is encrypted with the `accounts_key`, so that its passwords and client secrets are
//! never in the database in clear.
//!
//! AES-256-GCM from aws-lc-rs (already the TLS provider's crypto; no further crate), a random
//! 96-bit nonce per seal, and the account's name as associated data, so that a sealed row
//! copied under another name does not open. A sealed value is
//! `b"inboxd-sealed-v1" || key id (8) || nonce (12) || ciphertext || tag (16)`; the key id (the
//! first 8 bytes of SHA-256 of the key) lets an instance with another key say so, instead of
//! reporting a forged row.

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use base64::Engine;

use crate::secret::Secret;

const MAGIC: &[u8] = b"inboxd-sealed-v1";
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A key that seals and opens account definitions. `Debug` shows only its id.
pub struct SealingKey {
    key: RandomizedNonceKey,
    id: [u8; ID_LEN],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey({})", self.id())
    }
}

/// Why a key could not be made or a sealed value not opened. Never holds key or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("accounts_key: expected 32 bytes in base64 (`inboxd account keygen` makes one), got {0}")]
    BadKey(String),
    #[error("not a sealed account definition")]
    NotSealed,
    #[error("sealed with another accounts_key (key id {stored}; this instance's is {ours})")]
    OtherKey { stored: String, ours: String },
    #[error("does not open with this accounts_key: altered, or stored under another name")]
    Forged,
    #[error("the system's random source or AES-GCM failed")]
    Crypto,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl SealingKey {
    /// A key from its base64 text (32 bytes; surrounding white space is ignored).
    pub fn from_base64(text: &Secret) -> Result<SealingKey, SealError> {
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.expose().trim())
                .map_err(|_| SealError::BadKey("text that is not base64".into()))?,
        );
        if bytes.len() != 32 {
            return Err(SealError::BadKey(format!("{} bytes", bytes.len())));
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        let mut id = [0; ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..ID_LEN]);
        let key =
            RandomizedNonceKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::BadKey("an unusable key".into()))?;
        Ok(SealingKey { key, id })
    }

    /// A new random key, as base64 text.
    pub fn generate() -> Result<Secret, SealError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut bytes[..]).map_err(|_| SealError::Crypto)?;
        Ok(Secret::new(
            base64::engine::general_purpose::STANDARD.encode(&bytes[..]),
        ))
    }

    /// The key's id: the first 8 bytes of its SHA-256, in hex. Not secret.
    pub fn id(&self) -> String {
        hex(&self.id)
    }

    fn aad(name: &str) -> Vec<u8> {
        let mut aad = MAGIC.to_vec();
        aad.push(0);
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// Seals `plaintext` for the account `name`.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut data = zeroize::Zeroizing::new(plaintext.to_vec());
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(Self::aad(name)), &mut *data)
            .map_err(|_| SealError::Crypto)?;
        let mut out = Vec::with_capacity(MAGIC.len() + ID_LEN + NONCE_LEN + data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what [`SealingKey::seal`] made for the account `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Secret, SealError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(SealError::NotSealed)?;
        if rest.len() < ID_LEN + NONCE_LEN + TAG_LEN {
            return Err(SealError::NotSealed);
        }
        let (id, rest) = rest.split_at(ID_LEN);
        if id != self.id {
            return Err(SealError::OtherKey {
                stored: hex(id),
                ours: self.id(),
            });
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::NotSealed)?;
        let mut data = zeroize::Zeroizing::new(ciphertext.to_vec());
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(name)), &mut data)
            .map_err(|_| SealError::Forged)?;
        let text = std::str::from_utf8(plain).map_err(|_| SealError::Forged)?;
        Ok(Secret::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealingKey {
        SealingKey::from_base64(&SealingKey::generate().unwrap()).unwrap()
    }

    #[test]
    fn sealed_text_opens_only_with_its_key_and_name() {
        let k = key();
        let sealed = k.seal("support", b"password = \"hunter2\"").unwrap();
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "plaintext in the sealed bytes"
        );
        assert_eq!(k.open("support", &sealed).unwrap().expose(), "password = \"hunter2\"");
        // Two seals of the same text differ (random nonces).
        assert_ne!(sealed, k.seal("support", b"password = \"hunter2\"").unwrap());
        assert_eq!(k.open("billing", &sealed).unwrap_err(), SealError::Forged);
        let other = key();
        assert!(matches!(
            other.open("support", &sealed),
            Err(SealError::OtherKey { .. })
        ));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(k.open("support", &tampered).unwrap_err(), SealError::Forged);
        assert_eq!(k.open("support", b"password").unwrap_err(), SealError::NotSealed);
        assert_eq!(k.open("support", &sealed[..30]).unwrap_err(), SealError::NotSealed);
    }

    #[test]
    fn a_key_is_32_bytes_of_base64_and_never_printed() {
        assert!(matches!(
            SealingKey::from_base64(&Secret::new("c2hvcnQ=")),
            Err(SealError::BadKey(m)) if m == "5 bytes"
        ));
        assert!(SealingKey::from_base64(&Secret::new("not base64!")).is_err());
        let text = SealingKey::generate().unwrap();
        let k = SealingKey::from_base64(&Secret::new(format!("  {}\n", text.expose()))).unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(text.expose()));
        assert_eq!(shown, format!("SealingKey({})", k.id()));
    }
}
