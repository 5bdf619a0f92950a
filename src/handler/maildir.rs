//! The `maildir` handler: writes each message into a Maildir, at most once.
//!
//! `deliver` only takes the message; `flush` makes a whole batch durable at once: it writes and
//! fsyncs the batch's files in `tmp/` (in parallel, so the file system can group the journal
//! commits), renames each into `new/` (atomic on POSIX) and fsyncs `new/`; only then does the
//! watcher commit the checkpoint. A write error (disk full) fails the flush, so nothing of the
//! batch is acknowledged. The file name is the idempotency key, so a message delivered again
//! after a crash finds its earlier copy (in `new/`, or in `cur/` where a mail reader moved it)
//! and is not written twice; a copy left in `tmp/` by a crash is simply overwritten.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{Handler, HandlerError, Message};

/// Threads used to fsync one batch.
const SYNC_THREADS: usize = 16;

/// A Maildir destination.
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    /// Keys already present in `cur/` when the handler started (files named `KEY:2,FLAGS`).
    in_cur: HashSet<String>,
    /// Messages accepted since the last flush, written by the flush.
    pending: Vec<(String, Vec<u8>)>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> HandlerError {
    let what = format!("{what} {}", path.display());
    move |e| HandlerError::new(format!("maildir: cannot {what}: {e}"))
}

fn blocking_failed(e: tokio::task::JoinError) -> HandlerError {
    HandlerError::new(format!("maildir: file task failed: {e}"))
}

impl Maildir {
    /// Opens a Maildir, creating `tmp`, `new` and `cur` if needed.
    pub fn open(root: &Path) -> Result<Maildir, HandlerError> {
        for sub in ["tmp", "new", "cur"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        sync_dir(root)?;
        let cur = root.join("cur");
        let mut in_cur = HashSet::new();
        for entry in fs::read_dir(&cur).map_err(io("read", &cur))? {
            let entry = entry.map_err(io("read", &cur))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = name.split(':').next().unwrap_or(&name).to_string();
            in_cur.insert(key);
        }
        Ok(Maildir {
            root: root.to_path_buf(),
            in_cur,
            pending: Vec::new(),
        })
    }
}

fn check_key(key: &str) -> Result<(), HandlerError> {
    if key.is_empty() || key.contains(['/', ':']) || key.starts_with('.') {
        return Err(HandlerError::new(format!("maildir: unusable key {key:?}")));
    }
    Ok(())
}

/// Writes and fsyncs the pending messages in `tmp/` (in parallel, so the file system can group
/// the journal commits), moves them into `new/` and fsyncs `new/`. A message already in `new/`
/// is left alone.
fn publish(root: &Path, pending: &[(String, Vec<u8>)]) -> Result<(), HandlerError> {
    let chunk = pending.len().div_ceil(SYNC_THREADS).max(1);
    let written: Vec<&str> = std::thread::scope(|scope| {
        let workers: Vec<_> = pending
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    for (key, body) in part {
                        if root.join("new").join(key).exists() {
                            continue;
                        }
                        let tmp = root.join("tmp").join(key);
                        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
                        f.write_all(body).map_err(io("write", &tmp))?;
                        f.sync_all().map_err(io("fsync", &tmp))?;
                        done.push(key.as_str());
                    }
                    Ok::<_, HandlerError>(done)
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(
                w.join()
                    .unwrap_or_else(|_| Err(HandlerError::new("maildir: writer thread panicked")))?,
            );
        }
        Ok::<_, HandlerError>(all)
    })?;
    for key in &written {
        let (tmp, new) = (root.join("tmp").join(key), root.join("new").join(key));
        fs::rename(&tmp, &new).map_err(io("rename into", &new))?;
    }
    if written.is_empty() {
        Ok(())
    } else {
        sync_dir(&root.join("new"))
    }
}

fn sync_dir(path: &Path) -> Result<(), HandlerError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io("fsync", path))
}

impl Handler for Maildir {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            check_key(message.key)?;
            let known = self.in_cur.contains(message.key) || self.pending.iter().any(|(k, _)| k == message.key);
            if !known {
                self.pending.push((message.key.to_string(), message.body.to_vec()));
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.pending.is_empty() {
                return Ok(());
            }
            let root = self.root.clone();
            let pending = std::mem::take(&mut self.pending);
            tokio::task::spawn_blocking(move || publish(&root, &pending))
                .await
                .map_err(blocking_failed)?
        })
    }

    fn batches(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(key: &'a str, body: &'a [u8]) -> Message<'a> {
        Message {
            account: "a",
            folder: "INBOX",
            uidvalidity: 1,
            uid: 1,
            key,
            message_id: None,
            body,
        }
    }

    #[tokio::test]
    async fn writes_once_even_when_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Maildir::open(dir.path()).unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.flush().await.unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.flush().await.unwrap();
        assert_eq!(fs::read_dir(dir.path().join("new")).unwrap().count(), 1);
        assert_eq!(fs::read(dir.path().join("new/v1-k-1-1")).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // A mail reader moved it to cur/ and marked it seen; a restart must still see it.
        fs::rename(dir.path().join("new/v1-k-1-1"), dir.path().join("cur/v1-k-1-1:2,S")).unwrap();
        let mut m = Maildir::open(dir.path()).unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        assert_eq!(fs::read_dir(dir.path().join("new")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn rejects_keys_that_are_not_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Maildir::open(dir.path()).unwrap();
        assert!(m.deliver(&msg("../x", b"")).await.is_err());
    }
}
