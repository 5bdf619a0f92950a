//! Mailbox names in modified UTF-7 (RFC 3501 §5.1.3): how a folder written as people read it
//! ("Entwürfe", "Входящие") goes over the wire, and back.
//!
//! Written here rather than taken from the `utf7-imap` crate (0.3.2), which panics on a name a
//! server sends that is not valid base64 (`unwrap` in its decoder) and leaves DEL unencoded;
//! the base64 itself is the `base64` crate's, with its IMAP alphabet.

use base64::Engine;
use base64::alphabet::IMAP_MUTF7;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &IMAP_MUTF7,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Whether a character stands for itself: printable US-ASCII (`&` is escaped as `&-`).
fn direct(c: char) -> bool {
    (' '..='~').contains(&c)
}

/// A readable name in modified UTF-7. An ASCII name without `&` is unchanged.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&ENGINE.encode(bytes));
        out.push('-');
        run.clear();
    };
    for c in name.chars() {
        if direct(c) {
            flush(&mut run, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut run, &mut out);
    out
}

/// The readable name of a modified UTF-7 one, or `None` when it is not valid (then show it as
/// the server sent it).
pub fn decode(wire: &str) -> Option<String> {
    let mut out = String::with_capacity(wire.len());
    let mut rest = wire;
    while let Some(i) = rest.find('&') {
        let (plain, tail) = rest.split_at(i);
        if !plain.chars().all(direct) {
            return None;
        }
        out.push_str(plain);
        let tail = &tail[1..];
        let end = tail.find('-')?;
        let b64 = &tail[..end];
        if b64.is_empty() {
            out.push('&');
        } else {
            let bytes = ENGINE.decode(b64).ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes.chunks(2).map(|p| u16::from_be_bytes([p[0], p[1]])).collect();
            out.push_str(&String::from_utf16(&units).ok()?);
        }
        rest = &tail[end + 1..];
    }
    if !rest.chars().all(direct) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_and_everyday_names() {
        // RFC 3501 §5.1.3's example.
        assert_eq!(encode("~peter/mail/台北/日本語"), "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(
            decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").as_deref(),
            Some("~peter/mail/台北/日本語")
        );
        for (readable, wire) in [
            ("Entwürfe", "Entw&APw-rfe"),
            ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
            ("A&B", "A&-B"),
            ("INBOX", "INBOX"),
            ("😀", "&2D3eAA-"),
            ("tab\there", "tab&AAk-here"),
            ("del\u{7f}", "del&AH8-"),
        ] {
            assert_eq!(encode(readable), wire, "{readable}");
            assert_eq!(decode(wire).as_deref(), Some(readable), "{wire}");
        }
    }

    #[test]
    fn what_a_server_may_send_never_panics() {
        for bad in ["&", "&AP", "&AP*-", "&APw", "x\u{80}", "&2D0-", "&AA-", "ä"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_name_survives_the_round_trip(name in "\\PC{0,40}") {
            let wire = encode(&name);
            proptest::prop_assert!(wire.chars().all(direct));
            proptest::prop_assert_eq!(decode(&wire), Some(name));
        }

        #[test]
        fn any_text_decodes_without_panicking(wire in ".{0,40}") {
            let _ = decode(&wire);
        }
    }
}
