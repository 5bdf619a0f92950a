//! What inboxd reads from a message itself: its Message-ID, or a digest of its header block
//! when it has none. Used for the `dedupe` UIDVALIDITY policy and `INBOXD_MESSAGE_ID`.
//! Parsing never panics on hostile bytes: mail-parser is run under `catch_unwind`, and a
//! message it cannot parse falls back to the digest.

/// The most of a message read to identify it: a header block longer than this is cut here
/// (so a spooled message needs only its first bytes read back).
pub const IDENTITY_HEAD: usize = 1 << 20;

/// The identity used to recognise a message across a UIDVALIDITY change.
pub fn identity(raw: &[u8]) -> (Option<String>, String) {
    let raw = &raw[..raw.len().min(IDENTITY_HEAD)];
    let mid = message_id(raw);
    let ident = match &mid {
        Some(m) => m.clone(),
        None => format!(
            "sha256:{}",
            hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, header_block(raw)).as_ref())
        ),
    };
    (mid, ident)
}

/// The Message-ID header's value, without angle brackets or surrounding space.
pub fn message_id(raw: &[u8]) -> Option<String> {
    let header = header_block(raw);
    let parsed = std::panic::catch_unwind(|| {
        mail_parser::MessageParser::new()
            .parse_headers(header)
            .and_then(|m| m.message_id().map(|s| s.trim().to_string()))
    })
    .ok()
    .flatten();
    parsed.filter(|s| !s.is_empty() && !s.contains(['\r', '\n', '\0']))
}

/// The header block: everything before the first empty line (CRLF or LF).
pub fn header_block(raw: &[u8]) -> &[u8] {
    let crlf = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => &raw[..a.min(b)],
        (Some(a), None) | (None, Some(a)) => &raw[..a],
        (None, None) => raw,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_and_digest() {
        let m = b"From: a@b\r\nMessage-ID:  <x.1@example.com>\r\n\r\nbody\r\n";
        assert_eq!(identity(m), (Some("x.1@example.com".into()), "x.1@example.com".into()));
        let n = b"From: a@b\r\nSubject: hi\r\n\r\nbody";
        let (mid, ident) = identity(n);
        assert_eq!(mid, None);
        assert!(ident.starts_with("sha256:") && ident.len() == 7 + 64);
        // The body does not change the digest; the header does.
        assert_eq!(identity(b"From: a@b\r\nSubject: hi\r\n\r\nother").1, ident);
        assert_ne!(identity(b"From: a@b\r\nSubject: ho\r\n\r\nbody").1, ident);
    }

    #[test]
    fn garbage_does_not_panic() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00",
            b"Message-ID:",
            b"Message-ID: <\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let _ = identity(raw);
        }
    }
}
