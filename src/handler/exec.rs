//! The `exec` handler: runs a program (no shell) with the raw message on stdin, or with
//! `stdin = "json"` the message as `inboxd.message.v1`.
//!
//! Exit status 0 acknowledges. A non-zero exit, a signal, or running past the timeout is a
//! failure; on timeout the whole process group is killed, so a handler's children cannot
//! outlive it. The tail of stderr and stdout is kept for the delivery log.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Handler, HandlerError, Message};
use crate::config::Payload;
use crate::spawn::{Spec, Stdin, spawn};

/// Bytes of output kept for the delivery log.
const TAIL: usize = 2048;

/// Longest Message-ID passed in `INBOXD_MESSAGE_ID` (RFC 5322's line limit); a longer one
/// (hostile, or broken) is left out rather than letting `spawn` fail with E2BIG on every try.
const MAX_MESSAGE_ID: usize = 998;

/// After the handler exited: how long its pipes may stay open (held by children it left
/// behind) before the rest of its process group is killed.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Runs `argv` for each message.
#[derive(Debug, Clone)]
pub struct Exec {
    argv: Vec<String>,
    timeout: Duration,
    cwd: PathBuf,
    pass_env: Vec<String>,
    stdin: Payload,
}

impl Exec {
    pub fn new(argv: Vec<String>, timeout: Duration, cwd: PathBuf) -> Exec {
        Exec {
            argv,
            timeout,
            cwd,
            pass_env: Vec::new(),
            stdin: Payload::Raw,
        }
    }

    /// What the program reads on stdin.
    pub fn stdin(mut self, payload: Payload) -> Exec {
        self.stdin = payload;
        self
    }

    /// Environment variables passed through beyond the default allowlist.
    pub fn pass_env(mut self, names: Vec<String>) -> Exec {
        self.pass_env = names;
        self
    }

    /// Whether the program can be started at all: it exists and is executable (looked up in
    /// `PATH` when it has no `/`). Checked when the watch starts and by `inboxd check`, so a
    /// typo is a clear error instead of every message failing in turn.
    pub fn check(&self) -> Result<(), HandlerError> {
        let program = self.argv.first().ok_or_else(|| HandlerError::new("exec: empty argv"))?;
        let candidates: Vec<PathBuf> = if program.contains('/') {
            vec![self.cwd.join(program)]
        } else {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect())
                .unwrap_or_default()
        };
        use std::os::unix::fs::PermissionsExt;
        let runnable = candidates
            .iter()
            .any(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0));
        if runnable {
            Ok(())
        } else if candidates.iter().any(|c| c.exists()) {
            Err(HandlerError::unavailable(format!(
                "exec handler {program} is not an executable file"
            )))
        } else {
            Err(HandlerError::unavailable(format!("exec handler {program} not found")))
        }
    }

    async fn run(&self, m: &Message<'_>) -> Result<(), HandlerError> {
        let program = self.argv.first().ok_or_else(|| HandlerError::new("exec: empty argv"))?;
        let mut env = crate::process::allowed_env(&self.pass_env);
        let mut set = |k: &str, v: String| env.push((k.into(), v.into()));
        set("INBOXD_ACCOUNT", m.account.to_string());
        set("INBOXD_FOLDER", m.folder.to_string());
        set("INBOXD_UIDVALIDITY", m.uidvalidity.to_string());
        set("INBOXD_UID", m.uid.to_string());
        set("INBOXD_KEY", m.key.to_string());
        set("INBOXD_SIZE", m.body.len().to_string());
        if let Some(g) = m.gmail {
            // Labels only in the JSON (`stdin = "json"`): any byte may be in one.
            set("INBOXD_GMAIL_MSGID", g.msgid.to_string());
            set("INBOXD_GMAIL_THRID", g.thrid.to_string());
        }
        match m.message_id {
            Some(id) if id.len() <= MAX_MESSAGE_ID => set("INBOXD_MESSAGE_ID", id.to_string()),
            Some(id) => {
                tracing::warn!(
                    key = m.key,
                    len = id.len(),
                    "Message-ID too long for the environment; INBOXD_MESSAGE_ID left out"
                );
            }
            None => {}
        }
        // A spooled message is the handler's stdin directly: the kernel reads the file, and
        // nothing of it passes through our memory.
        let json = match self.stdin {
            Payload::Json(_) => Some(super::encode(self.stdin, m)?.1),
            Payload::Raw => None,
        };
        let (stdin_from, body) = match m.body {
            _ if json.is_some() => (Stdin::Piped, json.as_deref()),
            super::Body::File { path, .. } => {
                let file = std::fs::File::open(path)
                    .map_err(|e| HandlerError::new(format!("cannot open the spooled message: {e}")))?;
                (Stdin::File(file), None)
            }
            other => (Stdin::Piped, other.bytes()),
        };
        let mut child = spawn(Spec {
            program,
            args: &self.argv[1..],
            env,
            cwd: &self.cwd,
            stdin: stdin_from,
        })
        .map_err(|e| {
            // The program is gone or not executable: a problem of the watch, not of this
            // message; it must not count toward dead-lettering.
            let text = format!("cannot start {program}: {e}");
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) {
                HandlerError::unavailable(text)
            } else {
                HandlerError::new(text)
            }
        })?;
        let pgid = Some(child.id());
        let mut stdin = child.stdin.take();
        // Output is read by tasks of their own, so success is decided by the handler's exit
        // status alone: a background child it left holding stdout cannot make a handler that
        // exited 0 look like one that timed out.
        let out_task = tokio::spawn(tail(child.stdout.take()));
        let err_task = tokio::spawn(tail(child.stderr.take()));
        let work = async {
            let feed = async {
                if let (Some(mut s), Some(body)) = (stdin.take(), body) {
                    // A handler may exit without reading all of stdin; that is its right.
                    let _ = s.write_all(body).await;
                    let _ = s.shutdown().await;
                }
            };
            let (_, status) = tokio::join!(feed, child.wait());
            status
        };
        let status = tokio::time::timeout(self.timeout, work).await;
        // The handler is done (or out of time); children it left behind in its group go too,
        // which also closes the pipes they held.
        crate::process::kill_group(pgid);
        let collect = |task: tokio::task::JoinHandle<Vec<u8>>| async move {
            tokio::time::timeout(DRAIN_GRACE, task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let (out, err) = (collect(out_task).await, collect(err_task).await);
        match status {
            Ok(status) => {
                let status = status.map_err(|e| HandlerError::new(format!("waiting for {program}: {e}")))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(HandlerError::new(format!("{program} exited with {status}")).with_output(combine(&err, &out)))
                }
            }
            Err(_) => {
                let _ = child.kill().await;
                Err(HandlerError::new(format!(
                    "{program} timed out after {:?}; process group killed",
                    self.timeout
                ))
                .with_output(combine(&err, &out)))
            }
        }
    }
}

async fn tail(stream: Option<impl AsyncRead + Unpin + Send>) -> Vec<u8> {
    let Some(mut s) = stream else { return Vec::new() };
    let mut keep = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        keep.extend_from_slice(&buf[..n]);
        if keep.len() > 2 * TAIL {
            keep.drain(..keep.len() - TAIL);
        }
    }
    if keep.len() > TAIL {
        keep.drain(..keep.len() - TAIL);
    }
    keep
}

fn combine(err: &[u8], out: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(err).trim().to_string();
    let o = String::from_utf8_lossy(out);
    if !o.trim().is_empty() {
        if !s.is_empty() {
            s.push_str(" | stdout: ");
        }
        s.push_str(o.trim());
    }
    s
}

impl Handler for Exec {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.run(message))
    }

    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            self.check()?;
            Ok(format!("program {} can be started", self.argv[0]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &[u8]) -> Message<'_> {
        Message {
            account: "a",
            folder: "INBOX",
            uidvalidity: 5,
            uid: 7,
            key: "v1-k",
            message_id: Some("<x@y>"),
            internal_date: None,
            flags: &[],
            gmail: None,
            body: crate::handler::Body::Bytes(body),
        }
    }

    fn sh(script: &str, timeout: Duration) -> Exec {
        Exec::new(
            vec!["sh".into(), "-c".into(), script.into()],
            timeout,
            std::env::temp_dir(),
        )
    }

    #[tokio::test]
    async fn passes_bytes_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}; echo \"$INBOXD_ACCOUNT $INBOXD_FOLDER $INBOXD_UIDVALIDITY $INBOXD_UID $INBOXD_KEY $INBOXD_MESSAGE_ID $INBOXD_SIZE\" >> {0}",
            out.display()
        );
        let body = b"Subject: x\r\n\r\n\x00\xff body\r\n";
        sh(&script, Duration::from_secs(10)).run(&msg(body)).await.unwrap();
        let got = std::fs::read(&out).unwrap();
        assert!(got.starts_with(body));
        assert_eq!(
            &got[body.len()..],
            format!("a INBOX 5 7 v1-k <x@y> {}\n", body.len()).as_bytes()
        );
    }

    #[tokio::test]
    async fn failure_keeps_the_output_tail() {
        let e = sh("echo oops >&2; exit 3", Duration::from_secs(10))
            .run(&msg(b"x"))
            .await
            .unwrap_err();
        assert!(e.reason.contains("exit status: 3"), "{e:?}");
        assert_eq!(e.output, "oops");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let e = sh(&script, Duration::from_millis(500))
            .run(&msg(b"x"))
            .await
            .unwrap_err();
        assert!(e.reason.contains("timed out"), "{e:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The grandchild was in the group: it must be gone (or a zombie awaiting reaping).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false);
        assert!(!alive, "grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn a_handler_that_ignores_stdin_is_fine() {
        let big = vec![b'x'; 1 << 20];
        sh("exit 0", Duration::from_secs(10)).run(&msg(&big)).await.unwrap();
    }

    #[tokio::test]
    async fn success_is_the_exit_status_even_if_a_child_holds_stdout() {
        // `notifier &` in a handler keeps stdout open after the handler exited 0.
        let r = sh("cat >/dev/null; sleep 30 & exit 0", Duration::from_secs(3))
            .run(&msg(b"x"))
            .await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn a_missing_or_unexecutable_program_is_unavailable_not_a_message_failure() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Exec::new(vec!["./nope.sh".into()], Duration::from_secs(5), dir.path().into());
        let e = missing.check().unwrap_err();
        assert!(e.is_unavailable() && e.reason.contains("not found"), "{e:?}");
        let e = missing.run(&msg(b"x")).await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");

        let script = dir.path().join("h.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        let plain = Exec::new(vec!["./h.sh".into()], Duration::from_secs(5), dir.path().into());
        let e = plain.check().unwrap_err();
        assert!(e.is_unavailable() && e.reason.contains("not an executable"), "{e:?}");
        assert!(plain.run(&msg(b"x")).await.unwrap_err().is_unavailable());

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        plain.check().unwrap();
        Exec::new(vec!["sh".into()], Duration::from_secs(5), dir.path().into())
            .check()
            .unwrap();
    }

    #[tokio::test]
    async fn a_spooled_message_is_stdin_straight_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = dir.path().join("spooled");
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&spooled, &body).unwrap();
        let out = dir.path().join("out");
        // The program learns the size from the environment, and its stdin is the file itself
        // (a regular file, not a pipe).
        let script = format!(
            "test -f /dev/stdin || exit 3; cat > {0}; test \"$INBOXD_SIZE\" = {1} || exit 4",
            out.display(),
            body.len()
        );
        let m = Message {
            body: crate::handler::Body::File {
                path: &spooled,
                len: body.len() as u64,
            },
            ..msg(b"")
        };
        sh(&script, Duration::from_secs(10)).run(&m).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == body);
        assert!(spooled.exists(), "the spool file belongs to the watcher");
    }

    #[tokio::test]
    async fn an_overlong_message_id_is_left_out_not_fatal() {
        let long = format!("<{}@x>", "a".repeat(200_000));
        let m = Message {
            message_id: Some(&long),
            ..msg(b"x")
        };
        sh("test -z \"$INBOXD_MESSAGE_ID\"", Duration::from_secs(10))
            .run(&m)
            .await
            .unwrap();
    }
}
