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

/// The header block: everything up to and including the first empty line (CRLF or LF), or
/// the whole message when there is none. One pass over the line ends (memchr), so finding it
/// costs a few hundred nanoseconds whatever the body's size.
pub fn header_block(raw: &[u8]) -> &[u8] {
    for i in memchr::memchr_iter(b'\n', raw) {
        match raw.get(i + 1..) {
            Some([b'\n', ..]) => return &raw[..i + 2],
            Some([b'\r', b'\n', ..]) => return &raw[..i + 3],
            _ => {}
        }
    }
    raw
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

    #[test]
    fn the_header_block_ends_at_the_first_empty_line() {
        assert_eq!(
            header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore"),
            b"A: 1\r\nB: 2\r\n\r\n"
        );
        assert_eq!(header_block(b"A: 1\nB: 2\n\nbody\n\nmore"), b"A: 1\nB: 2\n\n");
        // Whichever kind of empty line comes first.
        assert_eq!(header_block(b"A: 1\n\nB: 2\r\n\r\n"), b"A: 1\n\n");
        assert_eq!(header_block(b"A: 1\r\n\r\nB: 2\n\n"), b"A: 1\r\n\r\n");
        // No empty line: all of it is header.
        assert_eq!(header_block(b"A: 1\r\nB: 2\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_block(b""), b"");
        assert_eq!(header_block(b"\n"), b"\n");
    }

    proptest::proptest! {
        /// A prefix that ends with the first empty line, and no empty line before its end.
        #[test]
        fn the_header_block_is_the_shortest_prefix_with_an_empty_line(
            raw in proptest::collection::vec(proptest::sample::select(&b"\r\nab:"[..]), 0..64)
        ) {
            let block = header_block(&raw);
            proptest::prop_assert!(raw.starts_with(block));
            let ends = |b: &[u8]| b.ends_with(b"\n\n") || b.ends_with(b"\n\r\n");
            if block.len() < raw.len() {
                proptest::prop_assert!(ends(block));
            }
            for n in 0..block.len() {
                proptest::prop_assert!(!ends(&block[..n]), "an empty line ends at {}", n);
            }
        }
    }
}
