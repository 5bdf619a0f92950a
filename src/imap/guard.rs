//! The guard between the socket and the IMAP parser: what a server sends is checked for size
//! before the parser sees it, and every byte read counts as progress.
//!
//! The IMAP library buffers a whole response and allocates a buffer the size of an announced
//! literal (`{536000000}`) before a byte of it arrives, and it parses a line again from its
//! start at every read, so a line without an end costs quadratic time. The guard scans the
//! stream as it passes (lines, and literals by their announced length) and fails the read,
//! with a short content-free error, when a line outside a literal is longer than
//! [`MAX_LINE`] or a literal is announced larger than the session's current limit. It removes
//! the offending bytes from the read, so the parser never sees the announcement.
//!
//! Outside literals, bytes above 0x7f become `?`: IMAP4rev1 allows them there only in
//! human-readable text, and the parser panics on some of them (a multi-byte character right
//! after a response code's `]`) and refuses others (an 8-bit keyword in FLAGS, which would
//! make SELECT fail for good). Message bodies come as literals and are never touched. Once the
//! session enabled `UTF8=ACCEPT` (RFC 6855), folder names come as UTF-8 quoted strings: then,
//! and only inside a quoted string of a `LIST`, `LSUB` or `STATUS` response, such bytes pass
//! (the parser reads quoted strings byte by byte and decodes them lossily).
//!
//! Writes are gathered until a flush: the IMAP library writes a command as tag, space, text
//! and CRLF in four writes, and flushes after each command. Unbuffered, each was a segment (a
//! TLS record) of its own, and the server woke up for each piece of a line.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// Bytes of commands gathered before a flush: every command inboxd sends fits; a longer write
/// (an APPEND's message) goes out directly.
const WRITE_BUFFER: usize = 512;

/// Longest line (outside literals) a server may send. Longer lines are an error: the longest
/// legitimate ones are SEARCH results (about 130,000 UIDs per MiB), and inboxd never asks
/// for an unbounded SEARCH.
pub const MAX_LINE: usize = 1 << 20;

/// The literal limit before login: greetings, capabilities and login answers carry none.
pub const PRE_LOGIN_LITERAL: u64 = 64 << 10;

/// Limits and counters shared between a guard and the session that owns it.
#[derive(Debug)]
pub struct Meter {
    /// Bytes read from the server on this connection.
    read: AtomicU64,
    /// Largest literal accepted now.
    max_literal: AtomicU64,
    /// The session enabled UTF8=ACCEPT: folder names may be UTF-8 quoted strings.
    utf8: std::sync::atomic::AtomicBool,
}

impl Meter {
    pub fn new(max_literal: u64) -> Arc<Meter> {
        Arc::new(Meter {
            read: AtomicU64::new(0),
            max_literal: AtomicU64::new(max_literal),
            utf8: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Bytes read so far: a deadline on progress compares two readings.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn set_max_literal(&self, max: u64) {
        self.max_literal.store(max, Ordering::Relaxed);
    }

    fn max_literal(&self) -> u64 {
        self.max_literal.load(Ordering::Relaxed)
    }

    /// After `ENABLE UTF8=ACCEPT`: UTF-8 folder names pass (see the module documentation).
    pub fn set_utf8(&self, on: bool) {
        self.utf8.store(on, Ordering::Relaxed);
    }

    fn utf8(&self) -> bool {
        self.utf8.load(Ordering::Relaxed)
    }
}

/// Untagged responses whose quoted strings may be UTF-8 folder names under UTF8=ACCEPT.
const UTF8_LINES: [&[u8]; 3] = [b"* LIST ", b"* LSUB ", b"* STATUS "];

/// Where the scan stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// In a line, `len` bytes into it.
    Line { len: usize },
    /// Inside a literal, with this many bytes to go.
    Literal { remaining: u64 },
}

/// Why the guard refused what the server sent. Says what and where, never the bytes.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the server sent a line longer than {max} bytes (at byte {offset} of the connection)")]
    LongLine { max: usize, offset: u64 },
    #[error(
        "the server announced a literal of {size} bytes, above the limit of {max} (in the line at byte {offset} of the connection)"
    )]
    BigLiteral { size: u64, max: u64, offset: u64 },
}

/// Checks what `inner` yields; see the module documentation.
#[derive(Debug)]
pub struct Guard<S> {
    inner: BufWriter<S>,
    meter: Arc<Meter>,
    scan: Scan,
    /// The last bytes of the current line, to read a literal announcement at its end.
    tail: [u8; 24],
    tail_len: usize,
    /// Bytes of the connection scanned so far.
    offset: u64,
    /// The first bytes of the current line (which response it is).
    head: [u8; 9],
    head_len: usize,
    /// Inside a quoted string of the current line, and after its `\\`.
    quoted: bool,
    escaped: bool,
}

impl<S> Guard<S> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Guard<S>
    where
        S: AsyncWrite,
    {
        Guard {
            inner: BufWriter::with_capacity(WRITE_BUFFER, inner),
            meter,
            scan: Scan::Line { len: 0 },
            tail: [0; 24],
            tail_len: 0,
            offset: 0,
            head: [0; 9],
            head_len: 0,
            quoted: false,
            escaped: false,
        }
    }

    /// Whether an 8-bit byte at this point of the line is part of a UTF-8 folder name.
    fn utf8_allowed(&self) -> bool {
        self.quoted && self.meter.utf8() && UTF8_LINES.iter().any(|p| self.head[..self.head_len].starts_with(p))
    }

    /// The stream, without what was written and not flushed (the IMAP library flushes every
    /// command).
    pub fn into_inner(self) -> S
    where
        S: AsyncWrite,
    {
        self.inner.into_inner()
    }

    /// Scans `bytes`; on a refusal, returns how many of them may be passed on before it.
    fn scan(&mut self, bytes: &mut [u8]) -> Result<(), (usize, Refused)> {
        let mut i = 0;
        while i < bytes.len() {
            match self.scan {
                Scan::Literal { remaining } => {
                    let take = remaining.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.offset += take;
                    let remaining = remaining - take;
                    self.scan = if remaining == 0 {
                        Scan::Line { len: 0 }
                    } else {
                        Scan::Literal { remaining }
                    };
                }
                Scan::Line { len } => {
                    if bytes[i] >= 0x80 && !self.utf8_allowed() {
                        // Outside literals IMAP4rev1 allows no 8-bit bytes but in
                        // human-readable text; the parser panics on some (a multi-byte
                        // character right after `]`) and refuses others (an 8-bit flag).
                        bytes[i] = b'?';
                    }
                    let b = bytes[i];
                    if self.head_len < self.head.len() {
                        self.head[self.head_len] = b;
                        self.head_len += 1;
                    }
                    if self.quoted {
                        if self.escaped {
                            self.escaped = false;
                        } else if b == b'\\' {
                            self.escaped = true;
                        } else if b == b'"' {
                            self.quoted = false;
                        }
                    } else if b == b'"' {
                        self.quoted = true;
                    }
                    let len = len + 1;
                    if self.tail_len == self.tail.len() {
                        self.tail.copy_within(1.., 0);
                        self.tail_len -= 1;
                    }
                    self.tail[self.tail_len] = b;
                    self.tail_len += 1;
                    if b == b'\n' {
                        let announced = literal_at_end(&self.tail[..self.tail_len]);
                        self.tail_len = 0;
                        self.head_len = 0;
                        self.quoted = false;
                        self.escaped = false;
                        self.scan = Scan::Line { len: 0 };
                        if let Some(size) = announced {
                            let max = self.meter.max_literal();
                            if size > max {
                                // Drop the line, as far as it is in this read (an earlier part
                                // may have passed; without its end the parser knows no size).
                                let line_start = (i + 1).saturating_sub(len);
                                return Err((
                                    line_start,
                                    Refused::BigLiteral {
                                        size,
                                        max,
                                        offset: (self.offset + 1).saturating_sub(len as u64),
                                    },
                                ));
                            }
                            if size > 0 {
                                self.scan = Scan::Literal { remaining: size };
                            }
                        }
                    } else if len > MAX_LINE {
                        return Err((
                            i.saturating_sub(MAX_LINE),
                            Refused::LongLine {
                                max: MAX_LINE,
                                offset: self.offset,
                            },
                        ));
                    } else {
                        self.scan = Scan::Line { len };
                    }
                    self.offset += 1;
                    i += 1;
                }
            }
        }
        Ok(())
    }
}

/// The size of a literal announced at the end of a line: `... {123}\r\n` (also `~{123}` of
/// RFC 3516 and `{123+}`), if any.
fn literal_at_end(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n").or_else(|| line.strip_suffix(b"\n"))?;
    let line = line.strip_suffix(b"}")?;
    let line = line.strip_suffix(b"+").unwrap_or(line);
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // More digits than a u64 holds: as large as can be (and refused).
    Some(std::str::from_utf8(digits).ok()?.parse().unwrap_or(u64::MAX))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = buf.filled().len() - before;
                this.meter.read.fetch_add(new as u64, Ordering::Relaxed);
                let scanned = this.scan(&mut buf.filled_mut()[before..]);
                match scanned {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err((keep, refused)) => {
                        buf.set_filled(before + keep);
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)))
                    }
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Records each write it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);
    impl AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_command_written_in_pieces_goes_out_in_one_write_at_the_flush() {
        use tokio::io::AsyncWriteExt;
        let mut g = Guard::new(Writes::default(), Meter::new(1024));
        for piece in [
            "A0006",
            " ",
            "SELECT \"INBOX\"",
            "\r\n",
            "A0007",
            " ",
            "UID FETCH 2:* (UID)",
            "\r\n",
        ] {
            g.write_all(piece.as_bytes()).await.unwrap();
        }
        assert!(g.inner.get_ref().0.is_empty(), "nothing before the flush");
        g.flush().await.unwrap();
        assert_eq!(
            g.inner.get_ref().0,
            vec![b"A0006 SELECT \"INBOX\"\r\nA0007 UID FETCH 2:* (UID)\r\n".to_vec()]
        );
        // A write longer than the buffer (an APPEND's message) goes out after what was
        // gathered, in order.
        let big = vec![b'x'; WRITE_BUFFER * 3];
        g.write_all(b"A0008 APPEND INBOX {1536}\r\n").await.unwrap();
        g.write_all(&big).await.unwrap();
        g.flush().await.unwrap();
        let writes = &g.inner.get_ref().0[1..];
        assert_eq!(
            writes.concat(),
            [b"A0008 APPEND INBOX {1536}\r\n".as_slice(), &big].concat()
        );
        assert_eq!(writes.len(), 2);
    }

    async fn read_all(input: Vec<u8>, max_literal: u64) -> (Vec<u8>, Option<String>) {
        read_all_with(input, max_literal, false).await
    }

    async fn read_all_with(input: Vec<u8>, max_literal: u64, utf8: bool) -> (Vec<u8>, Option<String>) {
        let meter = Meter::new(max_literal);
        meter.set_utf8(utf8);
        let mut g = Guard::new(std::io::Cursor::new(input), meter);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match g.read(&mut buf).await {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }

    #[tokio::test]
    async fn literals_pass_whole_and_their_bytes_are_not_lines() {
        let mut input = b"* 1 FETCH (UID 5 BODY[] {12}\r\n".to_vec();
        input.extend_from_slice(b"ab\r\n}\r\n{99}\r\n");
        input.extend_from_slice(b")\r\nA1 OK done\r\n");
        let (out, err) = read_all(input.clone(), 100).await;
        assert_eq!((out, err), (input, None));
    }

    #[tokio::test]
    async fn a_big_literal_announcement_never_reaches_the_parser() {
        let input = b"* OK hi\r\n* 1 FETCH (UID 5 BODY[] {536000000}\r\nZZZZ".to_vec();
        let (out, err) = read_all(input, 1 << 20).await;
        // The start of the line may have passed in an earlier read; its end never does, and
        // without it the parser knows no size.
        assert!(out.starts_with(b"* OK hi\r\n"));
        assert!(
            !out.windows(3).any(|w| w == b"}\r\n"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        let err = err.unwrap();
        assert!(
            err.contains("literal of 536000000 bytes") && err.contains("byte 9"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_without_its_content() {
        let mut input = b"* 1 FETCH (UID 1 FLAGS (".to_vec();
        input.extend(std::iter::repeat_n(b'A', MAX_LINE + 10));
        let (out, err) = read_all(input, 100).await;
        assert!(out.len() <= MAX_LINE);
        let err = err.unwrap();
        assert!(err.contains("longer than") && !err.contains("AAAA"), "{err}");
    }

    #[tokio::test]
    async fn utf8_passes_only_in_quoted_folder_names_after_enable() {
        let list = "* LIST (\\HasNoChildren) \".\" \"INBOX.Entwürfe \\\"é\\\" 受信箱\"\r\n";
        let text = "* OK [ALERT] Grüße \"ünquoted\" [X]é\r\n* 1 FETCH (FLAGS (\"é\"))\r\n";
        let input = format!("{list}{text}").into_bytes();
        // Without UTF8=ACCEPT: every 8-bit byte outside literals becomes `?`.
        let (out, _) = read_all_with(input.clone(), 100, false).await;
        assert!(out.iter().all(|b| b.is_ascii()), "{}", String::from_utf8_lossy(&out));
        // With it: the LIST line's quoted name passes whole, escapes and all; nothing else does.
        let (out, _) = read_all_with(input, 100, true).await;
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with(list), "{out}");
        let rest = &out[list.len()..];
        assert!(rest.is_ascii(), "{rest}");
    }

    #[test]
    fn literal_announcements_are_read_at_line_ends_only() {
        assert_eq!(literal_at_end(b"* 1 FETCH (BODY[] {42}\r\n"), Some(42));
        assert_eq!(literal_at_end(b"A1 APPEND x ~{7+}\r\n"), Some(7));
        assert_eq!(literal_at_end(b"* OK {42} not a literal\r\n"), None);
        assert_eq!(literal_at_end(b"* OK {}\r\n"), None);
        assert_eq!(literal_at_end(b"* OK {99999999999999999999999}\r\n"), Some(u64::MAX));
    }
}
