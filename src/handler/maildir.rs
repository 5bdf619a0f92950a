//! The `maildir` handler: writes each message into a Maildir, at most once.
//!
//! `deliver` only takes the message; `flush` makes a whole batch durable at once: it writes and
//! fsyncs the batch's files in `tmp/` (in parallel, so the file system can group the journal
//! commits), renames each into `new/` (atomic on POSIX) and fsyncs `new/`; only then does the
//! watcher commit the checkpoint. A write error (disk full) fails the flush, so nothing of the
//! batch is acknowledged. The file name is the idempotency key, so a message delivered again
//! after a crash finds its earlier copy (in `new/`, or in `cur/` where a mail reader moved it)
//! and is not written twice; a copy left in `tmp/` by a crash is left there (and never read).
//!
//! Files are created under a unique name in `tmp/` with `O_CREAT|O_EXCL|O_NOFOLLOW`, so a
//! symlink planted at a predictable name is never followed, and with mode 0600 in directories
//! of mode 0700 (`mode = "0640"` in the config makes files 0640 and directories 0750): mail is
//! private, as an MDA makes it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;

use super::{Body, Handler, HandlerError, Message};

/// Threads used to fsync one batch.
const SYNC_THREADS: usize = 16;

/// Default mode of message files; directories get the matching search bits.
pub const DEFAULT_MODE: u32 = 0o600;

/// A Maildir destination.
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    /// `root/tmp`, where large messages are spooled.
    tmp: PathBuf,
    /// Mode of message files.
    mode: u32,
    /// Keys present in `cur/` when the handler started (files named `KEY:2,FLAGS`), and keys
    /// this process published since (a reader may have moved them to `cur/` meanwhile); shared
    /// with a flush running behind the next batch, which adds its keys when it is done.
    in_cur: Arc<Mutex<HashSet<String>>>,
    /// Messages accepted since the last flush, written by the flush.
    pending: Vec<(String, Payload)>,
}

/// A message waiting for the flush.
#[derive(Debug)]
enum Payload {
    Bytes(Vec<u8>),
    /// A spooled message, already linked (or copied) into `tmp/` under a name of our own:
    /// the flush fsyncs and renames it.
    InTmp(PathBuf),
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> HandlerError {
    let what = format!("{what} {}", path.display());
    move |e| HandlerError::new(format!("maildir: cannot {what}: {e}"))
}

fn blocking_failed(e: tokio::task::JoinError) -> HandlerError {
    HandlerError::new(format!("maildir: file task failed: {e}"))
}

impl Maildir {
    /// Opens a Maildir, creating `tmp`, `new` and `cur` if needed, with the default modes.
    pub fn open(root: &Path) -> Result<Maildir, HandlerError> {
        Maildir::open_with_mode(root, DEFAULT_MODE)
    }

    /// Opens a Maildir whose files get `mode` (directories it creates get the same bits plus
    /// search permission where read permission is given).
    pub fn open_with_mode(root: &Path, mode: u32) -> Result<Maildir, HandlerError> {
        let mode = mode & 0o777;
        let dir_mode = mode | ((mode & 0o444) >> 2) | 0o700;
        for sub in ["tmp", "new", "cur"] {
            let p = root.join(sub);
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(&p)
                .map_err(io("create", &p))?;
        }
        sync_dir(root)?;
        remove_stale_tmp(&root.join("tmp"));
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
            tmp: root.join("tmp"),
            mode,
            in_cur: Arc::new(Mutex::new(in_cur)),
            pending: Vec::new(),
        })
    }
}

impl Drop for Maildir {
    fn drop(&mut self) {
        // Accepted but never flushed: spooled messages linked into tmp/ for it go.
        for (_, payload) in &self.pending {
            if let Payload::InTmp(tmp) = payload {
                let _ = fs::remove_file(tmp);
            }
        }
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
fn publish(root: &Path, mode: u32, pending: &[(String, Payload)]) -> Result<(), HandlerError> {
    let chunk = pending.len().div_ceil(SYNC_THREADS).max(1);
    let written: Vec<(&str, PathBuf)> = std::thread::scope(|scope| {
        let workers: Vec<_> = pending
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    // What this worker wrote goes back with its error too: the flush removes
                    // every file of a batch that failed, not only the one that failed.
                    let mut failed = None;
                    for (key, payload) in part {
                        if root.join("new").join(key).exists() {
                            if let Payload::InTmp(tmp) = payload {
                                let _ = fs::remove_file(tmp);
                            }
                            continue;
                        }
                        let body = match payload {
                            Payload::Bytes(body) => body,
                            Payload::InTmp(tmp) => {
                                let synced = File::open(tmp).and_then(|f| f.sync_all()).map_err(io("fsync", tmp));
                                if let Err(e) = synced {
                                    let _ = fs::remove_file(tmp);
                                    failed = Some(e);
                                    break;
                                }
                                done.push((key.as_str(), tmp.clone()));
                                continue;
                            }
                        };
                        let (tmp, mut f) = match create_unique(&root.join("tmp"), key, mode) {
                            Ok(created) => created,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        };
                        let written = f.write_all(body).and_then(|()| f.sync_all()).map_err(io("write", &tmp));
                        if let Err(e) = written {
                            let _ = fs::remove_file(&tmp);
                            failed = Some(e);
                            break;
                        }
                        done.push((key.as_str(), tmp));
                    }
                    (done, failed)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut first_error = None;
        for w in workers {
            let (done, failed) = w
                .join()
                .unwrap_or_else(|_| (Vec::new(), Some(HandlerError::new("maildir: writer thread panicked"))));
            all.extend(done);
            if first_error.is_none() {
                first_error = failed;
            }
        }
        match first_error {
            None => Ok(all),
            Some(e) => {
                // Nothing of the batch counts: no file of it stays in tmp/ (a full disk would
                // otherwise fill up with every retry's leftovers).
                for (_, tmp) in &all {
                    let _ = fs::remove_file(tmp);
                }
                Err(e)
            }
        }
    })?;
    for (i, (key, tmp)) in written.iter().enumerate() {
        let new = root.join("new").join(key);
        if let Err(e) = fs::rename(tmp, &new) {
            for (_, left) in &written[i..] {
                let _ = fs::remove_file(left);
            }
            return Err(io("rename into", &new)(e));
        }
    }
    // Also when every file was there already: an earlier try may have renamed it there
    // without making `new/` durable.
    sync_dir(&root.join("new"))
}

/// Removes what a crashed inboxd left in `tmp/`: files named `<key>.<pid>.<random>` whose
/// process is gone. Anything else in `tmp/` belongs to someone else and is left alone.
fn remove_stale_tmp(tmp_dir: &Path) {
    let Ok(entries) = fs::read_dir(tmp_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.rsplitn(3, '.');
        let (Some(rand), Some(pid), Some(_key)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let ours = rand.len() == 16 && rand.bytes().all(|b| b.is_ascii_hexdigit());
        if let (true, Ok(pid)) = (ours, pid.parse::<u32>())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Creates `tmp/<key>.<pid>.<random>` exclusively, never through a symlink.
fn create_unique(tmp_dir: &Path, key: &str, mode: u32) -> Result<(PathBuf, File), HandlerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..8 {
        let tmp = tmp_dir.join(format!("{key}.{}.{:016x}", std::process::id(), fastrand::u64(..)));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(io("create", &tmp)(e)),
        }
    }
    let (tmp, e) = last.unwrap_or_else(|| (tmp_dir.to_path_buf(), std::io::Error::other("no attempt")));
    Err(io("create", &tmp)(e))
}

/// Puts a spooled message into `tmp/` under a name of our own: a hard link when the spool
/// file is on the same file system (it is when the watcher spooled into this Maildir's
/// `tmp/`), otherwise a copy made by the kernel (`copy_file_range`), never through memory.
fn take_spooled(root: &Path, key: &str, mode: u32, spooled: &Path) -> Result<PathBuf, HandlerError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp_dir = root.join("tmp");
    for _ in 0..8 {
        let tmp = tmp_dir.join(format!("{key}.{}.{:016x}", std::process::id(), fastrand::u64(..)));
        match fs::hard_link(spooled, &tmp) {
            Ok(()) => {
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
                return Ok(tmp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => break,
        }
    }
    let (tmp, mut f) = create_unique(&tmp_dir, key, mode)?;
    let copied = File::open(spooled).and_then(|mut src| std::io::copy(&mut src, &mut f));
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(io("copy into", &tmp)(e));
    }
    Ok(tmp)
}

fn sync_dir(path: &Path) -> Result<(), HandlerError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io("fsync", path))
}

impl Maildir {
    /// The work of publishing the messages accepted so far, which it takes with it.
    fn publish_pending(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send + 'static {
        let root = self.root.clone();
        let mode = self.mode;
        let pending = std::mem::take(&mut self.pending);
        let in_cur = Arc::clone(&self.in_cur);
        async move {
            if pending.is_empty() {
                return Ok(());
            }
            let keys: Vec<String> = pending.iter().map(|(k, _)| k.clone()).collect();
            tokio::task::spawn_blocking(move || {
                let published = publish(&root, mode, &pending);
                if published.is_err() {
                    // Nothing of the batch counts; what was linked into tmp/ for it goes.
                    for (_, payload) in &pending {
                        if let Payload::InTmp(tmp) = payload {
                            let _ = fs::remove_file(tmp);
                        }
                    }
                }
                published
            })
            .await
            .map_err(blocking_failed)??;
            // Published: if the commit that follows fails and the batch comes again, a reader
            // may have moved these to cur/ by then; never write them a second time.
            in_cur.lock().unwrap_or_else(PoisonError::into_inner).extend(keys);
            Ok(())
        }
    }
}

impl Handler for Maildir {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            check_key(message.key)?;
            let known = self
                .in_cur
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(message.key)
                || self.pending.iter().any(|(k, _)| k == message.key);
            if known {
                return Ok(());
            }
            let payload = match message.body {
                Body::File { path, .. } => {
                    let (root, key, mode) = (self.root.clone(), message.key.to_string(), self.mode);
                    let path = path.to_path_buf();
                    let tmp = tokio::task::spawn_blocking(move || take_spooled(&root, &key, mode, &path))
                        .await
                        .map_err(blocking_failed)??;
                    Payload::InTmp(tmp)
                }
                other => Payload::Bytes(other.to_vec().map_err(|e| HandlerError::new(format!("maildir: {e}")))?),
            };
            self.pending.push((message.key.to_string(), payload));
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.publish_pending())
    }

    fn flushes_behind(&self) -> bool {
        true
    }

    fn flush_behind(&mut self) -> Option<BoxFuture<'static, Result<(), HandlerError>>> {
        Some(Box::pin(self.publish_pending()))
    }

    fn batches(&self) -> bool {
        true
    }

    fn spool_dir(&self) -> Option<&Path> {
        Some(&self.tmp)
    }

    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            // Opening created tmp/, new/ and cur/; a file in tmp/ proves they can be written.
            let (tmp, _) = create_unique(&self.tmp, "inboxd-check", self.mode)?;
            let _ = fs::remove_file(&tmp);
            Ok(format!("Maildir {} is writable", self.root.display()))
        })
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
            internal_date: None,
            flags: &[],
            gmail: None,
            body: Body::Bytes(body),
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

    #[tokio::test]
    async fn a_symlink_in_tmp_is_never_followed_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let root = dir.path().join("md");
        let mut m = Maildir::open(&root).unwrap();
        // An attacker who can write tmp/ plants the predictable names.
        std::os::unix::fs::symlink(&victim, root.join("tmp/v1-k-1-2")).unwrap();
        m.deliver(&msg("v1-k-1-2", b"mail")).await.unwrap();
        m.flush().await.unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(root.join("new/v1-k-1-2")).unwrap(), b"mail");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("new/v1-k-1-2")), 0o600);
        assert_eq!(mode(&root.join("new")), 0o700);

        let mut shared = Maildir::open_with_mode(&dir.path().join("shared"), 0o640).unwrap();
        assert_eq!(mode(&dir.path().join("shared/cur")), 0o750);
        shared.deliver(&msg("v1-k-1-2", b"mail")).await.unwrap();
        shared.flush().await.unwrap();
        assert_eq!(mode(&dir.path().join("shared/new/v1-k-1-2")), 0o640);
    }

    #[tokio::test]
    async fn a_spooled_message_is_linked_from_tmp_not_copied() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("md");
        let mut m = Maildir::open_with_mode(&root, 0o640).unwrap();
        let spool_dir = m.spool_dir().unwrap().to_path_buf();
        assert_eq!(spool_dir, root.join("tmp"));
        let (mut spooled, mut f) = crate::spool::Spool::create(&spool_dir, 9).unwrap();
        f.write_all(b"Subject: big\r\n\r\nbody").unwrap();
        spooled.set_len(19);
        let mut message = msg("v1-k-1-9", b"");
        message.body = Body::File {
            path: spooled.path(),
            len: spooled.len(),
        };
        m.deliver(&message).await.unwrap();
        m.flush().await.unwrap();
        let published = root.join("new/v1-k-1-9");
        assert_eq!(fs::read(&published).unwrap(), b"Subject: big\r\n\r\nbody");
        // The same inode: no copy was made.
        assert_eq!(
            fs::metadata(&published).unwrap().ino(),
            fs::metadata(spooled.path()).unwrap().ino()
        );
        assert_eq!(fs::metadata(&published).unwrap().mode() & 0o777, 0o640);
        // The watcher removes its spool name after the delivery; only new/ keeps the message.
        drop(spooled);
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);

        // Spooled on another directory: copied, and delivered again later: not written twice.
        let elsewhere = dir.path().join("spool");
        let (mut spooled, mut f) = crate::spool::Spool::create(&elsewhere, 9).unwrap();
        f.write_all(b"x").unwrap();
        spooled.set_len(1);
        let mut message = msg("v1-k-1-10", b"");
        message.body = Body::File {
            path: spooled.path(),
            len: 1,
        };
        m.deliver(&message).await.unwrap();
        m.deliver(&message).await.unwrap();
        m.flush().await.unwrap();
        assert_eq!(fs::read(root.join("new/v1-k-1-10")).unwrap(), b"x");
        assert_eq!(fs::read_dir(root.join("new")).unwrap().count(), 2);
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_batch_redelivered_after_a_failed_commit_is_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Maildir::open(dir.path()).unwrap();
        m.deliver(&msg("v1-k-1-3", b"x")).await.unwrap();
        m.flush().await.unwrap();
        // The commit failed; meanwhile a reader moved the message to cur/.
        fs::rename(dir.path().join("new/v1-k-1-3"), dir.path().join("cur/v1-k-1-3:2,S")).unwrap();
        m.deliver(&msg("v1-k-1-3", b"x")).await.unwrap();
        m.flush().await.unwrap();
        assert_eq!(fs::read_dir(dir.path().join("new")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("cur")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_flush_behind_takes_its_batch_and_later_deliveries_wait_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        let mut m = Maildir::open(dir.path()).unwrap();
        assert!(m.flushes_behind());
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.deliver(&msg("v1-k-1-2", b"two")).await.unwrap();
        let work = m.flush_behind().unwrap();
        // Delivered while the first batch is being made durable: the next batch.
        m.deliver(&msg("v1-k-1-3", b"three")).await.unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        work.await.unwrap();
        let names = |dir: &Path| {
            let mut n: Vec<String> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&new), ["v1-k-1-1", "v1-k-1-2"]);
        // Published by the work: known from then on even after a reader moved it.
        fs::rename(new.join("v1-k-1-2"), dir.path().join("cur/v1-k-1-2:2,S")).unwrap();
        m.deliver(&msg("v1-k-1-2", b"two")).await.unwrap();
        m.flush_behind().unwrap().await.unwrap();
        assert_eq!(names(&new), ["v1-k-1-1", "v1-k-1-3"]);
        assert_eq!(fs::read(new.join("v1-k-1-3")).unwrap(), b"three");
        assert!(names(&dir.path().join("tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_failed_flush_behind_publishes_nothing_leaves_nothing_in_tmp_and_the_batch_can_come_again() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        let mut m = Maildir::open(dir.path()).unwrap();
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.deliver(&msg("v1-k-1-2", b"two")).await.unwrap();
        // `new/` is not a directory for a moment (root writes through any mode).
        fs::remove_dir(&new).unwrap();
        fs::write(&new, "").unwrap();
        let failed = m.flush_behind().unwrap().await.unwrap_err();
        assert!(failed.detail().contains("new"), "{}", failed.detail());
        fs::remove_file(&new).unwrap();
        fs::create_dir(&new).unwrap();
        assert_eq!(fs::read_dir(&new).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Nothing of it counted: delivered again, it is written.
        m.deliver(&msg("v1-k-1-1", b"one")).await.unwrap();
        m.deliver(&msg("v1-k-1-2", b"two")).await.unwrap();
        m.flush_behind().unwrap().await.unwrap();
        assert_eq!(fs::read(new.join("v1-k-1-1")).unwrap(), b"one");
        assert_eq!(fs::read(new.join("v1-k-1-2")).unwrap(), b"two");
    }
}
