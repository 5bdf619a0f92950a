//! Spool files: where a large message is written chunk by chunk while it is fetched, so that
//! its size never shows in the daemon's memory.
//!
//! A spool file is created exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600) under a name
//! nobody can predict, `inboxd-spool-<uid>.<pid>.<random>`, and removed when the delivery is
//! over ([`Spool`]'s `Drop`). What a killed process left behind is removed at the next start
//! ([`remove_stale`]): files of that name whose process is gone. The Maildir handler spools
//! into its own `tmp/`, whose clean-up recognises the same name.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

const PREFIX: &str = "inboxd-spool-";

/// Bytes per `write(2)`. Measured (1 GB message, ext4 on a VM): 4 MiB writes spend most of
/// their time in the kernel's page-cache copy and ran at ~210 MB/s; 16-256 KiB writes at
/// ~590 MB/s.
const WRITE_PIECE: usize = 128 << 10;

/// A spool file that is removed when dropped.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    len: u64,
}

impl Spool {
    /// Creates a spool file for `uid` in `dir` (creating `dir`, mode 0700, if needed).
    pub fn create(dir: &Path, uid: u32) -> io::Result<(Spool, File)> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut last = None;
        for _ in 0..8 {
            let path = dir.join(format!(
                "{PREFIX}{uid}.{}.{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => return Ok((Spool { path, len: 0 }, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free spool file name")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records how many bytes the file holds once it is complete.
    pub fn set_len(&mut self, len: u64) {
        self.len = len;
    }

    /// The first `max` bytes (the header block is what identifies a message).
    pub fn head(&self, max: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        File::open(&self.path)?.take(max as u64).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// The piece of a spooled message fetched per command (`BODY.PEEK[]<offset.SPOOL_CHUNK>`).
pub const SPOOL_CHUNK: u32 = 4 << 20;

/// Pieces queued for the writer thread: memory for a spooled message is about
/// `(SPOOL_QUEUE + 3) * SPOOL_CHUNK` (queued, being written, being copied, the IMAP buffer).
const SPOOL_QUEUE: usize = 3;

/// Why a spooled fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool file could not be created or written.
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Imap(#[from] crate::imap::ImapError),
}

/// Fetches message `uid` in pieces into a new spool file in `dir` (the piece being written
/// while the next one arrives), at most `max_bytes`. `None` when the server no longer has it.
pub async fn fetch(
    session: &mut crate::imap::Session,
    dir: &Path,
    uid: u32,
    max_bytes: u64,
) -> Result<Option<Spool>, SpoolError> {
    let (mut spooled, file) = Spool::create(dir, uid)
        .map_err(|e| SpoolError::File(format!("cannot create a spool file in {}: {e}", dir.display())))?;
    let mut writer = SpoolWriter::new(file, SPOOL_QUEUE)
        .map_err(|e| SpoolError::File(format!("cannot start the spool writer: {e}")))?;
    let fetched = session.fetch_into(uid, SPOOL_CHUNK, max_bytes, &mut writer).await;
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(|e| SpoolError::File(format!("cannot write the spool file: {e}")))?;
    Ok(fetched?.map(|len| {
        spooled.set_len(len);
        spooled
    }))
}

/// Writes a spool file on a thread of its own, so that the disk and the network work at the
/// same time: [`Write::write`] copies the piece into a buffer and queues it (at most `depth`
/// pieces queued; a full queue makes the writer wait, which bounds memory), and
/// [`SpoolWriter::finish`] waits for the last write. Buffers are reused, not reallocated.
pub struct SpoolWriter {
    queue: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl SpoolWriter {
    pub fn new(mut file: File, depth: usize) -> io::Result<SpoolWriter> {
        use std::io::Write;
        let (queue, pieces) = std::sync::mpsc::sync_channel::<Vec<u8>>(depth.max(1));
        let (give_back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(depth.max(1) + 1);
        let thread = std::thread::Builder::new().name("inboxd-spool".into()).spawn(move || {
            for mut piece in pieces {
                for part in piece.chunks(WRITE_PIECE) {
                    file.write_all(part)?;
                }
                piece.clear();
                let _ = give_back.try_send(piece);
            }
            Ok(())
        })?;
        Ok(SpoolWriter {
            queue: Some(queue),
            spare,
            thread: Some(thread),
        })
    }

    /// Waits until everything queued is written; the first write error, if any.
    pub fn finish(mut self) -> io::Result<()> {
        self.queue = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the spool writer thread panicked")),
            None => Ok(()),
        }
    }
}

impl io::Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(queue) = &self.queue else {
            return Err(io::Error::other("spool writer finished"));
        };
        let mut piece = self.spare.try_recv().unwrap_or_default();
        piece.extend_from_slice(buf);
        if queue.send(piece).is_err() {
            // The thread stopped on an error; finish() reports it.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the spool file cannot be written",
            ));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Removes spool files in `dir` left by processes that are gone.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '.');
        let (Some(rand), Some(pid), Some(_uid)) = (parts.next(), parts.next(), parts.next()) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_writer_thread_writes_every_piece_in_order_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, f) = Spool::create(dir.path(), 1).unwrap();
        let mut w = SpoolWriter::new(f, 2).unwrap();
        let mut expected = Vec::new();
        for i in 0..50u32 {
            let piece: Vec<u8> = (0..10_000 + i).map(|j| (j % 251) as u8 ^ i as u8).collect();
            w.write_all(&piece).unwrap();
            expected.extend_from_slice(&piece);
        }
        w.finish().unwrap();
        assert!(fs::read(spool.path()).unwrap() == expected);

        // A file opened read-only cannot be written: the error comes back, not a hang.
        let ro = File::open(spool.path()).unwrap();
        let mut w = SpoolWriter::new(ro, 1).unwrap();
        let mut failed = false;
        for _ in 0..10 {
            if w.write_all(b"x").is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || w.finish().is_err());
    }

    #[test]
    fn created_private_removed_on_drop_and_stale_ones_cleaned() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, mut f) = Spool::create(&spool_dir, 7).unwrap();
        f.write_all(b"Subject: x\r\n\r\nbody").unwrap();
        spool.set_len(18);
        assert_eq!(spool.head(9).unwrap(), b"Subject: ");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(spool.path()), 0o600);
        assert_eq!(mode(&spool_dir), 0o700);
        let path = spool.path().to_path_buf();
        drop(spool);
        assert!(!path.exists());

        // Left by a process that is gone (pid far above pid_max), and by this one.
        let dead = spool_dir.join(format!("{PREFIX}3.4194999.0123456789abcdef"));
        let alive = spool_dir.join(format!("{PREFIX}3.{}.0123456789abcdef", std::process::id()));
        let other = spool_dir.join("someone-elses");
        for p in [&dead, &alive, &other] {
            fs::write(p, "x").unwrap();
        }
        remove_stale(&spool_dir);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
    }
}
