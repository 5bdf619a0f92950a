//! The response-reading path as one function of the bytes a server sends, for the fuzz target
//! (`fuzz/fuzz_targets/imap_responses.rs`) and the corpus test (`tests/imap_bytes.rs`).
//!
//! Bytes pass the guard, the IMAP library's framing and parser, and then inboxd's own
//! reading of each response (greeting, capabilities, listing and fetch items, status texts,
//! error descriptions), exactly as a session reads them. The property: no byte sequence
//! panics, every error is short and never holds the bytes it is about.

use std::time::Duration;

use async_imap::imap_proto::{MailboxDatum, Response};

use super::guard::{Guard, Meter};

/// Largest literal accepted while reading (the session's default after login is larger; a
/// smaller one keeps fuzzing fast and exercises the refusal).
const FUZZ_MAX_LITERAL: u64 = 1 << 20;

/// What reading the bytes gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Responses read, the greeting included.
    pub responses: usize,
    /// Messages with a body among them.
    pub bodies: usize,
    /// How reading ended, if not at the end of the bytes.
    pub error: Option<String>,
}

/// Reads `bytes` as everything a server sends on one connection; then again as a session
/// that enabled UTF8=ACCEPT would (8-bit folder names pass the guard), whose summary is
/// returned only if that read failed differently (both must hold the property).
pub fn read_server_bytes(bytes: &[u8]) -> Summary {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        return Summary::default();
    };
    let plain = runtime.block_on(read(bytes.to_vec(), false));
    let utf8 = runtime.block_on(read(bytes.to_vec(), true));
    match (&plain.error, &utf8.error) {
        (None, Some(_)) => utf8,
        (Some(a), Some(b)) if b.len() > a.len() => utf8,
        _ => plain,
    }
}

/// A byte source that takes whatever is written.
#[derive(Debug)]
struct Replay {
    input: std::io::Cursor<Vec<u8>>,
}

impl tokio::io::AsyncRead for Replay {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // Small reads, as a network gives them: the parser sees responses in pieces.
        let this = self.get_mut();
        let room = buf.remaining().min(509);
        let mut limited = buf.take(room);
        let r = std::pin::Pin::new(&mut this.input).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        buf.advance(n);
        r
    }
}

impl tokio::io::AsyncWrite for Replay {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn read(bytes: Vec<u8>, utf8: bool) -> Summary {
    let meter = Meter::new(FUZZ_MAX_LITERAL);
    meter.set_utf8(utf8);
    let stream = Replay {
        input: std::io::Cursor::new(bytes),
    };
    let mut client = async_imap::Client::new(Guard::new(stream, meter));
    let mut summary = Summary::default();
    match super::greeting(&mut client, Duration::from_secs(5)).await {
        Ok(caps) => {
            summary.responses += 1;
            std::hint::black_box(caps);
        }
        Err(e) => {
            summary.error = Some(super::clip(e.to_string(), super::MAX_TEXT));
            return summary;
        }
    }
    loop {
        match client.read_response().await {
            Ok(Some(resp)) => {
                summary.responses += 1;
                if interpret(resp.parsed()) {
                    summary.bodies += 1;
                }
            }
            Ok(None) => return summary,
            Err(e) => {
                let text = super::describe(&async_imap::error::Error::Io(e));
                summary.error = Some(text);
                return summary;
            }
        }
    }
}

/// Reads one response the way the session's commands do; true if it carried a body.
fn interpret(resp: &Response<'_>) -> bool {
    match resp {
        Response::Fetch(_, attrs) => {
            std::hint::black_box(super::listed_item(attrs));
            let (uid, body) = super::fetched_item(attrs);
            std::hint::black_box(uid);
            if let Some(body) = body {
                std::hint::black_box(body.len());
                return true;
            }
        }
        Response::Done { status, outcome, .. } | Response::Data { status, outcome } => {
            let text = super::outcome_text(outcome);
            std::hint::black_box((status, inboxd_core::failure::response_code(&text)));
            std::hint::black_box(inboxd_core::failure::throttle_hint(&text));
            let debug = format!("code: {:?}, info: {:?}", outcome.code, outcome.information);
            std::hint::black_box(super::humanize(&debug));
        }
        Response::Capabilities(list) => {
            for c in list {
                std::hint::black_box(super::capability_name(c));
            }
        }
        Response::MailboxData(MailboxDatum::Status { status, .. }) => {
            std::hint::black_box(status.len());
        }
        _ => {}
    }
    false
}
