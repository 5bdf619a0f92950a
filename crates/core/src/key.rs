//! The idempotency key of a message.
//!
//! The key is stable across restarts and re-deliveries and unique per
//! (account, folder, UIDVALIDITY, UID): `v1-<16 hex digits>-<uidvalidity>-<uid>`, where the hex
//! digits are a FNV-1a 64-bit hash of the account and folder names. It contains only
//! `[0-9a-z-]`, so it is safe as a file name (the Maildir handler uses it as one) and in a URL.
//! FNV-1a is written out here rather than taken from `std`, whose hasher may change between
//! releases: a key must never change once issued.

use alloc::{format, string::String};

/// Computes the idempotency key.
pub fn message_key(account: &str, folder: &str, uidvalidity: u32, uid: u32) -> String {
    format!("v1-{:016x}-{uidvalidity}-{uid}", scope_hash(account, folder))
}

/// The FNV-1a 64-bit hash of `account NUL folder`.
pub fn scope_hash(account: &str, folder: &str) -> u64 {
    fnv1a(account.bytes().chain(core::iter::once(0)).chain(folder.bytes()))
}

/// The idempotency key of a Gmail message, by its `X-GM-MSGID`: `gm1-<16 hex digits>-<msgid>`,
/// the hex digits an FNV-1a hash of the account name alone. The same message under several
/// labels (folders) gets the same key, so a target that deduplicates takes it once. Same
/// character set as [`message_key`].
pub fn gmail_key(account: &str, msgid: u64) -> String {
    format!("gm1-{:016x}-{msgid}", fnv1a(account.bytes()))
}

fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Splits a key back into (scope hash, UIDVALIDITY, UID); `None` if it is not a v1 key.
pub fn parse_key(key: &str) -> Option<(u64, u32, u32)> {
    let rest = key.strip_prefix("v1-")?;
    let mut parts = rest.split('-');
    let scope = parts.next().filter(|s| s.len() == 16)?;
    let scope = u64::from_str_radix(scope, 16).ok()?;
    let uidvalidity = parts.next()?.parse().ok()?;
    let uid = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((scope, uidvalidity, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_round_trips() {
        // A fixed value (checked against an independent FNV-1a): changing it would re-deliver
        // into every Maildir in the field.
        assert_eq!(
            message_key("demo", "INBOX", 1700000000, 42),
            "v1-f43c9ed8e998de0a-1700000000-42"
        );
        let k = message_key("demo", "INBOX", 7, 9);
        assert_eq!(parse_key(&k), Some((scope_hash("demo", "INBOX"), 7, 9)));
    }

    #[test]
    fn key_separates_account_and_folder() {
        assert_ne!(message_key("ab", "c", 1, 1), message_key("a", "bc", 1, 1));
        assert_ne!(message_key("a", "INBOX", 1, 1), message_key("a", "INBOX", 2, 1));
    }

    #[test]
    fn a_gmail_key_names_the_account_and_the_message_not_the_folder() {
        // A fixed value (checked against an independent FNV-1a), as above.
        assert_eq!(
            gmail_key("gmail", 1_700_000_000_000_000_002),
            "gm1-2c1abfdbf17e49d5-1700000000000000002"
        );
        assert_ne!(gmail_key("a", 1), gmail_key("b", 1));
        assert_ne!(gmail_key("a", 1), gmail_key("a", 2));
        assert_eq!(parse_key(&gmail_key("a", 1)), None);
    }

    #[test]
    fn rejects_foreign_keys() {
        assert_eq!(parse_key("v2-0000000000000000-1-1"), None);
        assert_eq!(parse_key("v1-zz-1-1"), None);
        assert_eq!(parse_key("v1-0000000000000000-1-1-1"), None);
    }
}
