//! The single-instance guard: `run` and `once` hold an exclusive `flock(2)` on `<state>.lock`
//! for as long as they deliver, so two processes can never deliver from one state file (each
//! would run every handler once: duplicates). The lock file holds the holder's pid, for the
//! error the second process prints. The kernel releases the lock when the process dies, even
//! by SIGKILL, so a stale lock file never blocks a restart.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why the state could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the state {state} is in use by another inboxd (pid {holder}); two processes on one state would deliver every message twice"
    )]
    Held { state: PathBuf, holder: String },
    #[error("cannot lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while this process delivers; dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock beside `state` without waiting.
    pub fn acquire(state: &Path) -> Result<StateLock, LockError> {
        let mut name = state.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
        }
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock(2) on a descriptor we own; it neither reads nor writes our memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().chars().take(20).collect::<String>();
                return Err(LockError::Held {
                    state: state.to_path_buf(),
                    holder: if holder.is_empty() { "unknown".into() } else { holder },
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s.db");
        let first = StateLock::acquire(&state).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // conflicts exactly as another process would.
        let e = StateLock::acquire(&state).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        assert!(text.contains("s.db"), "{text}");
        drop(first);
        StateLock::acquire(&state).unwrap();
    }
}
