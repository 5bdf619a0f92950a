//! The response-reading path against fixed transcripts (the fuzz corpus in
//! `fuzz/corpus/imap_responses/`) and thousands of mutations of them: no byte sequence panics,
//! memory stays bounded, and errors are short and never hold the bytes they are about. The
//! coverage-guided run of the same function is `fuzz/fuzz_targets/imap_responses.rs`.

use inboxd::imap::fuzz::read_server_bytes;
use proptest::prelude::*;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/imap_responses");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn seed(name: &str) -> Vec<u8> {
    corpus().into_iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn real_transcripts_read_to_the_end() {
    let dovecot = read_server_bytes(&seed("dovecot-session"));
    assert_eq!(dovecot.error, None);
    assert_eq!(dovecot.bodies, 2);
    assert_eq!(dovecot.responses, 27, "{dovecot:?}");
    let cyrus = read_server_bytes(&seed("cyrus-session"));
    assert_eq!((cyrus.error, cyrus.bodies), (None, 1));
}

#[test]
fn hostile_transcripts_end_in_short_content_free_errors() {
    let huge = read_server_bytes(&seed("huge-literal"));
    let e = huge.error.unwrap();
    assert!(e.contains("literal of 536000000 bytes") && !e.contains("ZZZ"), "{e}");
    let garbage = read_server_bytes(&seed("garbage"));
    let e = garbage.error.unwrap();
    assert!(!e.contains("PII-CANARY") && e.len() < 300, "{e}");
    for (name, bytes) in corpus() {
        let s = read_server_bytes(&bytes);
        if let Some(e) = s.error {
            assert!(e.len() <= 1100, "{name}: {} bytes of error", e.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn no_mutation_of_a_transcript_panics(
        which in 0usize..9,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..24),
    ) {
        let seeds = corpus();
        let mut bytes = seeds[which % seeds.len()].1.clone();
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                bytes.push(byte);
                continue;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                2 => { bytes.remove(i); }
                _ => {
                    // Splice in a structural token.
                    let tokens: [&[u8]; 6] = [b"{99}\r\n", b"\r\n", b"(", b")", b"[UIDNEXT 0]", b"* 1 FETCH (UID "];
                    let t = tokens[byte as usize % tokens.len()];
                    bytes.splice(i..i, t.iter().copied());
                }
            }
        }
        let s = read_server_bytes(&bytes);
        if let Some(e) = s.error {
            prop_assert!(e.len() <= 1100);
        }
    }
}
