//! The `maildir` handler: writes each message into a Maildir, at most once.
//!
//! The file is written to `tmp/`, fsynced, and renamed into `new/` (atomic on POSIX); `flush`
//! fsyncs `new/` so the renames are durable before the checkpoint is committed. The file name
//! is the idempotency key, so a message delivered again after a crash finds its earlier copy
//! (in `new/`, or in `cur/` where a mail reader moved it) and is not written twice.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{Handler, HandlerError, Message};

/// A Maildir destination.
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    /// Keys already present in `cur/` when the handler started (files named `KEY:2,FLAGS`).
    in_cur: HashSet<String>,
    dirty: bool,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> HandlerError {
    let what = format!("{what} {}", path.display());
    move |e| HandlerError::new(format!("maildir: cannot {what}: {e}"))
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
            dirty: false,
        })
    }

    fn deliver_blocking(&self, key: &str, body: Vec<u8>) -> BoxFuture<'static, Result<bool, HandlerError>> {
        let root = self.root.clone();
        let key = key.to_string();
        let known = self.in_cur.contains(&key);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || write(&root, &key, &body, known))
                .await
                .map_err(|e| HandlerError::new(format!("maildir: writer task failed: {e}")))?
        })
    }
}

/// Writes one message; returns whether a new file was created.
fn write(root: &Path, key: &str, body: &[u8], in_cur: bool) -> Result<bool, HandlerError> {
    if key.is_empty() || key.contains(['/', ':']) || key.starts_with('.') {
        return Err(HandlerError::new(format!("maildir: unusable key {key:?}")));
    }
    let new = root.join("new").join(key);
    if in_cur || new.exists() {
        return Ok(false);
    }
    let tmp = root.join("tmp").join(key);
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(body).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &new).map_err(io("rename into", &new))?;
    Ok(true)
}

fn sync_dir(path: &Path) -> Result<(), HandlerError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io("fsync", path))
}

impl Handler for Maildir {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let created = self.deliver_blocking(message.key, message.body.to_vec()).await?;
            self.dirty |= created;
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.dirty {
                let new = self.root.join("new");
                tokio::task::spawn_blocking(move || sync_dir(&new))
                    .await
                    .map_err(|e| HandlerError::new(format!("maildir: fsync task failed: {e}")))??;
                self.dirty = false;
            }
            Ok(())
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
