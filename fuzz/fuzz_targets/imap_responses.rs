//! Everything a server may send on one connection, through the guard, the IMAP library's
//! framing and parser, and inboxd's reading of each response. Must never panic.
//!
//! `cargo fuzz run imap_responses --sanitizer none fuzz/corpus/imap_responses`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let summary = inboxd::imap::fuzz::read_server_bytes(data);
    if let Some(error) = summary.error {
        assert!(error.len() <= 1100, "an error of {} bytes", error.len());
    }
});
