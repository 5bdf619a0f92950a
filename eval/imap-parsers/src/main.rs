//! imap-proto 0.17 (inboxd's parser, under async-imap) against imap-codec 2 (under imap-next),
//! on the same server bytes, fed as a socket would: 64 KiB reads.
//!
//! - throughput on a catch-up transcript (10,000 FETCH responses of 5 KB) and on large-message
//!   pieces (25 x 4 MiB `BODY[]<offset>` literals);
//! - hostile inputs that hurt imap-proto before inboxd's guard existed;
//! - every file of inboxd's fuzz corpus: panics and refusals.
//!
//! Run: `cargo run --release` in this directory (not part of inboxd's build or CI).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use imap_codec::fragmentizer::Fragmentizer;
use imap_codec::{GreetingCodec, ResponseCodec};

const READ: usize = 64 << 10;

#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    responses: usize,
    refused: bool,
    panicked: bool,
}

/// Parses like async-imap: after every read, try to parse a response from the start of what is
/// buffered; an incomplete one waits for more bytes (and is parsed again from its start).
fn with_imap_proto(bytes: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let run = catch_unwind(AssertUnwindSafe(|| {
        let mut buf: Vec<u8> = Vec::new();
        for read in bytes.chunks(READ) {
            buf.extend_from_slice(read);
            loop {
                match imap_proto::Response::parse(&buf) {
                    Ok((rest, _)) => {
                        out.responses += 1;
                        let used = buf.len() - rest.len();
                        buf.drain(..used);
                    }
                    Err(nom::Err::Incomplete(_)) => break,
                    Err(_) => {
                        out.refused = true;
                        return;
                    }
                }
            }
        }
    }));
    out.panicked = run.is_err();
    out
}

/// Parses like imap-next: the fragmentizer splits lines and literals (with a message-size
/// limit), then the codec decodes each complete message; the first is the greeting.
fn with_imap_codec(bytes: &[u8], max: u32) -> Outcome {
    let mut out = Outcome::default();
    let run = catch_unwind(AssertUnwindSafe(|| {
        let mut f = Fragmentizer::new(max);
        let mut greeted = false;
        for read in bytes.chunks(READ) {
            f.enqueue_bytes(read);
            while f.progress().is_some() {
                if !f.is_message_complete() {
                    continue;
                }
                let ok = if greeted {
                    f.decode_message(&ResponseCodec::default()).is_ok()
                } else {
                    greeted = true;
                    f.decode_message(&GreetingCodec::default()).is_ok()
                };
                if ok {
                    out.responses += 1;
                } else {
                    out.refused = true;
                }
            }
        }
    }));
    out.panicked = run.is_err();
    out
}

fn fetches(n: usize, body: usize, partial: bool) -> Vec<u8> {
    let mut t = b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n";
    let mut message = b"Subject: x\r\nMessage-ID: <x@y>\r\n\r\n".to_vec();
    while message.len() < body {
        message.extend_from_slice(line);
    }
    message.truncate(body);
    for i in 1..=n {
        let section = if partial {
            format!("BODY[]<{}>", (i - 1) * body)
        } else {
            "BODY[]".to_string()
        };
        t.extend_from_slice(format!("* {i} FETCH (UID {i} {section} {{{}}}\r\n", message.len()).as_bytes());
        t.extend_from_slice(&message);
        t.extend_from_slice(b")\r\n");
    }
    t.extend_from_slice(b"A1 OK done\r\n");
    t
}

fn time(label: &str, bytes: &[u8], max: u32) {
    let mb = bytes.len() as f64 / 1e6;
    let best = |f: &dyn Fn() -> Outcome| {
        let mut best = f64::MAX;
        let mut last = Outcome::default();
        for _ in 0..3 {
            let t = Instant::now();
            last = f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        (best, last)
    };
    let (p, po) = best(&|| with_imap_proto(bytes));
    let (c, co) = best(&|| with_imap_codec(bytes, max));
    println!("{label} ({mb:.1} MB)");
    println!(
        "    imap-proto  {:8.1} ms  {:7.0} MB/s  responses {} refused {} panicked {}",
        p * 1e3,
        mb / p,
        po.responses,
        po.refused,
        po.panicked
    );
    println!(
        "    imap-codec  {:8.1} ms  {:7.0} MB/s  responses {} refused {} panicked {}",
        c * 1e3,
        mb / c,
        co.responses,
        co.refused,
        co.panicked
    );
}

fn main() {
    std::panic::set_hook(Box::new(|_| {}));
    time(
        "catch-up: 10,000 x 5 KB FETCH BODY[]",
        &fetches(10_000, 5_000, false),
        64 << 20,
    );
    time(
        "large message: 25 x 4 MiB FETCH BODY[]<offset>",
        &fetches(25, 4 << 20, true),
        64 << 20,
    );

    println!("hostile inputs (greeting first; limit 1 MiB for imap-codec):");
    let greeting = b"* OK ready\r\n".to_vec();
    let with = |tail: &[u8]| {
        let mut v = greeting.clone();
        v.extend_from_slice(tail);
        v
    };
    let long_line = {
        let mut v = b"* 1 FETCH (UID 1 FLAGS (".to_vec();
        v.extend(std::iter::repeat_n(b'A', 4 << 20));
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "multi-byte character after ']'",
            with("A1 OK [READ-WRITE]\u{2013} x\r\n".as_bytes()),
        ),
        (
            "8-bit keyword in FLAGS",
            with(b"* FLAGS (\\Seen caf\xc3\xa9)\r\nA1 OK done\r\n"),
        ),
        (
            "literal announced at 536,000,000 bytes",
            with(b"* 1 FETCH (UID 1 BODY[] {536000000}\r\nZZZZ"),
        ),
        ("4 MiB line without CRLF", with(&long_line)),
        (
            "partial fetch answer BODY[]<0>",
            with(b"* 1 FETCH (UID 1 BODY[]<0> {3}\r\nabc)\r\nA1 OK done\r\n"),
        ),
    ];
    for (label, bytes) in &cases {
        let t = Instant::now();
        let p = with_imap_proto(bytes);
        let pt = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let c = with_imap_codec(bytes, 1 << 20);
        let ct = t.elapsed().as_secs_f64() * 1e3;
        println!("  {label}");
        println!("    imap-proto  {p:?} in {pt:.1} ms");
        println!("    imap-codec  {c:?} in {ct:.1} ms");
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/imap_responses");
    let mut files = 0;
    let (mut pp, mut cp, mut pr, mut cr) = (0, 0, 0, 0);
    for entry in std::fs::read_dir(&dir).expect("the fuzz corpus") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        let p = with_imap_proto(&bytes);
        let c = with_imap_codec(&bytes, 1 << 20);
        pp += usize::from(p.panicked);
        cp += usize::from(c.panicked);
        pr += usize::from(p.refused);
        cr += usize::from(c.refused);
    }
    println!("fuzz corpus, {files} files, raw bytes (no guard in front):");
    println!("    imap-proto  panicked on {pp}, refused {pr}");
    println!("    imap-codec  panicked on {cp}, refused {cr}");
}
