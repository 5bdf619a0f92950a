//! Child processes inboxd starts (exec handlers, password and token commands): what they may
//! see and how they end.
//!
//! - **Environment:** for handlers (programs that read untrusted mail): cleared, then an
//!   allowlist (`PATH`, `HOME`, `LANG`, `LC_*`, `TZ`, `USER`, `LOGNAME`, `TMPDIR`) plus names the
//!   operator lists. For password and token commands (the operator's own tools, which may need
//!   their own settings, such as `VAULT_ADDR`): inboxd's environment without the variables
//!   that hold secrets given as `{ env = "VAR" }`.
//! - **Lifetime:** each child gets its own process group (so a timeout kills its children
//!   too) and, on Linux, a parent-death signal: if inboxd dies (even by SIGKILL), the child is
//!   killed rather than left running beside the next inboxd's re-delivery of the same message.
//! - **Open files:** `run` and `once` raise their own soft limit to the hard one
//!   ([`raise_open_files_limit`]): a socket per watch.

use std::ffi::OsString;

/// Variables every child sees if inboxd has them.
const ALLOWED: &[&str] = &["PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME", "TMPDIR"];

/// The environment a child gets: the allowlist, `LC_*`, and the `extra` names.
pub(crate) fn allowed_env(extra: &[String]) -> Vec<(OsString, OsString)> {
    filter_env(std::env::vars_os(), extra)
}

fn filter_env(vars: impl Iterator<Item = (OsString, OsString)>, extra: &[String]) -> Vec<(OsString, OsString)> {
    vars.filter(|(k, _)| {
        let Some(k) = k.to_str() else { return false };
        ALLOWED.contains(&k) || k.starts_with("LC_") || extra.iter().any(|e| e == k)
    })
    .collect()
}

/// Prepares `cmd`: cleared environment plus the allowlist, own process group, killed when
/// dropped and when inboxd dies.
pub(crate) fn confine(cmd: &mut tokio::process::Command, extra_env: &[String]) {
    cmd.env_clear()
        .envs(allowed_env(extra_env))
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(cmd);
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: getpid is async-signal-safe and runs before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and only calls the
    // async-signal-safe prctl(2), getppid(2) and _exit(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // inboxd died between the fork and the prctl: do not run orphaned.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut tokio::process::Command) {}

/// Names of environment variables that hold secrets (`{ env = "VAR" }` sources), recorded as
/// the config is read.
fn secret_env_names() -> &'static std::sync::Mutex<std::collections::BTreeSet<String>> {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<std::collections::BTreeSet<String>>> =
        std::sync::OnceLock::new();
    NAMES.get_or_init(Default::default)
}

/// Records that `name` holds a secret: no password or token command will see it.
pub(crate) fn register_secret_env(name: &str) {
    if let Ok(mut names) = secret_env_names().lock() {
        names.insert(name.to_string());
    }
}

/// Prepares a password or token command: inboxd's environment minus the variables that hold
/// secrets, own process group, killed when dropped and when inboxd dies.
pub(crate) fn confine_tool(cmd: &mut tokio::process::Command) {
    if let Ok(names) = secret_env_names().lock() {
        for name in names.iter() {
            cmd.env_remove(name);
        }
    }
    cmd.process_group(0).kill_on_drop(true);
    die_with_parent(cmd);
}

/// SIGKILL to a process group we created.
pub(crate) fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the child.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Raises this process's soft limit of open files to its hard limit (one socket per watch,
/// plus the state, spool and target files: a service manager's default soft limit of 1024
/// would end a thousand watches at "too many open files"). Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(lim.rlim_max);
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_names_pass() {
        let vars = ["PATH", "LC_ALL", "IMAP_PASSWORD", "WANTED", "HOME", "PATHX"]
            .into_iter()
            .map(|k| (OsString::from(k), OsString::from("v")));
        let env = filter_env(vars, &["WANTED".into()]);
        let names: Vec<String> = env.iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["PATH", "LC_ALL", "WANTED", "HOME"]);
    }
}
