//! The `exec` handler: runs a program (no shell) with the raw message on stdin.
//!
//! Exit status 0 acknowledges. A non-zero exit, a signal, or running past the timeout is a
//! failure; on timeout the whole process group is killed, so a handler's children cannot
//! outlive it. The tail of stderr and stdout is kept for the delivery log.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Handler, HandlerError, Message};

/// Bytes of output kept for the delivery log.
const TAIL: usize = 2048;

/// Runs `argv` for each message.
#[derive(Debug, Clone)]
pub struct Exec {
    argv: Vec<String>,
    timeout: Duration,
    cwd: PathBuf,
}

impl Exec {
    pub fn new(argv: Vec<String>, timeout: Duration, cwd: PathBuf) -> Exec {
        Exec { argv, timeout, cwd }
    }

    async fn run(&self, m: &Message<'_>) -> Result<(), HandlerError> {
        let program = self.argv.first().ok_or_else(|| HandlerError::new("exec: empty argv"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.argv[1..])
            .current_dir(&self.cwd)
            .env("INBOXD_ACCOUNT", m.account)
            .env("INBOXD_FOLDER", m.folder)
            .env("INBOXD_UIDVALIDITY", m.uidvalidity.to_string())
            .env("INBOXD_UID", m.uid.to_string())
            .env("INBOXD_KEY", m.key)
            .env("INBOXD_SIZE", m.body.len().to_string())
            .env_remove("INBOXD_MESSAGE_ID")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(id) = m.message_id {
            cmd.env("INBOXD_MESSAGE_ID", id);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| HandlerError::new(format!("cannot start {program}: {e}")))?;
        let pgid = child.id().map(|id| id as i32);
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let body = m.body;
        let work = async {
            let feed = async {
                if let Some(mut s) = stdin.take() {
                    // A handler may exit without reading all of stdin; that is its right.
                    let _ = s.write_all(body).await;
                    let _ = s.shutdown().await;
                }
            };
            let (_, out, err, status) = tokio::join!(feed, tail(stdout), tail(stderr), child.wait());
            (out, err, status)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok((out, err, status)) => {
                let status = status.map_err(|e| HandlerError::new(format!("waiting for {program}: {e}")))?;
                // The handler is done; children it left behind in its group go too.
                kill_group(pgid);
                if status.success() {
                    Ok(())
                } else {
                    Err(HandlerError {
                        reason: format!("{program} exited with {status}"),
                        output: combine(&err, &out),
                    })
                }
            }
            Err(_) => {
                kill_group(pgid);
                let _ = child.kill().await;
                Err(HandlerError::new(format!(
                    "{program} timed out after {:?}; process group killed",
                    self.timeout
                )))
            }
        }
    }
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the child.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

async fn tail(stream: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
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
            body,
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
}
